"""Shared fixtures: a tiny synthetic world in the real store format, Hydra composition helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import braindecode_fw  # noqa: F401  (registers the config resolvers, e.g. ${bdf_demo_weights:})

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "braindecode_fw" / "conf"  # the configs ship inside the package

# Overrides that shrink the synthetic world, the target encoder and the model to seconds on CPU.
TINY_WORLD = [
    "dataset.world.voxels_per_subject=[60,90]",
    "dataset.world.volume_shape=[10,12,10]",
    "dataset.world.image_size=32",
    "dataset.world.feature_resolution=8",
    "dataset.world.n_test_images=24",
    "dataset.world.n_train_images=120",
    "dataset.world.session_length=48",
    "dataset.world.runs_per_session=4",
    "dataset.world.oracle_subset_size=20",
    "dataset.world.oracle_n_subsets=5",
]
TINY_MODEL = [
    # the random token target and the plumbing generator, shrunk (the shipped tiny CLIP and generator
    # are the defaults; tests/demo/ and tests/tasks/test_default_run.py exercise them)
    "target=openclip_tiny",
    "generator=tiny_random",
    "target.model_overrides.vision_cfg.image_size=32",
    "target.model_overrides.vision_cfg.width=32",
    "target.model_overrides.vision_cfg.layers=1",
    "target.model_overrides.embed_dim=16",
    "target.preprocess.image_size=32",
    "model.hidden=32",
    "model.encoder.n_blocks=1",
    "data.batch_size=16",
    "evaluation.subset_size=20",
    "evaluation.n_subsets=5",
    "trainer.max_epochs=2",
    "generator.build_tiny.cross_attention_dim=32",
    "generator.build_tiny.image_size=32",
    "generator.steps=2",
]


def tiny_world_config():
    from braindecode_fw.data.synthetic.world import SyntheticWorldConfig

    return SyntheticWorldConfig(
        voxels_per_subject=[60, 90], volume_shape=[10, 12, 10], image_size=32, feature_resolution=8,
        n_test_images=24, n_train_images=120, session_length=48, runs_per_session=4,
        oracle_subset_size=20, oracle_n_subsets=5,
    )


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A generated tiny synthetic world (2 subjects, 60/90 voxels). Treat as read-only."""
    from braindecode_fw.data.synthetic.world import generate_world

    root = tmp_path_factory.mktemp("world") / "synthetic"
    generate_world(tiny_world_config(), root)
    return root


@pytest.fixture
def store_copy(tiny_store, tmp_path) -> Path:
    """A writable copy of the tiny world, for corrupting."""
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def compose_config(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


# --- running a bdf-* command inside the test process -------------------------------------------

#: console script -> entry function in braindecode_fw.cli (pyproject [project.scripts])
ENTRY_POINTS = {"bdf-train": "train_main", "bdf-adapt": "adapt_main", "bdf-evaluate": "evaluate_main",
                "bdf-reconstruct": "reconstruct_main", "bdf-prepare": "prepare_main", "bdf-bench": "bench_main"}


def _logging_state() -> tuple:
    import logging

    loggers = {name: (lg.level, lg.propagate, lg.disabled, list(lg.handlers))
               for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    return logging.root.level, list(logging.root.handlers), loggers


def _restore_logging(state: tuple) -> None:
    import logging

    level, handlers, loggers = state
    for h in logging.root.handlers:  # Hydra's console and run-folder log file handlers
        if h not in handlers:
            h.close()
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)
    for name, (lvl, propagate, disabled, hs) in loggers.items():
        lg = logging.getLogger(name)
        if lg.level != lvl:  # setLevel clears every logger's cache: 0.6 s for all of them
            lg.setLevel(lvl)
        lg.propagate, lg.disabled = propagate, disabled
        lg.handlers[:] = hs


def run_cli(cmd: str, args: list[str], root: Path, env: dict[str, str] | None = None):
    """Run the console script ``cmd`` (``bdf-train``, ...) with ``args`` inside this process, as
    ``tests.tasks.test_cli._run`` runs it in a subprocess: the same environment (``BDF_ROOT=root``,
    offline hubs), exit code (2 for a one-line user error, 1 for a traceback), stdout and stderr.

    A fresh interpreter spends ~10-20 s importing torch, Lightning, open_clip and diffusers before
    the command does anything; here they are imported once per test session. Use ``_run`` where the
    process is the point (a kill, a resume after one, DDP ranks, the installed console script).
    Everything a run changes globally is put back: environment, argv, working folder, logging,
    warning filters, Hydra's global state, the torch/numpy/python random generators.

    Returns a ``subprocess.CompletedProcess`` (returncode, stdout, stderr).
    """
    import contextlib
    import io
    import random
    import subprocess
    import sys
    import traceback
    import warnings

    import numpy as np
    import torch
    from hydra.core.global_hydra import GlobalHydra

    from braindecode_fw import cli

    saved_env, saved_argv, saved_cwd = dict(os.environ), list(sys.argv), os.getcwd()
    saved_logging = _logging_state()
    saved_rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    saved_torch = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    os.environ.update({"BDF_ROOT": str(root), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})})
    os.environ.pop("BDF_DEBUG", None)
    sys.argv = [cmd, *args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    GlobalHydra.instance().clear()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                getattr(cli, ENTRY_POINTS[cmd])()
            except SystemExit as e:  # sys.exit(2) of a user error, Hydra's sys.exit(1) after a traceback
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = 1 if isinstance(e.code, str) else (e.code or 0)
            except Exception:  # noqa: BLE001 - an uncaught error ends the process with its traceback
                traceback.print_exc()
                code = 1
    finally:
        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        _restore_logging(saved_logging)
        torch.set_rng_state(saved_rng[0])
        np.random.set_state(saved_rng[1])
        random.setstate(saved_rng[2])
        torch.set_num_threads(saved_torch[0])
        torch.use_deterministic_algorithms(saved_torch[1])
    return subprocess.CompletedProcess([cmd, *args], code, out.getvalue(), err.getvalue())


def checkpoint_of(proc) -> str:
    """The best checkpoint a bdf-train/bdf-adapt run printed in its summary."""
    return proc.stdout.split("checkpoint    :")[1].split()[0]


@pytest.fixture(scope="session")
def tiny_train_run(tmp_path_factory):
    """One ``bdf-train`` on the tiny world with the tiny model (both subjects, 2 epochs, CSV logger,
    the post-training reconstructions), shared by the tests that read its output or reuse its
    checkpoint: (the finished process, its BDF_ROOT). Treat the run folder as read-only."""
    root = tmp_path_factory.mktemp("tiny_train_run")
    return run_cli("bdf-train", [*TINY_WORLD, *TINY_MODEL, "logger=csv"], root), root


@pytest.fixture(scope="session")
def tiny_subj01_run(tmp_path_factory):
    """One ``bdf-train`` of the tiny model on subj01 only (no reconstructions), the source model of
    the bdf-adapt tests that add subj02: (the finished process, its BDF_ROOT). Read-only."""
    root = tmp_path_factory.mktemp("tiny_subj01_run")
    args = [*TINY_WORLD, *TINY_MODEL, "logger=csv", "reconstruction.enabled=false", "data.subjects=[subj01]"]
    return run_cli("bdf-train", args, root), root
