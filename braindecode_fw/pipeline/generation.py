"""Generation wiring: from a trained decoder's outputs to a generator's inputs.

Building a generator from its config, checking that the decoder provides what it needs (with an
optional low-level stage), choosing the decoder output that feeds each generator input, calibrating
predictions to the target statistics, low-level images by feature inversion, per-image seeds, and
the preview grid ``bdf-train`` draws after training (docs/reconstruction.md).
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
from braindecode_fw.errors import ConfigError
from braindecode_fw.generation.feature_inversion import FeatureInverter
from braindecode_fw.generation.reconstructor import (
    Reconstructor,
    format_shape,
    shape_fits,
)
from braindecode_fw.metrics.images import as_float_images
from braindecode_fw.models.decoder import Decoder
from braindecode_fw.ops.loggers import log_image
from braindecode_fw.ops.progress import Progress
from braindecode_fw.viz.grids import comparison_grid, save_png

log = logging.getLogger(__name__)


def build_generator(gen_cfg: DictConfig) -> Reconstructor:
    """Instantiate ``braindecode_fw/conf/generator/<name>``; a ``build_tiny`` spec builds the tiny pipeline into
    ``model`` first when that folder does not exist yet."""
    from braindecode_fw.generation.tiny import build_tiny_pipeline

    gen_cfg = gen_cfg.copy()
    tiny = gen_cfg.get("build_tiny")
    with open_dict(gen_cfg):
        gen_cfg.pop("build_tiny", None)
    if tiny is not None and not (Path(gen_cfg.model) / "model_index.json").is_file():
        log.info("building the tiny %s pipeline into %s", tiny.kind, gen_cfg.model)
        Path(gen_cfg.model).parent.mkdir(parents=True, exist_ok=True)
        spec = OmegaConf.to_container(tiny, resolve=True)
        build_tiny_pipeline(spec.pop("kind"), gen_cfg.model, **spec)
    return instantiate(gen_cfg)


def image_seed(base: int, image_index: int, sample: int) -> int:
    """Seed of one sample: fixed per (image, sample), independent of batching, subjects and resumes."""
    return int(base) + 1000 * int(image_index) + int(sample)


def _grid_columns(gts: torch.Tensor, lowlevel: torch.Tensor | None, final: torch.Tensor) -> dict[str, torch.Tensor]:
    columns = {"ground truth": gts}
    if lowlevel is not None:
        columns["low-level"] = lowlevel
    columns["final"] = final
    return columns


def check_generation(generator: Reconstructor, provides: dict[str, tuple[int, ...]],
                     lowlevel_cfg: DictConfig | dict[str, Any] | None = None
                     ) -> tuple[FeatureInverter | None, dict[str, tuple[int, ...]]]:
    """Check, before any data work, that the decoder outputs ``provides`` (name -> shape per item)
    feed ``generator``, through the low-level stage of ``lowlevel_cfg`` (braindecode_fw/conf/lowlevel/dip.yaml;
    None: none) when given: Brain-IT's inversion of the predicted VGG tokens into the image its
    generator starts from (docs/methods/brainit.md §6 step 1 -> step 2). The decoder must output
    ``lowlevel.source`` as tokens of a ``lowlevel.feature_size`` image, and the generator must read
    ``lowlevel.output`` as an image (``lowlevel_target``, ``lowlevel_kind: image``). Returns the
    inverter (or None) and the outputs the generator sees: ``provides`` plus ``lowlevel.output``
    ``(3, output_size, output_size)``. Raises a ValueError naming the config key."""
    inverter = None
    if lowlevel_cfg is not None:
        inverter = FeatureInverter.from_config(lowlevel_cfg)
        inverter.check_source(provides)
        if inverter.output in provides:
            raise ConfigError(f"lowlevel.output: {inverter.output!r} is already a decoder output; name the "
                             f"low-level image differently")
        provides = {**provides, inverter.output: inverter.output_shape}
    generator.check(provides)
    if inverter is not None:
        reads = {**generator.optional(), **generator.needs()}
        if inverter.output not in reads:
            raise ConfigError(f"lowlevel.output: generator {generator.name} does not read {inverter.output!r} (its "
                             f"inputs: {sorted(reads)}), so the low-level images would go unused; set "
                             f"generator.lowlevel_target={inverter.output} generator.lowlevel_kind=image")
        if not shape_fits(reads[inverter.output], inverter.output_shape):
            raise ConfigError(f"generator.lowlevel_kind: generator {generator.name} reads {inverter.output!r} as "
                             f"{format_shape(reads[inverter.output])}, the low-level stage gives images "
                             f"{format_shape(inverter.output_shape)}; set generator.lowlevel_kind=image")
    return inverter, provides


def fitting_stages(gen_cfg: DictConfig, target_shapes: dict[str, Any], what: str,
                   lowlevel_cfg: DictConfig | None = None) -> tuple[Reconstructor, FeatureInverter | None] | None:
    """The generator of ``gen_cfg`` and the low-level stage of ``lowlevel_cfg`` when the decoder's
    outputs (``target_shapes``) feed them (:func:`check_generation`); otherwise None, with a warning
    that ``what`` is skipped (training-time previews)."""
    generator = build_generator(gen_cfg)
    try:
        inverter, _ = check_generation(generator, {k: tuple(v) for k, v in target_shapes.items()}, lowlevel_cfg)
    except ValueError as e:
        log.warning("%s: %s", what, e)
        return None
    return generator, inverter


def fitting_generator(gen_cfg: DictConfig, target_shapes: dict[str, Any], what: str) -> Reconstructor | None:
    """The generator of ``gen_cfg`` when the decoder's outputs (``target_shapes``) provide what it
    needs; otherwise None, with a warning that ``what`` is skipped (training-time previews)."""
    fit = fitting_stages(gen_cfg, target_shapes, what)
    return None if fit is None else fit[0]


def _warn_other_vgg_weights(inverter: FeatureInverter, train_cfg: DictConfig) -> None:
    """A warning when ``lowlevel.vgg_weights`` is not the weights of the target the decoder learnt
    ``lowlevel.source`` from: the inversion would match the features of another network."""
    nodes = [train_cfg.get("target"), *(train_cfg.get("extra_targets") or {}).values()]
    for node in nodes:
        if node is not None and node.get("feature_name") == inverter.source and "weights" in node:
            if str(node.weights) != str(inverter.vgg_weights):
                log.warning("lowlevel.vgg_weights is %r, but the decoder's %r target was computed with %r: set "
                            "lowlevel.vgg_weights=%s unless both name the same weights", inverter.vgg_weights,
                            inverter.source, str(node.weights), node.weights)


def lowlevel_images(decoder: Any, loader: Any, target: str, inverter: FeatureInverter, subject: str,
                    image_index: Any) -> torch.Tensor:
    """The low-level images ``(n, 3, S, S)`` in [0, 1] of ``subject``'s test items showing
    ``image_index`` (``(n,)``, in that order; docs/methods/brainit.md §6 step 1). Only those items go through
    the decoder, and each batch's predicted ``inverter.source`` is inverted inside the prediction
    loop (:func:`braindecode_fw.lit.predict`'s ``derived``), so the tokens (7,190 × 512 floats per
    item for Brain-IT) are never collected. Seeds are per image (``lowlevel.seed + image index``)."""
    from braindecode_fw.lit import predict

    wanted = [int(i) for i in image_index]
    t0 = time.perf_counter()
    preds = predict(decoder, loader, target, items=[(subject, i) for i in wanted],
                    derived={inverter.output: lambda out, batch: inverter.invert_outputs(out, batch.image_index)})
    p = preds[subject]
    row = {int(i): r for r, i in enumerate(p["image_index"])}
    log.info("inverted %d low-level images of %s in %.1f s", len(wanted), subject, time.perf_counter() - t0)
    return torch.from_numpy(p["outputs"][inverter.output][[row[i] for i in wanted]])


def generator_inputs(generator: Reconstructor, available: Any) -> list[str]:
    """The outputs ``generator`` reads (required, then optional) among ``available``."""
    return [n for n in list(generator.needs()) + list(generator.optional()) if n in available]


def conditioning_sources(decoder: Decoder, names: list[str]) -> dict[str, str]:
    """Generator input -> the decoder output that feeds it
    (:meth:`~braindecode_fw.models.decoder.Decoder.generation_output`: the regression head's
    output where the decoder has one, e.g. the MEG module; otherwise the output of the same name)."""
    return {n: decoder.generation_output(n) for n in names}


def calibrate_to_targets(pred: np.ndarray, mean: np.ndarray, std: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Benchetrit et al.'s de-standardisation before generation (docs/methods/meg_brainmodule.md §4): z-score every
    feature over the predictions ``(n, *shape)``, then give it the training targets' ``mean`` and
    ``std`` (``shape`` each), so a regression output shrunk towards the mean regains the scale the
    generator was trained on. Needs several predictions (all test items, not one)."""
    p = np.asarray(pred, dtype=np.float64)
    z = (p - p.mean(0)) / np.maximum(p.std(0), eps)
    return (z * std + mean).astype(np.float32)


def generation_inputs(dm: Any, decoder: Any, preds: dict[str, dict[str, Any]], target: str,
                      sources: dict[str, str]) -> dict[str, dict[str, np.ndarray]]:
    """Per subject, generator input name -> ``(n, *shape)`` array over all its predicted test items,
    from :func:`braindecode_fw.lit.predict`'s ``preds``; regression outputs are calibrated to the
    training targets' statistics (:func:`calibrate_to_targets`)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for subject, p in preds.items():
        out[subject] = {}
        for name, source in sources.items():
            value = p["pred"] if source == target else p["outputs"][source]
            if source != name:  # a regression head's output
                mean, std = dm.target_statistics(name)
                value = calibrate_to_targets(value, mean, std)
            out[subject][name] = value
    return out


def preview_grid(gen_cfg: DictConfig, dm: Any, decoder: Any, target: str, path: Path, *, n_images: int = 8,
                 seed: int = 0, loggers: list[Any] | None = None, n_metric_images: int = 0,
                 metrics_cfg: DictConfig | None = None,
                 lowlevel_cfg: DictConfig | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """After training: reconstruct the first subject's test images (by image index); the first
    ``n_images`` make a ground truth | (low-level |) final grid at ``path``, the first
    ``n_metric_images`` are scored with the ``metrics_cfg`` suite (braindecode_fw/conf/metrics/; e.g. PixCorr, SSIM,
    two-way CLIP). ``lowlevel_cfg``: the low-level stage (braindecode_fw/conf/lowlevel/dip.yaml, as in
    bdf-reconstruct; it inverts all those images). Returns (grid path, ``{"subject", "n_images",
    "metrics": {key: mean}, "ci95", "labels"}``); (None, None) with a warning when the generator or
    the low-level stage does not fit the decoder's outputs."""
    from braindecode_fw.lit import predict

    provides = {**dm.target_shapes, **decoder.auxiliary_output_shapes()}  # e.g. NeuroPictor's control map
    fit = fitting_stages(gen_cfg, provides, "no reconstruction grid", lowlevel_cfg)
    if fit is None:
        return None, None
    generator, inverter = fit
    sources = conditioning_sources(decoder, generator_inputs(generator, provides))
    preds = predict(decoder, dm.test_dataloader(), target, outputs=[o for o in sources.values() if o != target])
    subject = sorted(preds)[0]
    p = preds[subject]
    n_metric_images = n_metric_images if metrics_cfg is not None else 0
    rows = np.argsort(p["image_index"], kind="stable")[:max(n_images, n_metric_images)]
    idx = p["image_index"][rows]
    values = generation_inputs(dm, decoder, {subject: p}, target, sources)[subject]
    inputs = {n: torch.from_numpy(v[rows]) for n, v in values.items()}
    if inverter is not None:
        inputs[inverter.output] = lowlevel_images(decoder, dm.test_dataloader(), target, inverter, subject, idx)
    t0 = time.perf_counter()
    with Progress(len(idx), f"reconstructing {subject}'s test images", unit="images", logger=log) as progress:
        out = generator.reconstruct(inputs, [image_seed(seed, i, 0) for i in idx], progress=progress)
    log.info("reconstructed %d test images of %s in %.1f s", len(idx), subject, time.perf_counter() - t0)
    gts = as_float_images(dm.store.images[idx])
    shown = slice(0, n_images)
    lowlevel = out.get(GENERATED_LOWLEVEL)
    grid = comparison_grid(_grid_columns(gts[shown], None if lowlevel is None else lowlevel[shown],
                                         out[GENERATED_FINAL][shown]))
    save_png(grid, path)
    log_image(loggers or [], "reconstruct/grid", grid)
    summary = None
    if n_metric_images > 1:
        from braindecode_fw.metrics.suite import ImageMetricSuite, mean_ci95

        suite = ImageMetricSuite(metrics_cfg)
        per_image = suite(out[GENERATED_FINAL][:n_metric_images], gts[:n_metric_images])
        stats = {k: mean_ci95(v) for k, v in per_image.items()}
        summary = {"subject": subject, "n_images": int(min(n_metric_images, len(idx))),
                   "metrics": {k: float(m) for k, (m, _) in stats.items()},
                   "ci95": {k: float(c) for k, (_, c) in stats.items()},
                   "labels": {k: suite.info(k).label for k in per_image}}
    return path, summary


def format_image_metrics(summary: dict[str, Any], generator_name: str) -> str:
    """One line per metric for the bdf-train summary."""
    head = f"Reconstructions of {summary['subject']}'s first {summary['n_images']} test images ({generator_name})"
    cells = [f"{summary['labels'][k]} {v:.3f} ± {summary['ci95'][k]:.3f}" for k, v in summary["metrics"].items()]
    return head + "\n" + "  ".join(cells)

