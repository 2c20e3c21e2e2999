"""Feature-space metrics: two-way identification and correlation distance (docs/evaluation.md).

Both take features already extracted from ground truths and reconstructions (``(n, ...)``, any
trailing shape, flattened per image) so the extractor can be anything: AlexNet ``features.4`` at
NSD scale is 184,512-d per image, handled chunk-wise by :func:`similarity_matrix`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.correlation import DEFAULT_CHUNK_MB, paired_pearson, similarity_matrix

log = logging.getLogger(__name__)


def two_way_identification(
    gt_features: torch.Tensor | np.ndarray,
    recon_features: torch.Tensor | np.ndarray,
    *,
    chunk_mb: float = DEFAULT_CHUNK_MB,
) -> torch.Tensor:
    """Per-reconstruction two-way identification scores ``(n,)`` float64; the metric is their mean.

    With ``R[i, j] = corr(gt_i, recon_j)`` (Pearson on flattened features), reconstruction ``j``
    scores ``#{i ≠ j : R[i, j] < R[j, j]} / (n − 1)``: the fraction of the other ground truths that
    correlate *strictly* less with it than its own ground truth (ties count as failures; no
    subsampling). This is MindEye2's/Brain-Diffuser's count over all N−1 others.

    A constant feature vector has no defined correlation (NaN in ``np.corrcoef``); every comparison
    involving it fails, as in the reference code, so the score stays a number in [0, 1].
    """
    g = torch.as_tensor(gt_features)
    r = torch.as_tensor(recon_features)
    if len(g) != len(r):
        raise ConfigError(f"{len(g)} ground-truth and {len(r)} reconstruction feature rows")
    n = len(g)
    if n < 2:
        raise ConfigError(f"two-way identification needs at least 2 images, got {n}")
    corr = similarity_matrix(g, r, center=True, chunk_mb=chunk_mb)
    own = corr.diagonal()
    if torch.isnan(own).any():
        log.warning("two-way identification: %d image(s) with constant features count as failures",
                    int(torch.isnan(own).sum()))
    wins = corr < own[None, :]  # NaN compares False: undefined correlations are failures
    return wins.sum(dim=0).double() / (n - 1)


def correlation_distance(
    gt_features: torch.Tensor | np.ndarray,
    recon_features: torch.Tensor | np.ndarray,
) -> torch.Tensor:
    """``1 − Pearson(f(gt_i), f(recon_i))`` per image ``(n,)`` float64 (scipy's ``correlation``
    distance, as MindEye2's EfficientNet-B1 and SwAV columns). Constant features give 1 (r = 0)."""
    g = torch.as_tensor(gt_features)
    r = torch.as_tensor(recon_features)
    if g.shape[0] != r.shape[0]:
        raise ConfigError(f"{len(g)} ground-truth and {len(r)} reconstruction feature rows")
    return 1.0 - paired_pearson(g, r)
