"""Evaluation shared by the tasks: retrieval of a decoder's predictions (:func:`evaluate_predictions`,
after training) and the literature's metric table for reconstructions or a decoder checkpoint
(:func:`evaluate`, the body of ``bdf-evaluate``; ``bdf-reconstruct evaluate=true`` calls it too).

Three inputs (docs/evaluation.md, "Three inputs"):

- ``run=<folder>``: a ``bdf-reconstruct`` output folder (manifest + PNGs); ground truths come from
  the prepared store the manifest names; retrieval too when the folder holds embeddings;
- ``recon_dir=<folder> gt_dir=<folder>``: any folder pair, images matched by file name; subfolders
  of ``recon_dir`` are subjects;
- ``ckpt=<decoder checkpoint>``: retrieval only, on the checkpoint's test split.

Writes ``metrics.{json,csv,md}`` (per subject and mean, 95% CIs, papers' column order; published
rows when ``test_set`` matches), ``per_image.csv``, PNG plots, and logs to the configured loggers.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.io import atomic_write_text
from braindecode_fw.metrics.images import (
    ARRAY_SUFFIXES,
    as_float_images,
    list_images,
    load_images,
    read_image_array,
    resize,
)
from braindecode_fw.metrics.published import check_test_set
from braindecode_fw.metrics.report import format_table, retrieval_report, write_report
from braindecode_fw.metrics.retrieval import RetrievalResult, retrieval_accuracy
from braindecode_fw.metrics.suite import ImageMetricSuite
from braindecode_fw.metrics.table import build_table, flat_metrics, markdown_table, write_table
from braindecode_fw.pipeline.checkpoint import check_checkpoint_store, load_checkpoint

log = logging.getLogger(__name__)


# ---- a decoder's predictions -----------------------------------------------------------------

def evaluate_predictions(cfg: DictConfig, dm: Any, decoder: Any, split: str = "test",
                         baseline: bool = False) -> dict[str, Any]:
    """``split`` predictions -> retrieval report (with the store's oracle, if any, for ``test``).

    ``split="test_large"`` scores a second held-out set (THINGS-MEG's 2,400 single trials) against
    ``evaluation.large_subset_size`` candidates. ``baseline``: also fit and score the ridge decoder
    of ``evaluation.linear_baseline`` on the same data (:mod:`braindecode_fw.pipeline.linear_baseline`).
    """
    from braindecode_fw.lit import predict

    target = cfg.target.feature_name
    preds = predict(decoder, dm.eval_dataloader(split), target)
    ev = cfg.evaluation
    assert dm.store is not None
    linear = None
    if baseline and split == "test":
        from braindecode_fw.pipeline.linear_baseline import linear_baseline_predictions

        lb = ev.linear_baseline
        linear = linear_baseline_predictions(dm, target, alphas=list(lb.alphas), max_train_trials=lb.max_train_trials,
                                             seed=cfg.seed)
    subset = ev.subset_size if split == "test" else ev.get("large_subset_size", ev.subset_size)
    return retrieval_report(preds, oracle=dm.store.extra("oracle") if split == "test" else None, subset_size=subset,
                            n_subsets=ev.n_subsets, seed=ev.seed, ks=tuple(ev.topk),
                            table_topk=tuple(ev.get("table_topk", [1])), baseline=linear)



# ---- inputs ---------------------------------------------------------------------------------

def _retrieval(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, cfg: DictConfig) -> RetrievalResult:
    r = cfg.retrieval
    return retrieval_accuracy(pred, target, subset_size=r.subset_size, n_subsets=r.n_subsets, seed=r.seed,
                              ks=tuple(sorted(set(r.topk) | {1})))


def pairs_from_run(cfg: DictConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, dict[str, Any]]:
    """(a) A reconstruction folder -> {subject: (recons, gts)}, retrieval results, info."""
    from braindecode_fw.data.reconstructions import open_reconstructions
    from braindecode_fw.data.store import open_store

    recs = open_reconstructions(cfg.run)
    store_path = cfg.store or recs.meta.get("store")
    if not store_path:
        raise ConfigError(f"store: {cfg.run}/manifest.json names no store; pass store=<prepared store>")
    store = open_store(store_path, check_finite=False)
    if recs.meta.get("dataset_version") not in (None, store.version):
        raise ConfigError(f"store: {store_path} is dataset version {store.version}, the reconstructions in "
                         f"{cfg.run} were made from {recs.meta['dataset_version']}")
    pairs, retrieval = {}, {}
    for subject in recs.subjects:
        items = recs.select(subject, cfg.sample)
        if not items:
            log.warning("%s: no reconstructions with sample index %d", subject, cfg.sample)
            continue
        recon = load_images([recs.root / i.path for i in items], cfg.metrics.eval_size,
                            antialias=cfg.metrics.antialias)
        if cfg.blend_lowlevel:
            missing = [i.image_id for i in items if i.lowlevel_path is None]
            if missing:
                raise ConfigError(f"blend_lowlevel: {subject} has no low-level image for {missing[:3]}")
            low = load_images([recs.root / i.lowlevel_path for i in items], cfg.metrics.eval_size,
                              antialias=cfg.metrics.antialias)
            recon = (1 - cfg.blend_lowlevel) * recon + cfg.blend_lowlevel * low
        gts = as_float_images(store.images[np.array([i.image_index for i in items])], name=f"{store_path} images")
        pairs[subject] = (recon, gts)
        emb = recs.embeddings(subject)
        if emb is not None:
            retrieval[subject] = _retrieval(emb["pred"], emb["target"], cfg)
    info = {"input": str(cfg.run), "store": str(store_path), "generator": recs.meta.get("generator"),
            "test_set": cfg.test_set or recs.meta.get("test_set"), "pixels": "8-bit files"}
    return pairs, retrieval, info


def pairs_from_folders(cfg: DictConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, dict[str, Any]]:
    """(b) recon_dir + gt_dir: two folders matched by file stem, or two array files matched by index.

    A folder holds image files and/or one-image array files (``.npy``/``.safetensors``/``.pt``);
    subfolders of ``recon_dir`` are subjects. Two array files (``(n, 3, h, w)`` float in [0, 1], as
    a generator returns them) are evaluated without the 8-bit rounding of a PNG.
    """
    recon_root, gt_root = Path(cfg.recon_dir), Path(cfg.gt_dir)
    for key, path in (("recon_dir", recon_root), ("gt_dir", gt_root)):
        if not path.exists():
            raise MissingFileError(f"{key}: not found: {path} (expected a folder of images or an array "
                                    f"file {'/'.join(ARRAY_SUFFIXES)})")
        if path.is_file() and path.suffix.lower() not in ARRAY_SUFFIXES:
            raise ConfigError(f"{key}: {path} is a file but not an array file (expected a folder of images "
                             f"or one of {', '.join(ARRAY_SUFFIXES)})")
    size, aa = cfg.metrics.eval_size, cfg.metrics.antialias
    info = {"input": f"{recon_root} vs {gt_root}", "test_set": cfg.test_set}
    if recon_root.is_file() or gt_root.is_file():
        if not (recon_root.is_file() and gt_root.is_file()):
            raise ConfigError(f"recon_dir/gt_dir: give two folders (matched by file name) or two array files "
                             f"(matched by index), got {'a file' if recon_root.is_file() else 'a folder'} and "
                             f"{'a file' if gt_root.is_file() else 'a folder'}")
        recon, gt = read_image_array(recon_root), read_image_array(gt_root)
        if recon.shape[0] != gt.shape[0]:
            raise ConfigError(f"recon_dir/gt_dir: {recon_root} holds {recon.shape[0]} images, {gt_root} holds "
                             f"{gt.shape[0]}; array files are matched by index and must have the same count")
        return ({"all": (resize(recon, size, antialias=aa), resize(gt, size, antialias=aa))}, {},
                {**info, "pixels": "float arrays"})
    gt = list_images(gt_root)
    subdirs = sorted(p for p in recon_root.iterdir() if p.is_dir())
    groups = {p.name: p for p in subdirs} if subdirs and not list_images(recon_root) else {"all": recon_root}
    pairs, image_names, is_array = {}, {}, set()
    for subject, folder in groups.items():
        recon = list_images(folder)
        is_array |= {p.suffix.lower() in ARRAY_SUFFIXES for p in recon.values()}
        missing = sorted(set(recon) - set(gt))
        if missing:
            raise ConfigError(f"gt_dir: no ground truth for {len(missing)} reconstruction(s) in {folder}, "
                             f"e.g. {missing[:3]} (files are matched by name)")
        if not recon:
            raise ConfigError(f"recon_dir: no images in {folder}")
        names = image_names[subject] = sorted(recon)
        pairs[subject] = (load_images([recon[n] for n in names], size, antialias=aa),
                          load_images([gt[n] for n in names], size, antialias=aa))
    pixels = "float arrays" if is_array == {True} else "8-bit files" if is_array == {False} else "mixed"
    return pairs, {}, {**info, "image_names": image_names, "pixels": pixels}


def retrieval_from_checkpoint(cfg: DictConfig) -> tuple[dict[str, RetrievalResult], dict[str, Any], dict[str, Any]]:
    """(c) Decoder checkpoint -> retrieval per subject on its test split (+ the oracle report)."""
    from braindecode_fw.lit import predict
    from braindecode_fw.pipeline.build import build_datamodule, build_model

    ckpt = load_checkpoint(cfg.ckpt)
    extra = ckpt["braindecode_fw"]
    train_cfg = OmegaConf.create(extra["config"])
    store = cfg.store or train_cfg.dataset.store
    check_checkpoint_store(extra, cfg.ckpt, store, allow_other_store=bool(cfg.get("allow_other_store", False)))
    dm = build_datamodule(train_cfg, Path(store))
    decoder = build_model(train_cfg, extra["n_features"], {k: tuple(v) for k, v in extra["target_shapes"].items()})
    state = {k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
    decoder.load_state_dict(state)
    preds = predict(decoder, dm.test_dataloader(), train_cfg.target.feature_name)
    r = cfg.retrieval
    assert dm.store is not None
    report = retrieval_report(preds, oracle=dm.store.extra("oracle"), subset_size=r.subset_size,
                              n_subsets=r.n_subsets, seed=r.seed, ks=tuple(r.topk),
                              table_topk=tuple(train_cfg.get("evaluation", {}).get("table_topk", [1])))
    results = {s: _retrieval(p["pred"], p["target"], cfg) for s, p in preds.items()}
    test_set = cfg.test_set or dm.store.meta.get("provenance", {}).get("test_set")
    return results, report, {"input": str(cfg.ckpt), "store": str(store), "test_set": test_set}


# ---- outputs --------------------------------------------------------------------------------

def _per_image_csv(per_image: dict[str, dict[str, np.ndarray]], names: dict[str, list[str]]) -> str:
    keys = sorted({k for v in per_image.values() for k in v})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["subject", "image", *keys])
    for s, vals in sorted(per_image.items()):
        for i, name in enumerate(names[s]):
            w.writerow([s, name, *[f"{vals[k][i]:.6g}" if k in vals else "" for k in keys]])
    return buf.getvalue()


def _log(cfg: DictConfig, out_dir: Path, table: dict[str, Any]) -> None:
    from braindecode_fw.ops.loggers import build_loggers

    metrics = flat_metrics(table)
    for logger in build_loggers(cfg.get("logger"), out_dir):
        logger.log_hyperparams({"input": table["protocol"].get("input"), "test_set": table["test_set"]})
        logger.log_metrics(metrics, step=0)
        logger.finalize("success")


def _plots(cfg: DictConfig, out_dir: Path, table: dict[str, Any], per_image: dict[str, dict[str, np.ndarray]],
           pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], suite: ImageMetricSuite | None,
           chance: float | None) -> list[Path]:
    from braindecode_fw.viz.plots import (
        best_worst_grid,
        metric_bars,
        metric_boxes,
        retrieval_curves,
    )

    paths = [metric_bars(table, out_dir / "metrics_bars.png")]
    if per_image and suite is not None:
        labels = {k: suite.info(k).label for k in suite.metric_keys}
        paths.append(metric_boxes(per_image, labels, out_dir / "metrics_boxes.png"))
        key = cfg.plots.best_worst_metric
        for subject, (recons, gts) in pairs.items():
            if key not in per_image[subject]:
                key = next(iter(per_image[subject]))
            info = suite.info(key)
            paths.append(best_worst_grid(
                suite.prepare(recons, "reconstructions"), suite.prepare(gts, "ground truth"), per_image[subject][key],
                out_dir / f"best_worst_{subject}.png", k=cfg.plots.best_worst_k,
                title=f"{subject}: best and worst by {info.label}", higher_is_better=info.higher_is_better))
    if table["topk"] and chance:
        paths.append(retrieval_curves(table["topk"], {"chance": chance}, out_dir / "retrieval_topk.png"))
    return paths


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    modes = [m for m in ("run", "recon_dir", "ckpt") if cfg.get(m)]
    if len(modes) != 1 or (cfg.get("recon_dir") is None) != (cfg.get("gt_dir") is None):
        raise ConfigError("give exactly one input: run=<bdf-reconstruct folder>, recon_dir=<folder|array> gt_dir=<folder|array>, "
                         f"or ckpt=<decoder checkpoint> (got {modes or 'none'}"
                         f"{'; gt_dir without recon_dir' if cfg.get('gt_dir') and not cfg.get('recon_dir') else ''})")
    check_test_set(cfg.get("test_set"))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image: dict[str, dict[str, np.ndarray]] = {}
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    suite = None
    written: list[Path] = []
    if modes[0] == "ckpt":
        retrieval, report, info = retrieval_from_checkpoint(cfg)
        written += write_report(report, out_dir)
        print(format_table(report))
    else:
        pairs, retrieval, info = pairs_from_run(cfg) if modes[0] == "run" else pairs_from_folders(cfg)
        suite = ImageMetricSuite(cfg.metrics)
        for subject, (recons, gts) in pairs.items():
            log.info("%s: %d image pairs", subject, len(recons))
            per_image[subject] = suite(recons, gts)
        file_names = info.pop("image_names", {})
        names = {s: file_names.get(s) or [str(i) for i in range(len(p[0]))] for s, p in pairs.items()}
        written.append(atomic_write_text(out_dir / "per_image.csv", _per_image_csv(per_image, names)))
    infos = [suite.info(k) for k in suite.metric_keys] if suite else []
    protocol = {**info, "eval_size": cfg.metrics.eval_size, "antialias": cfg.metrics.antialias,
                "ssim_legacy_skimage_multichannel": bool((cfg.metrics.get("ssim") or {}).get(
                    "legacy_skimage_multichannel", False)),
                "blend_lowlevel": cfg.get("blend_lowlevel"), "sample": cfg.get("sample"),
                "retrieval": OmegaConf.to_container(cfg.retrieval), "timings_s": suite.timings if suite else {}}
    random_metrics = suite.random_weight_metrics if suite else []
    protocol["random_weight_metrics"] = random_metrics
    if random_metrics:
        log.warning("random-weight networks for %s: those columns are not comparable with any publication "
                    "(set metrics=literature or real weights)", random_metrics)
    table = build_table(per_image, infos, retrieval=retrieval, test_set=info.get("test_set"), protocol=protocol)
    written += write_table(table, out_dir)
    chance = 1.0 / min(cfg.retrieval.subset_size, min(r.n_items for r in retrieval.values())) if retrieval else None
    if cfg.plots.enabled:
        written += _plots(cfg, out_dir, table, per_image, pairs, suite, chance)
    _log(cfg, out_dir, table)
    print(markdown_table(table))
    print(f"results: {out_dir}")
    return table
