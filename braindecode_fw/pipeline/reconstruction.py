"""Images from held-out brain data (``bdf-reconstruct``): the decoder of a checkpoint runs on the
test split (repetitions averaged as in training), a generator turns its predictions into
``n_samples`` images per test image with per-image seeds (optionally keeping the one closest to the
*predicted* embedding), and a :class:`~braindecode_fw.data.reconstructions.ReconstructionWriter`
folder collects them (docs/data_format.md), rewritten after every batch so that rerunning with the
same ``out=`` resumes. A comparison grid (ground truth | low-level | final) goes to the folder and
the configured loggers; ``evaluate=true`` adds the evaluation table.

``lowlevel=dip`` adds Brain-IT's low-level stage (docs/methods/brainit.md §6 step 1 -> step 2): the
decoder's predicted VGG tokens of each batch to generate are inverted into images (Deep Image Prior,
:class:`~braindecode_fw.generation.feature_inversion.FeatureInverter`) that the generator starts
from (``lowlevel_target``, ``lowlevel_kind: image``, ``strength`` < 1).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from braindecode_fw.contracts import GENERATED_FINAL, GENERATED_LOWLEVEL
from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.data.reconstructions import ReconstructionWriter, open_reconstructions
from braindecode_fw.errors import ConfigError
from braindecode_fw.generation.feature_inversion import FeatureInverter
from braindecode_fw.generation.reconstructor import Reconstructor, select_best_samples
from braindecode_fw.metrics.images import as_float_images, load_images
from braindecode_fw.models.decoder import Decoder
from braindecode_fw.ops.loggers import build_loggers, log_image
from braindecode_fw.pipeline.build import build_datamodule, build_model
from braindecode_fw.pipeline.checkpoint import check_checkpoint_store, load_checkpoint
from braindecode_fw.pipeline.generation import (
    _grid_columns,
    _warn_other_vgg_weights,
    build_generator,
    check_generation,
    conditioning_sources,
    generation_inputs,
    generator_inputs,
    image_seed,
    lowlevel_images,
)
from braindecode_fw.viz.grids import comparison_grid, save_png

log = logging.getLogger(__name__)


@dataclass
class ReconstructionJob:
    """Everything one ``bdf-reconstruct`` run generates from, built and checked before the first
    image: the training run's config and checkpoint extras, the decoder with its weights, the
    store's datamodule, the generator (and the low-level inverter, if any), and per subject the
    decoder's test predictions and the generator inputs computed from them."""

    train_cfg: DictConfig
    checkpoint_extra: dict[str, Any]
    store_path: Path
    dm: BrainDataModule
    decoder: Decoder
    generator: Reconstructor
    inverter: FeatureInverter | None
    target: str
    preds: dict[str, dict[str, Any]]
    conditioning: dict[str, dict[str, np.ndarray]]
    subjects: list[str]


def prepare_job(cfg: DictConfig) -> ReconstructionJob:
    """Load ``cfg.ckpt``, build the generator and check it against what the decoder provides
    (before any data work: a mismatch is a config error), then predict the test split."""
    from braindecode_fw.lit import predict
    from braindecode_fw.metrics.published import check_test_set

    check_test_set(cfg.get("test_set"))
    ckpt = load_checkpoint(cfg.ckpt)
    extra = ckpt["braindecode_fw"]
    train_cfg = OmegaConf.create(extra["config"])
    target_shapes = {k: tuple(v) for k, v in extra["target_shapes"].items()}
    # what the decoder outputs: one per target plus auxiliary ones (NeuroPictor's control map)
    provides = {**target_shapes, **{k: tuple(v) for k, v in extra.get("auxiliary_output_shapes", {}).items()}}
    generator = build_generator(cfg.generator)
    inverter, available = check_generation(generator, provides, cfg.get("lowlevel"))
    names = [n for n in generator_inputs(generator, available)
             if inverter is None or n != inverter.output]  # the low-level image is computed per batch
    if inverter is not None:
        _warn_other_vgg_weights(inverter, train_cfg)
    if cfg.split != "test":
        raise ConfigError(f"split: only the held-out 'test' split is reconstructed, got {cfg.split!r}")
    store_path = Path(cfg.store or train_cfg.dataset.store)
    check_checkpoint_store(extra, cfg.ckpt, store_path, allow_other_store=bool(cfg.get("allow_other_store", False)))
    dm = build_datamodule(train_cfg, store_path)
    assert dm.store is not None
    decoder = build_model(train_cfg, extra["n_features"], target_shapes)  # built from the targets only
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items()
                             if k.startswith("decoder.")})
    target = train_cfg.target.feature_name
    sources = conditioning_sources(decoder, names)
    preds = predict(decoder, dm.test_dataloader(), target, outputs=[o for o in sources.values() if o != target])
    subjects = list(cfg.subjects) if cfg.subjects else sorted(preds)
    unknown = sorted(set(subjects) - set(preds))
    if unknown:
        raise ConfigError(f"subjects: {unknown} have no test data; available: {sorted(preds)}")
    return ReconstructionJob(train_cfg=train_cfg, checkpoint_extra=extra, store_path=store_path, dm=dm,
                             decoder=decoder, generator=generator, inverter=inverter, target=target, preds=preds,
                             conditioning=generation_inputs(dm, decoder, preds, target, sources), subjects=subjects)


def open_writer(cfg: DictConfig, job: ReconstructionJob, out_dir: Path) -> ReconstructionWriter:
    """The reconstruction folder, recording the store, its version, the test set, the generator and
    both configs (an existing folder of the same job is continued)."""
    store = job.dm.store
    test_set = cfg.get("test_set") or store.meta.get("provenance", {}).get("test_set")
    return ReconstructionWriter(
        out_dir, store=job.store_path, dataset_version=store.version, test_set=test_set,
        generator={"name": job.generator.name, "class": type(job.generator).__name__,
                   "model": str(cfg.generator.model)},
        config={"reconstruct": OmegaConf.to_container(cfg, resolve=True), "train": job.checkpoint_extra["config"]})


def generate_batch(cfg: DictConfig, job: ReconstructionJob, inputs: dict[str, torch.Tensor], idx: np.ndarray,
                   encoder: Any) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
    """``cfg.n_samples`` images per row of one batch, seeded per image and sample. Returns the kept
    images ``(b, k, 3, H, W)`` in [0, 1] (k = 1 when ``encoder`` selects the sample closest to the
    predicted embedding, else n_samples), the sample index each kept image 0 came from, and the
    generator's low-level images ``(b, 3, H, W)`` (None if it makes none)."""
    samples, lowlevel = [], None
    for k in range(cfg.n_samples):
        out = job.generator.reconstruct(inputs, [image_seed(cfg.seed, i, k) for i in idx])
        samples.append(out[GENERATED_FINAL])
        lowlevel = out.get(GENERATED_LOWLEVEL, lowlevel)
    stacked = torch.stack(samples, dim=1)
    if encoder is None:
        return stacked, np.zeros(len(idx), dtype=int), lowlevel
    chosen, _ = select_best_samples(stacked, inputs[job.target], encoder.encode)
    return stacked[torch.arange(len(idx)), torch.as_tensor(chosen)][:, None], np.asarray(chosen), lowlevel


def _as_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 (what the folder stores as PNG)."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def reconstruct_subject(cfg: DictConfig, job: ReconstructionJob, writer: ReconstructionWriter, subject: str,
                        encoder: Any) -> int:
    """Generate every test image of ``subject`` the folder does not hold yet (the first
    ``cfg.limit`` by image index), flushing the manifest after each batch. Returns the images written."""
    from tqdm.auto import tqdm

    p = job.preds[subject]
    ids = job.dm.store.image_metadata["ids"]
    order = np.argsort(p["image_index"], kind="stable")
    if cfg.limit:
        order = order[: cfg.limit]
    writer.add_embeddings(subject, torch.from_numpy(p["pred"][order]), torch.from_numpy(p["target"][order]))
    kept = 1 if encoder is not None else cfg.n_samples
    todo = [j for j in order if not all(writer.has(subject, p["image_index"][j], k) for k in range(kept))]
    n_written = 0
    with tqdm(total=len(todo), desc=f"{subject}", unit="img", disable=not cfg.progress) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            rows = np.asarray(todo[start : start + cfg.batch_size])
            idx = p["image_index"][rows]
            inputs = {n: torch.from_numpy(v[rows]) for n, v in job.conditioning[subject].items()}
            if job.inverter is not None:  # per batch to generate: a resumed run inverts only what it still needs
                inputs[job.inverter.output] = lowlevel_images(job.decoder, job.dm.test_dataloader(), job.target,
                                                              job.inverter, subject, idx)
            images, chosen, lowlevel = generate_batch(cfg, job, inputs, idx, encoder)
            for b, i in enumerate(idx):
                low = None if lowlevel is None else _as_uint8(lowlevel[b])
                for k in range(images.shape[1]):
                    seed_k = int(chosen[b]) if encoder is not None else k
                    writer.add(subject, int(i), str(ids[i]), _as_uint8(images[b, k]), sample=k,
                               seed=image_seed(cfg.seed, i, seed_k), lowlevel=low)
                    n_written += 1
            writer.flush()
            bar.update(len(rows))
    return n_written


def write_comparison_grid(cfg: DictConfig, job: ReconstructionJob, recs: Any, out_dir: Path) -> Path | None:
    """``<out>/grid.png`` (ground truth | low-level | final) of the first ``grid.n`` test images of
    the first subject of the reconstruction folder ``recs`` (:func:`open_reconstructions`), also
    logged to the configured loggers; None when there is nothing to show."""
    items = recs.select(job.subjects[0])[: cfg.grid.n]
    if not items:
        return None
    size = cfg.grid.cell
    gts = as_float_images(job.dm.store.images[np.array([i.image_index for i in items])])
    low = (load_images([out_dir / i.lowlevel_path for i in items], size)
           if all(i.lowlevel_path for i in items) else None)
    grid = comparison_grid(_grid_columns(gts, low, load_images([out_dir / i.path for i in items], size)), cell=size)
    grid_path = save_png(grid, out_dir / "grid.png")
    loggers = build_loggers(cfg.get("logger"), Path(cfg.paths.output_dir))
    log_image(loggers, "reconstruct/grid", grid)
    for logger in loggers:
        logger.finalize("success")
    return grid_path


def reconstruct(cfg: DictConfig) -> dict[str, Any]:
    """The ``bdf-reconstruct`` job; returns a summary (folder, images written now and in total,
    grid, seconds, and the evaluation table with ``evaluate=true``)."""
    t_start = time.perf_counter()
    job = prepare_job(cfg)
    out_dir = Path(cfg.out or Path(cfg.paths.output_dir) / "reconstructions")
    writer = open_writer(cfg, job, out_dir)
    encoder = instantiate(job.train_cfg.target) if cfg.select_best and cfg.n_samples > 1 else None
    n_written = sum(reconstruct_subject(cfg, job, writer, subject, encoder) for subject in job.subjects)
    writer.flush()
    recs = open_reconstructions(out_dir)
    grid_path = write_comparison_grid(cfg, job, recs, out_dir)
    n_items = len(recs.items)
    elapsed = time.perf_counter() - t_start
    summary = {"out": str(out_dir), "written": n_written, "items": n_items, "grid": str(grid_path),
               "seconds": round(elapsed, 1)}
    per_image = f", {elapsed / n_written:.2f} s per image" if n_written else ""
    print(f"reconstructions: {out_dir} ({n_written} new images, {n_items} in total, {elapsed:.0f} s{per_image})")
    print(f"grid          : {grid_path}")
    if cfg.evaluate:
        from braindecode_fw.pipeline.evaluation import evaluate

        ev_cfg = cfg.copy()
        with open_dict(ev_cfg):
            ev_cfg.run, ev_cfg.recon_dir, ev_cfg.gt_dir, ev_cfg.ckpt = str(out_dir), None, None, None
            ev_cfg.paths.output_dir = str(out_dir / "evaluation")
        summary["evaluation"] = evaluate(ev_cfg)
    return summary
