"""One training run, shared by ``bdf-train`` and ``bdf-adapt``: the run folder and seeds, the
Lightning trainer with the configured callbacks and loggers, the best checkpoint reloaded and scored
on the test split, the report, preview grid and ``result.json`` (written last: its presence means
success)."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.errors import ConfigError
from braindecode_fw.io import atomic_write_json, atomic_write_text
from braindecode_fw.lit import DecoderModule
from braindecode_fw.metrics.report import format_table, write_report
from braindecode_fw.models.decoder import Decoder
from braindecode_fw.ops.distributed import is_rank_zero
from braindecode_fw.ops.loggers import build_loggers
from braindecode_fw.ops.resume import AtomicCheckpointIO
from braindecode_fw.pipeline.build import count_parameters
from braindecode_fw.pipeline.checkpoint import load_checkpoint
from braindecode_fw.pipeline.evaluation import evaluate_predictions
from braindecode_fw.pipeline.fast_path import (
    FastPath,
    compile_decoder,
    fused_optimizer_factory,
    resolve_precision,
)

log = logging.getLogger(__name__)


class EpochLogger(L.Callback):
    """One plain log line per epoch (used when stdout is not a terminal, instead of a bar)."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        parts = [f"{k}={float(v):.4f}" for k, v in sorted(m.items()) if k.count("/") == 1]
        log.info("epoch %d (%.0f s): %s", trainer.current_epoch, time.perf_counter() - self._t0, " ".join(parts))


def build_callbacks(cfg: DictConfig, run_dir: Path) -> tuple[list[L.Callback], Any]:
    callbacks: list[L.Callback] = []
    checkpoint = None
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if str(node.get("_target_", "")).endswith("ModelCheckpoint"):
            callbacks.append(instantiate(node, dirpath=str(run_dir / "checkpoints")))
            if name == "model_checkpoint":  # the best-by-validation one the test evaluation reloads
                checkpoint = callbacks[-1]
        elif name == "image_grid":  # draws reconstructions with the run's generator
            callbacks.append(instantiate(node, generator=cfg.get("generator"), _recursive_=False))
        else:
            callbacks.append(instantiate(node))
    if sys.stdout.isatty():
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    else:
        callbacks.append(EpochLogger())
    return callbacks, checkpoint


def start_run(cfg: DictConfig) -> Path:
    """The run directory (created), global seeds and matmul precision of a training-like task."""
    run_dir = Path(cfg.paths.output_dir)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    return run_dir


def fit_and_evaluate(cfg: DictConfig, dm: BrainDataModule, decoder: Decoder, *, run_dir: Path,
                     checkpoint_config: dict[str, Any], t_start: float,
                     n_features: dict[str, int] | None = None, resume_from: str | None = None) -> dict[str, Any]:
    """Train ``decoder`` on ``dm`` with ``cfg.loss``/``cfg.optim``/``cfg.trainer`` (continuing from
    the checkpoint ``resume_from``, if given), reload the best checkpoint, evaluate retrieval on the
    test split; rank zero then exports what the decoder writes after training
    (:meth:`~braindecode_fw.models.decoder.Decoder.export_trained_parts`, e.g. NeuroPictor's
    ControlNet) and writes the report, the preview grid and ``result.json``. Returns the test metrics
    (shared by ``bdf-train`` and ``bdf-adapt``). ``n_features`` (default: the data's subjects) is
    what the checkpoint records as the decoder's subjects."""
    fast = FastPath.from_config(cfg.get("fast_path"))
    module = build_module(cfg, dm, decoder, checkpoint_config, n_features, fast=fast)
    callbacks, checkpoint = build_callbacks(cfg, run_dir)
    loggers = build_loggers(cfg.get("logger"), run_dir, resume_from=resume_from)
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), fast, str(cfg.trainer.get("accelerator", "auto")))
    if precision != cfg.trainer.get("precision", "32-true"):
        log.info("fast_path.bf16=%s: trainer.precision %s -> %s (this hardware multiplies bf16 matrices)",
                 fast.bf16, cfg.trainer.get("precision"), precision)
    compile_decoder(decoder, fast)
    try:
        trainer: L.Trainer = instantiate(
            cfg.trainer, precision=precision, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False,
            enable_progress_bar=sys.stdout.isatty(), use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
        )
    except InstantiationException as e:
        # Lightning validates its arguments in the constructor (trainer.precision=banana,
        # trainer.accelerator=tpuu): a ValueError there is a mistake in the trainer.* keys
        if isinstance(e.__cause__, ValueError):
            raise ConfigError(f"trainer: {e.__cause__}") from e
        raise
    n_params = count_parameters(decoder)
    log_hyperparameters(loggers, checkpoint_config, n_params, resumed=resume_from is not None)
    target = cfg.target.feature_name
    log.info("decoder: %s parameters; subjects %s; target %s %s", f"{n_params['total']:,}",
             dm.n_features, target, dm.target_shapes[target])
    trainer.fit(module, datamodule=dm, ckpt_path=resume_from)

    eval_ckpt = reload_best(module, checkpoint, run_dir)
    reports = evaluate_splits(cfg, dm, module.decoder)
    metrics = split_metrics(reports)
    result = {**metrics, "run_dir": str(run_dir), "checkpoint": eval_ckpt, "report": reports["test"]}
    if not trainer.is_global_zero:  # run-level files and the summary are rank zero's
        return result
    # from the reloaded best weights, before the preview grid (a generator may load the export)
    exports = module.decoder.export_trained_parts(run_dir)
    result["exports"] = exports
    for split, rep in reports.items():
        write_report(rep, run_dir, stem="retrieval" if split == "test" else f"retrieval_{split}")
    grid, image_metrics = draw_preview(cfg, dm, module.decoder, run_dir, loggers)
    if image_metrics is not None:
        metrics.update({f"test/recon_{k}": v for k, v in image_metrics["metrics"].items()})
    for lg in loggers:
        lg.log_metrics(metrics, step=trainer.global_step)
        lg.save()
    print_summary(cfg, reports, image_metrics, run_dir=run_dir, checkpoint=eval_ckpt, exports=exports, grid=grid,
                  dashboard=any(type(lg).__name__ == "TensorBoardLogger" for lg in loggers),
                  elapsed=time.perf_counter() - t_start)
    write_result(cfg, run_dir, metrics, exports)
    return result


def build_module(cfg: DictConfig, dm: BrainDataModule, decoder: Decoder, checkpoint_config: dict[str, Any],
                 n_features: dict[str, int] | None = None, fast: FastPath | None = None) -> DecoderModule:
    """The LightningModule training ``decoder`` with the run's loss, optimiser and schedule, and
    what its checkpoints record beside the weights: the config, the decoder's subjects and voxel
    counts, the target and auxiliary output shapes, the store version. The optimiser is the fused
    kernel where ``fast_path.fused_optimizer`` allows (braindecode_fw/pipeline/fast_path.py; ``fast``:
    that node, already read by the caller, else read from ``cfg``)."""
    fast = fast or FastPath.from_config(cfg.get("fast_path"))
    return DecoderModule(
        decoder,
        loss=instantiate(cfg.loss),
        target=cfg.target.feature_name,
        optimizer=fused_optimizer_factory(instantiate(cfg.optim.optimizer), fast),
        nan_check=fast.nan_check,
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        val_subset_size=cfg.evaluation.subset_size,
        weight_decay_groups=cfg.optim.get("weight_decay_groups", "adapters_and_matrices"),
        scale_lr_by_devices=bool(cfg.optim.get("scale_lr_by_devices", False)),
        checkpoint_extra={
            "config": checkpoint_config,
            "n_features": n_features or dm.n_features,
            "target_shapes": {k: list(v) for k, v in dm.target_shapes.items()},
            # outputs not named after a target that generators read (NeuroPictor's control map)
            "auxiliary_output_shapes": {k: list(v) for k, v in decoder.auxiliary_output_shapes().items()},
            "dataset_version": dm.store.version if dm.store else None,
        },
    )


def log_hyperparameters(loggers: list[Any], checkpoint_config: dict[str, Any], n_params: dict[str, int], *,
                        resumed: bool) -> None:
    """The flattened config and parameter counts, to every logger (not again to a continued W&B
    or MLflow run: it has them, and MLflow refuses changed ones)."""
    for lg in loggers:
        if resumed and type(lg).__name__ in ("WandbLogger", "MLFlowLogger"):
            continue
        lg.log_hyperparams({**_flatten(checkpoint_config), "params/total": n_params["total"],
                            "params/trainable": n_params["trainable"]})


def reload_best(module: DecoderModule, checkpoint: Any, run_dir: Path) -> str:
    """Load the best-by-validation checkpoint into ``module`` (else ``last.ckpt``); returns its path,
    or "" when checkpointing is off and the final weights are evaluated."""
    best = checkpoint.best_model_path if checkpoint is not None else ""
    last = str(run_dir / "checkpoints" / "last.ckpt")
    eval_ckpt = best or (last if Path(last).exists() else "")
    if eval_ckpt:
        module.load_state_dict(load_checkpoint(eval_ckpt)["state_dict"])
    return eval_ckpt


def evaluate_splits(cfg: DictConfig, dm: BrainDataModule, decoder: Decoder) -> dict[str, dict[str, Any]]:
    """Retrieval reports by split: ``test`` (with the linear baseline if configured) and, where the
    store has it, ``test_large``."""
    lb = cfg.evaluation.get("linear_baseline")
    reports = {"test": evaluate_predictions(cfg, dm, decoder, baseline=bool(lb and lb.enabled))}
    if dm.has_split("test_large"):
        reports["test_large"] = evaluate_predictions(cfg, dm, decoder, "test_large")
    return reports


def split_metrics(reports: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``<split>/<metric>`` of each report's mean row and ``<split>/<direction>/<subject>`` top-1 of
    each subject row: what loggers, ``result.json`` and sweeps read."""
    metrics: dict[str, float] = {}
    for split, rep in reports.items():
        metrics.update({f"{split}/{k}": float(v) for k, v in rep["rows"][-1].items() if isinstance(v, float)})
        for row in rep["rows"][:-1]:
            for d in ("brain_to_image_top1", "image_to_brain_top1"):
                metrics[f"{split}/{d}/{row['subject']}"] = float(row[d])
    return metrics


def draw_preview(cfg: DictConfig, dm: BrainDataModule, decoder: Decoder, run_dir: Path,
                 loggers: list[Any]) -> tuple[Path | None, dict[str, Any] | None]:
    """With ``reconstruction.enabled`` and a generator: the preview grid of test reconstructions
    (and its image metrics, written to ``reconstruction_metrics.json``). Returns (grid path, image
    metrics), each None when not drawn."""
    rc = cfg.get("reconstruction")
    if rc is None or not rc.enabled or cfg.get("generator") is None:
        return None, None
    from braindecode_fw.pipeline.generation import preview_grid

    grid, image_metrics = preview_grid(
        cfg.generator, dm, decoder, cfg.target.feature_name, run_dir / "reconstructions_grid.png",
        n_images=rc.n_images, seed=rc.seed, loggers=loggers, n_metric_images=int(rc.get("n_metric_images") or 0),
        metrics_cfg=rc.get("metrics"), lowlevel_cfg=rc.get("lowlevel"))
    if image_metrics is not None:
        atomic_write_json(run_dir / "reconstruction_metrics.json", image_metrics)
    return grid, image_metrics


def print_summary(cfg: DictConfig, reports: dict[str, dict[str, Any]], image_metrics: dict[str, Any] | None, *,
                  run_dir: Path, checkpoint: str, exports: dict[str, str], grid: Path | None, dashboard: bool,
                  elapsed: float) -> None:
    """The console summary of a finished run: the retrieval tables, image metrics and where
    everything was written."""
    print()
    print(format_table(reports["test"]))
    if "test_large" in reports:
        print()
        print("large test set (single trials of held-out concepts)")
        print(format_table(reports["test_large"]))
    if image_metrics is not None:
        from braindecode_fw.pipeline.generation import format_image_metrics

        print()
        print(format_image_metrics(image_metrics, cfg.generator.name))
    print()
    print(f"run directory : {run_dir}")
    print(f"checkpoint    : {checkpoint or '(checkpointing disabled)'}")
    print(f"results       : {run_dir / 'retrieval.json'}, {run_dir / 'retrieval.csv'}")
    for name, path in exports.items():
        print(f"{name:<14}: {path}")
    if grid is not None:
        print(f"reconstructions: {grid}")
    if dashboard:
        print(f"dashboard     : bdf-dashboard run={run_dir}")
    print(f"wall time     : {elapsed:.0f} s")


def write_result(cfg: DictConfig, run_dir: Path, metrics: dict[str, float],
                 exports: dict[str, str] | None = None) -> Path | None:
    """``<run dir>/result.json``: the optimised metric and every test metric of a finished job, what
    sweep summaries and searches read, and ``exports`` (name -> path of what the decoder wrote after
    training). Written last, atomically: its presence means success. Not written when
    ``optimized_metric`` names no produced metric (the CLI then fails naming it)."""
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        return None
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests calling train() directly)
        overrides = []
    return atomic_write_json(run_dir / "result.json", {
        "task": cfg.get("task_name"), "optimized_metric": name, "value": metrics.get(name) if name else None,
        "metrics": metrics, "overrides": overrides, "run_dir": str(run_dir), "exports": dict(exports or {}),
    })


def save_config(config: dict[str, Any], path: Path) -> None:
    """The fully resolved config tree (Hydra's .hydra/config.yaml keeps the interpolations)."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(config)))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, list | tuple):
            out[key] = str(v)
        elif v is None or (isinstance(v, float) and math.isnan(v)):
            out[key] = "None"
        else:
            out[key] = v
    return out

