"""``bdf-train``: prepare data if needed, train a decoder, evaluate retrieval on the test split."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from braindecode_fw.data.prepare import ensure_store
from braindecode_fw.io import atomic_write_json
from braindecode_fw.ops.distributed import is_rank_zero
from braindecode_fw.ops.resume import config_differences, resolve_resume
from braindecode_fw.pipeline.build import build_datamodule, build_model
from braindecode_fw.pipeline.fitting import fit_and_evaluate, save_config, start_run

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the test metrics (``test/...``) plus paths."""
    t_start = time.perf_counter()
    run_dir = start_run(cfg)
    resume_from, run_dir = resolve_resume(cfg.get("ckpt_path"), cfg.get("resume", "auto"), run_dir,
                                          Path(cfg.paths.log_dir) / cfg.task_name)
    store = ensure_store(cfg.dataset)
    dm = build_datamodule(cfg, store)
    decoder = build_model(cfg, dm.n_features, dm.target_shapes)
    if resume_from:
        decoder.use_saved_artifacts(Path(resume_from).parents[1])  # the run the checkpoint belongs to
    decoder.configure_from_data(dm)
    if cfg.get("init_from") and not resume_from:  # a continued run restores its own weights instead
        from braindecode_fw.ops.warm_start import load_matching_weights

        warm = load_matching_weights(decoder, cfg.init_from)
        if is_rank_zero():
            atomic_write_json(run_dir / "init_from.json", warm)
    if is_rank_zero():
        decoder.save_artifacts(run_dir)  # what configure_from_data made, e.g. Brain-IT's stage 0
    resolved = OmegaConf.to_container(cfg, resolve=True)
    previous = run_dir / "config_resolved.yaml"
    if resume_from and previous.is_file():
        changed = config_differences(OmegaConf.to_container(OmegaConf.load(previous)), resolved)
        if changed:
            log.warning("continuing %s with a different config than it started with: %s", run_dir, changed)
    if is_rank_zero():
        save_config(resolved, previous)
    return fit_and_evaluate(cfg, dm, decoder, run_dir=run_dir, checkpoint_config=resolved, t_start=t_start,
                            resume_from=resume_from)


