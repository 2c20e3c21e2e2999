"""``bdf-evaluate ckpt=<path>``: rebuild the decoder and data from a checkpoint and re-run the test
retrieval evaluation (same protocol and code as at the end of ``bdf-train``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from braindecode_fw.metrics.report import format_table, write_report

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a bdf-train checkpoint safely (``weights_only=True``) and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt: checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"ckpt: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if "braindecode_fw" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"ckpt: {path} was not written by bdf-train (no 'braindecode_fw' entry)")
    return ckpt


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    from braindecode_fw.tasks.train import build_datamodule, build_model, evaluate_predictions

    ckpt = load_checkpoint(cfg.ckpt)
    extra = ckpt["braindecode_fw"]
    train_cfg = OmegaConf.create(extra["config"])
    if cfg.get("evaluation") is not None:
        train_cfg.evaluation = cfg.evaluation
    store = cfg.store or train_cfg.dataset.store
    dm = build_datamodule(train_cfg, Path(store))
    if dm.store is not None and extra.get("dataset_version") not in (None, dm.store.version):
        log.warning("evaluating on dataset version %s; the checkpoint was trained on %s",
                    dm.store.version, extra["dataset_version"])
    decoder = build_model(train_cfg, extra["n_features"], {k: tuple(v) for k, v in extra["target_shapes"].items()})
    state = {k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
    decoder.load_state_dict(state)
    report = evaluate_predictions(train_cfg, dm, decoder)
    out_dir = Path(cfg.paths.output_dir)
    paths = write_report(report, out_dir)
    print(format_table(report))
    print(f"results: {', '.join(map(str, paths))}")
    return report
