"""``bdf-train``: prepare data if needed, train a decoder, evaluate retrieval on the test split."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from braindecode_fw.data.prepare import ensure_store
from braindecode_fw.errors import ConfigError
from braindecode_fw.io import atomic_write_json
from braindecode_fw.ops.distributed import is_rank_zero
from braindecode_fw.ops.resume import check_resume_config, resolve_resume
from braindecode_fw.pipeline.build import build_datamodule, build_model
from braindecode_fw.pipeline.checkpoint import load_checkpoint
from braindecode_fw.pipeline.fitting import fit_and_evaluate, save_config, start_run

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the test metrics (``test/...``) plus paths."""
    t_start = time.perf_counter()
    own_dir = start_run(cfg)
    resume_from, run_dir = resolve_resume(cfg.get("ckpt_path"), cfg.get("resume", "auto"), own_dir,
                                          Path(cfg.paths.log_dir) / cfg.task_name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trained_on = None
    if resume_from:  # before anything is written, least of all into the run being continued
        trained_on = load_checkpoint(resume_from, "ckpt_path")["braindecode_fw"]
        changed = check_resume_config(trained_on.get("config") or {}, resolved, resume_from=resume_from,
                                      continued_run=run_dir if run_dir != own_dir else None,
                                      allow_changes=bool(cfg.get("resume_with_changes", False)))
        if changed:
            log.warning("continuing from %s with settings other than it was trained with: %s", resume_from, changed)
    warm_weights = None
    if cfg.get("init_from") and not resume_from:  # read before any data work: a bad file fails first
        from braindecode_fw.ops.warm_start import read_decoder_weights

        warm_weights = read_decoder_weights(cfg.init_from)
    store = ensure_store(cfg.dataset)
    dm = build_datamodule(cfg, store)
    if trained_on is not None and dict(trained_on.get("n_features") or {}) != dm.n_features:
        raise ConfigError(f"ckpt_path: {resume_from} was trained on subjects with feature counts "
                         f"{trained_on.get('n_features')}; {store} gives {dm.n_features}")
    decoder = build_model(cfg, dm.n_features, dm.target_shapes)
    if resume_from:
        decoder.use_saved_artifacts(Path(resume_from).parents[1])  # the run the checkpoint belongs to
    decoder.configure_from_data(dm)
    if warm_weights is not None:  # a continued run restores its own weights instead
        from braindecode_fw.ops.warm_start import load_matching_weights

        warm = load_matching_weights(decoder, cfg.init_from, warm_weights)
        if is_rank_zero():
            atomic_write_json(run_dir / "init_from.json", warm)
    if is_rank_zero():
        decoder.save_artifacts(run_dir)  # what configure_from_data made, e.g. Brain-IT's stage 0
        save_config(resolved, run_dir / "config_resolved.yaml")
    result = fit_and_evaluate(cfg, dm, decoder, run_dir=run_dir, checkpoint_config=resolved, t_start=t_start,
                              resume_from=resume_from)
    if run_dir != own_dir and is_rank_zero():
        file_continuation_folder(own_dir, run_dir)
    return result


def file_continuation_folder(own_dir: Path, run_dir: Path) -> Path | None:
    """After ``ckpt_path=last`` continued ``run_dir``: this job's own Hydra folder holds only its
    ``.hydra/`` config and log; move them into ``<run_dir>/continued/<folder name>/`` so that no
    empty run folder is left beside the run that was continued. Returns the new place (None when
    the folder holds more than that and is left as it is)."""
    if not own_dir.is_dir() or any(p.name != ".hydra" and not (p.is_file() and p.suffix == ".log")
                                   for p in own_dir.iterdir()):
        return None
    target = run_dir / "continued" / own_dir.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(own_dir, target)  # the open log file moves with it (same file system) and keeps logging
    log.info("this continuation's config and log: %s", target)
    return target
