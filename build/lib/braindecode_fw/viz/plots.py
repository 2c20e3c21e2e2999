"""Evaluation plots written as PNG next to the tables: per-metric bars (mean ± 95% CI per subject)
and box plots (per-image values), retrieval top-k curves, best/worst reconstruction grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braindecode_fw.io import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _grid_shape(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def metric_bars(table: dict[str, Any], path: str | Path) -> Path:
    """One panel per metric: a bar per subject (and the mean) with its 95% CI."""
    plt = _pyplot()
    cols = table["columns"]
    nr, nc = _grid_shape(len(cols))
    fig, axes = plt.subplots(nr, nc, figsize=(3.2 * nc, 2.6 * nr), squeeze=False)
    names = [r["subject"] for r in table["rows"]]
    for ax, c in zip(axes.flat, cols, strict=False):
        vals = [r[c] for r in table["rows"]]
        cis = [r[f"{c}_ci95"] for r in table["rows"]]
        colors = ["0.55" if n == "mean" else "C0" for n in names]
        ax.bar(range(len(names)), vals, yerr=cis, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{table['labels'][c]} {'↑' if table['higher_is_better'][c] else '↓'}", fontsize=9)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(path))


def metric_boxes(per_image: dict[str, dict[str, np.ndarray]], labels: dict[str, str], path: str | Path) -> Path:
    """One panel per image metric: the distribution of per-image values for each subject."""
    plt = _pyplot()
    keys = [k for k in labels if any(k in v for v in per_image.values())]
    subjects = sorted(per_image)
    nr, nc = _grid_shape(max(len(keys), 1))
    fig, axes = plt.subplots(nr, nc, figsize=(3.2 * nc, 2.6 * nr), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        data = [per_image[s][k] for s in subjects if k in per_image[s]]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(data) + 1), subjects, rotation=45, ha="right", fontsize=7)
        ax.set_title(labels[k], fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(path))


def retrieval_curves(topk: dict[str, dict[str, dict[int, float]]], chance: dict[str, float],
                     path: str | Path) -> Path:
    """Top-k accuracy against k for each subject, both directions, with chance (k / subset size)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, d in zip(axes, ("brain_to_image", "image_to_brain"), strict=True):
        for s, res in sorted(topk.items()):
            ks = sorted(res[d])
            ax.plot(ks, [res[d][k] for k in ks], marker="o", ms=3, label=s)
        if topk:
            ks = sorted(next(iter(topk.values()))[d])
            ax.plot(ks, [min(1.0, k * next(iter(chance.values()))) for k in ks], "k--", lw=1, label="chance")
        ax.set_xlabel("k")
        ax.set_title({"brain_to_image": "brain → image", "image_to_brain": "image → brain"}[d], fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("top-k accuracy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


def best_worst_grid(recons: torch.Tensor, gts: torch.Tensor, scores: np.ndarray, path: str | Path, *,
                    k: int = 6, title: str = "", higher_is_better: bool = True) -> Path:
    """Ground truth over reconstruction for the ``k`` best and ``k`` worst images by ``scores``."""
    plt = _pyplot()
    order = np.argsort(-scores if higher_is_better else scores, kind="stable")
    k = min(k, len(order))
    picks = [("best", order[:k]), ("worst", order[::-1][:k])]
    fig, axes = plt.subplots(4, k, figsize=(1.6 * k, 6.8), squeeze=False)
    for block, (name, idx) in enumerate(picks):
        for j, i in enumerate(idx):
            for row, img in ((0, gts[i]), (1, recons[i])):
                ax = axes[2 * block + row, j]
                ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 1:
                    ax.set_xlabel(f"{scores[i]:.3f}", fontsize=7)
            if j == 0:
                axes[2 * block, 0].set_ylabel(f"{name}: GT", fontsize=8)
                axes[2 * block + 1, 0].set_ylabel("recon", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))
