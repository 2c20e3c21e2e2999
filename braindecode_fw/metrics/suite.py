"""The literature's image-metric table as one configurable suite (docs/evaluation.md, ME2 reference).

Columns, in the papers' order: PixCorr↑ SSIM↑ Alex(2)↑ Alex(5)↑ Incep↑ CLIP↑ EffNet↓ SwAV↓.
:class:`ImageMetricSuite` brings reconstructions and ground truths to the evaluation resolution
(256), computes PixCorr/SSIM from pixels and the six network columns from features (each
extractor runs once per image set, whatever number of its nodes are used), and returns one value
per image for every metric, so means, confidence intervals, box plots and best/worst grids all
come from the same numbers. Metrics over other inputs (e.g. caption metrics, which compare
predicted and reference captions) would be a second suite next to this one with the same
per-item result type, not extra branches here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.features import ExtractorSpec, FeatureExtractor
from braindecode_fw.metrics.identification import correlation_distance, two_way_identification
from braindecode_fw.metrics.images import to_eval_resolution
from braindecode_fw.metrics.pixel import pixcorr, ssim

log = logging.getLogger(__name__)

FEATURE_KINDS = ("two_way", "distance")


@dataclass(frozen=True)
class MetricInfo:
    key: str
    label: str
    higher_is_better: bool


# the papers' column order (docs/evaluation.md)
PAPER_METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("pixcorr", "PixCorr", True),
    MetricInfo("ssim", "SSIM", True),
    MetricInfo("alexnet2", "Alex(2)", True),
    MetricInfo("alexnet5", "Alex(5)", True),
    MetricInfo("inception", "Incep", True),
    MetricInfo("clip", "CLIP", True),
    MetricInfo("effnet", "EffNet", False),
    MetricInfo("swav", "SwAV", False),
)


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and normal-approximation 95% half-width ``1.96·sd/√n`` (0 for fewer than 2 values)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), float(half)


def _resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class ImageMetricSuite:
    """Configured image metrics. ``cfg`` is the ``metrics`` config group (braindecode_fw/conf/metrics/*.yaml)."""

    def __init__(self, cfg: DictConfig | dict[str, Any]):
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        self.cfg = cfg
        self.device = _resolve_device(cfg.get("device", "auto"))
        self.eval_size = int(cfg.eval_size)
        self.antialias = bool(cfg.antialias)
        self.chunk_mb = float(cfg.get("chunk_mb", 256))
        self.feature_metrics: dict[str, DictConfig] = {}
        for key, m in (cfg.get("feature_metrics") or {}).items():
            if m is None:
                continue
            if m.kind not in FEATURE_KINDS:
                raise ConfigError(f"metrics.feature_metrics.{key}.kind: one of {FEATURE_KINDS}, got {m.kind!r}")
            if m.extractor not in (cfg.get("extractors") or {}):
                raise ConfigError(f"metrics.feature_metrics.{key}.extractor: {m.extractor!r} is not in "
                                 f"metrics.extractors ({sorted(cfg.get('extractors') or {})})")
            self.feature_metrics[key] = m
        self._extractors: dict[str, FeatureExtractor] = {}
        self.timings: dict[str, float] = {}  # seconds per stage, summed over calls

    def _add_time(self, stage: str, t0: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    @property
    def metric_keys(self) -> list[str]:
        keys = [k for k in ("pixcorr", "ssim") if (self.cfg.get(k) or {}).get("enabled", False)]
        return keys + list(self.feature_metrics)

    @property
    def random_weight_metrics(self) -> list[str]:
        """Metrics whose network has random weights: their numbers are plumbing, not similarity."""
        from braindecode_fw.metrics.weights import is_random

        return [k for k, m in self.feature_metrics.items() if is_random(self.cfg.extractors[m.extractor].weights)]

    def info(self, key: str) -> MetricInfo:
        for m in PAPER_METRICS:
            if m.key == key:
                return m
        fm = self.feature_metrics[key]
        return MetricInfo(key, fm.get("label", key), fm.kind == "two_way")

    def extractor(self, name: str) -> FeatureExtractor:
        """Built on first use, then kept (weights load once per suite)."""
        if name not in self._extractors:
            spec_cfg = OmegaConf.to_container(self.cfg.extractors[name], resolve=True)
            assert isinstance(spec_cfg, dict)
            nodes = [m.node for m in self.feature_metrics.values() if m.extractor == name]
            t0 = time.perf_counter()
            self._extractors[name] = FeatureExtractor(ExtractorSpec(name=name, **spec_cfg), nodes, self.device)
            self._add_time(f"build_{name}", t0)
        return self._extractors[name]

    def prepare(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Any-size float [0, 1] images -> the evaluation resolution (the papers' 256×256)."""
        return to_eval_resolution(images, self.eval_size, antialias=self.antialias, name=name)

    def __call__(self, recons: torch.Tensor, gts: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-image values ``{metric key: (n,) float64}`` in the order of :attr:`metric_keys`."""
        if recons.shape[0] != gts.shape[0]:
            raise ConfigError(f"{len(recons)} reconstructions but {len(gts)} ground-truth images")
        recons, gts = self.prepare(recons, "reconstructions"), self.prepare(gts, "ground truth")
        out: dict[str, np.ndarray] = {}
        if (self.cfg.get("pixcorr") or {}).get("enabled", False):
            t0 = time.perf_counter()
            out["pixcorr"] = pixcorr(recons, gts, size=self.cfg.pixcorr.size, antialias=self.antialias).numpy()
            self._add_time("pixcorr", t0)
        if (self.cfg.get("ssim") or {}).get("enabled", False):
            s = self.cfg.ssim
            t0 = time.perf_counter()
            out["ssim"] = ssim(recons, gts, size=s.size, sigma=s.sigma,
                               legacy_skimage_multichannel=s.legacy_skimage_multichannel,
                               antialias=self.antialias).numpy()
            self._add_time("ssim", t0)
        by_extractor: dict[str, list[str]] = {}
        for key, m in self.feature_metrics.items():
            by_extractor.setdefault(m.extractor, []).append(key)
        for name, keys in by_extractor.items():
            ext = self.extractor(name)
            t0 = time.perf_counter()
            feats_gt, feats_rec = ext(gts), ext(recons)
            self._add_time(f"features_{name}", t0)
            for key in keys:
                m = self.feature_metrics[key]
                t0 = time.perf_counter()
                if m.kind == "two_way":
                    if len(gts) < 2:
                        log.warning("%s: two-way identification needs at least 2 images; skipped", key)
                        continue
                    values = two_way_identification(feats_gt[m.node], feats_rec[m.node], chunk_mb=self.chunk_mb)
                else:
                    values = correlation_distance(feats_gt[m.node], feats_rec[m.node])
                out[key] = values.numpy()
                self._add_time(key, t0)
        return out
