"""``bdf_optuna``: a Hydra sweeper that drives Optuna (>= 4) through Hydra's launchers.

Why not the official ``hydra-optuna-sweeper``: its newest wheel (1.3.0) pins ``optuna<3``; with
SQLAlchemy 2.x its ``storage=sqlite:///...`` dies with a bare ``AssertionError``
(facebookresearch/hydra#2562); and it cannot continue a study (lightning-hydra-template#535). This
plugin uses Optuna's ask/tell API, so one study can be resumed from its storage, failed trials are
told ``FAIL`` instead of ending the search, and each batch of trials goes through the configured
Hydra launcher (basic, submitit_local, submitit_slurm).

Select it with ``defaults: [override /hydra/sweeper: bdf_optuna]`` (see
``braindecode_fw/conf/hparams_search/synthetic_optuna.yaml``). Importing this package is cheap: Hydra imports every
``hydra_plugins.*`` module at start-up, so Optuna is imported only when a sweep starts.
"""
