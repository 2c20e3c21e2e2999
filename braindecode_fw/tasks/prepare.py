"""``bdf-prepare``: build a prepared store (``dataset=...``), or retrain the demo models
(``demo_models=retrain``). The work is :mod:`braindecode_fw.data.prepare` and
:mod:`braindecode_fw.demo.retrain`."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from braindecode_fw.data.prepare import describe, prepare
from braindecode_fw.errors import ConfigError


def prepare_task(cfg: DictConfig) -> None:
    """Prepare ``cfg.dataset`` into its store and print the converter's report (or the world's
    summary); with ``cfg.demo_models`` set, retrain the demo models on the world's scenes instead."""
    if cfg.get("demo_models") is not None:
        from braindecode_fw.demo import retrain

        if cfg.dataset.get("kind") not in ("synthetic_fmri", "synthetic_meg"):
            raise ConfigError(f"demo_models: the demo models are trained on a synthetic world's scenes; dataset "
                             f"{cfg.dataset.name!r} is not one (use dataset=synthetic)")
        summary = retrain.retrain(OmegaConf.to_container(cfg.demo_models, resolve=True),
                                  OmegaConf.to_container(cfg.dataset.world, resolve=True))
        print(retrain.describe(summary))
        return
    summary = prepare(cfg.dataset)
    if "report" in summary:  # real-data converters
        print(summary["report"])
    else:
        print(describe(summary) if "subjects" in summary else summary)
    print(f"prepared store: {cfg.dataset.store}")
