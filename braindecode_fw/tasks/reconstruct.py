"""``bdf-reconstruct ckpt=<decoder checkpoint> generator=<name>``: images from held-out brain data.

Runs the decoder on the test split (repetitions averaged as in training), checks that it provides
what the generator needs, generates ``n_samples`` images per test image with per-image seeds
(optionally keeping the one closest to the *predicted* embedding), and writes a reconstruction
folder (docs/data_format.md): PNGs, retrieval embeddings, a manifest rewritten after every batch
(rerunning with the same ``out=`` resumes), a comparison grid (ground truth | low-level | final)
logged to the configured loggers, and optionally the evaluation table (``evaluate=true``).

``lowlevel=dip`` adds Brain-IT's low-level stage (docs/methods/brainit.md §6 step 1 -> step 2): the decoder's
predicted VGG tokens of each batch to generate are inverted into images (Deep Image Prior,
:class:`~braindecode_fw.generation.feature_inversion.FeatureInverter`) that the generator starts
from (``lowlevel_target``, ``lowlevel_kind: image``, ``strength`` < 1).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from braindecode_fw.contracts import GENERATED_FINAL, GENERATED_LOWLEVEL
from braindecode_fw.data.reconstructions import ReconstructionWriter
from braindecode_fw.generation.reconstructor import select_best_samples
from braindecode_fw.metrics.images import as_float_images
from braindecode_fw.ops.loggers import build_loggers, log_image
from braindecode_fw.pipeline.build import build_datamodule, build_model
from braindecode_fw.pipeline.checkpoint import load_checkpoint
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


def reconstruct(cfg: DictConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from braindecode_fw.lit import predict

    t_start = time.perf_counter()
    ckpt = load_checkpoint(cfg.ckpt)
    extra = ckpt["braindecode_fw"]
    train_cfg = OmegaConf.create(extra["config"])
    target_shapes = {k: tuple(v) for k, v in extra["target_shapes"].items()}
    # what the decoder outputs: one per target plus auxiliary ones (NeuroPictor's control map)
    provides = {**target_shapes, **{k: tuple(v) for k, v in extra.get("auxiliary_output_shapes", {}).items()}}
    generator = build_generator(cfg.generator)
    # before any data work: a mismatch is a config error
    inverter, available = check_generation(generator, provides, cfg.get("lowlevel"))
    names = [n for n in generator_inputs(generator, available)
             if inverter is None or n != inverter.output]  # the low-level image is computed per batch below
    if inverter is not None:
        _warn_other_vgg_weights(inverter, train_cfg)
    store_path = Path(cfg.store or train_cfg.dataset.store)
    dm = build_datamodule(train_cfg, store_path)
    assert dm.store is not None
    if cfg.split != "test":
        raise ValueError(f"split: only the held-out 'test' split is reconstructed, got {cfg.split!r}")
    decoder = build_model(train_cfg, extra["n_features"], target_shapes)  # built from the targets only
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items()
                             if k.startswith("decoder.")})
    target = train_cfg.target.feature_name
    sources = conditioning_sources(decoder, names)
    preds = predict(decoder, dm.test_dataloader(), target, outputs=[o for o in sources.values() if o != target])
    conditioning = generation_inputs(dm, decoder, preds, target, sources)
    subjects = list(cfg.subjects) if cfg.subjects else sorted(preds)
    unknown = sorted(set(subjects) - set(preds))
    if unknown:
        raise ValueError(f"subjects: {unknown} have no test data; available: {sorted(preds)}")

    out_dir = Path(cfg.out or Path(cfg.paths.output_dir) / "reconstructions")
    test_set = cfg.get("test_set") or dm.store.meta.get("provenance", {}).get("test_set")
    writer = ReconstructionWriter(
        out_dir, store=store_path, dataset_version=dm.store.version, test_set=test_set,
        generator={"name": generator.name, "class": type(generator).__name__,
                   "model": str(cfg.generator.model)},
        config={"reconstruct": OmegaConf.to_container(cfg, resolve=True), "train": extra["config"]})
    encoder = instantiate(train_cfg.target) if cfg.select_best and cfg.n_samples > 1 else None
    ids = dm.store.image_metadata["ids"]
    n_written = 0
    for subject in subjects:
        p = preds[subject]
        order = np.argsort(p["image_index"], kind="stable")
        if cfg.limit:
            order = order[: cfg.limit]
        writer.add_embeddings(subject, torch.from_numpy(p["pred"][order]), torch.from_numpy(p["target"][order]))
        kept = 1 if encoder is not None else cfg.n_samples
        todo = [j for j in order if not all(writer.has(subject, p["image_index"][j], k) for k in range(kept))]
        bar = tqdm(total=len(todo), desc=f"{subject}", unit="img", disable=not cfg.progress)
        for start in range(0, len(todo), cfg.batch_size):
            rows = np.asarray(todo[start : start + cfg.batch_size])
            idx = p["image_index"][rows]
            inputs = {n: torch.from_numpy(v[rows]) for n, v in conditioning[subject].items()}
            if inverter is not None:  # per batch to generate: a resumed run inverts only what it still needs
                inputs[inverter.output] = lowlevel_images(decoder, dm.test_dataloader(), target, inverter, subject, idx)
            samples, lowlevel = [], None
            for k in range(cfg.n_samples):
                out = generator.reconstruct(inputs, [image_seed(cfg.seed, i, k) for i in idx])
                samples.append(out[GENERATED_FINAL])
                lowlevel = out.get(GENERATED_LOWLEVEL, lowlevel)
            stacked = torch.stack(samples, dim=1)  # (b, n_samples, 3, H, W)
            if encoder is not None:
                chosen, _ = select_best_samples(stacked, inputs[target], encoder.encode)
                stacked = stacked[torch.arange(len(rows)), torch.as_tensor(chosen)][:, None]
            else:
                chosen = np.zeros(len(rows), dtype=int)
            for b, i in enumerate(idx):
                low = lowlevel[b] if lowlevel is not None else None
                for k in range(stacked.shape[1]):
                    img = (stacked[b, k].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                    seed_k = int(chosen[b]) if encoder is not None else k
                    writer.add(subject, int(i), str(ids[i]), img, sample=k, seed=image_seed(cfg.seed, i, seed_k),
                               lowlevel=None if low is None else
                               (low.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
                    n_written += 1
            writer.flush()
            bar.update(len(rows))
        bar.close()
    writer.flush()

    # the comparison grid: the first grid.n test images of the first subject
    from braindecode_fw.data.reconstructions import open_reconstructions
    from braindecode_fw.metrics.images import load_images

    recs = open_reconstructions(out_dir)
    items = recs.select(subjects[0])[: cfg.grid.n]
    if items:
        size = cfg.grid.cell
        gts = as_float_images(dm.store.images[np.array([i.image_index for i in items])])
        low = (load_images([out_dir / i.lowlevel_path for i in items], size)
               if all(i.lowlevel_path for i in items) else None)
        grid = comparison_grid(_grid_columns(gts, low, load_images([out_dir / i.path for i in items], size)),
                               cell=size)
        grid_path = save_png(grid, out_dir / "grid.png")
        loggers = build_loggers(cfg.get("logger"), Path(cfg.paths.output_dir))
        log_image(loggers, "reconstruct/grid", grid)
        for logger in loggers:
            logger.finalize("success")
    else:
        grid_path = None
    elapsed = time.perf_counter() - t_start
    summary = {"out": str(out_dir), "written": n_written, "items": len(recs.items), "grid": str(grid_path),
               "seconds": round(elapsed, 1)}
    per_image = f", {elapsed / n_written:.2f} s per image" if n_written else ""
    print(f"reconstructions: {out_dir} ({n_written} new images, {len(recs.items)} in total, {elapsed:.0f} s{per_image})")
    print(f"grid          : {grid_path}")
    if cfg.evaluate:
        from braindecode_fw.pipeline.evaluation import evaluate

        ev_cfg = cfg.copy()
        with open_dict(ev_cfg):
            ev_cfg.run, ev_cfg.recon_dir, ev_cfg.gt_dir, ev_cfg.ckpt = str(out_dir), None, None, None
            ev_cfg.paths.output_dir = str(out_dir / "evaluation")
        summary["evaluation"] = evaluate(ev_cfg)
    return summary
