"""Image/brain retrieval with the MindEye2 protocol (docs/evaluation.md).

Protocol: cosine similarity between flattened, L2-normalised brain predictions and image
embeddings; ``n_subsets`` (30) random subsets of ``subset_size`` (300) test items drawn without
replacement from a NumPy ``RandomState(seed)`` (all items, once, when there are not more than
``subset_size``); top-k accuracy in each subset; mean and a normal 95% CI over the subsets.

CI methods (``ci_method``): ``population_sd_norm_ppf`` (default; MindEye2's final_evaluations:
``scipy.stats.norm.interval(0.95, mean, sd/√n)`` with the population sd, ``ddof=0``; half-width
``Φ⁻¹(0.975)·sd₀/√n``) and ``sample_sd_1.96`` (``1.96·sd₁/√n`` with the sample sd, ``ddof=1``;
slightly wider, by √(n/(n-1)) ≈ 1.017 at 30 subsets).

Direction names are explicit, because MindEye2's code labels are ambiguous:

- ``brain_to_image``: the query is a brain response; the candidates are the subset's images
  (MindEye2's ``BwdRetrieval``; "brain → image").
- ``image_to_brain``: the query is an image; the candidates are the subset's brain responses
  (MindEye2's ``FwdRetrieval``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.correlation import DEFAULT_CHUNK_MB, similarity_matrix

DIRECTIONS = ("brain_to_image", "image_to_brain")
CI_METHODS = ("population_sd_norm_ppf", "sample_sd_1.96")
# Φ⁻¹(0.975), what scipy.stats.norm.interval(0.95) uses (1.959963984540054)
_Z975 = 1.959963984540054


def ci95_half_width(values: np.ndarray, method: str = "population_sd_norm_ppf") -> float:
    """Half-width of the normal 95% interval of the mean of ``values`` (0 for fewer than 2)."""
    if method not in CI_METHODS:
        raise ConfigError(f"metrics.retrieval.ci_method: one of {list(CI_METHODS)}, got {method!r}")
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return 0.0
    if method == "population_sd_norm_ppf":
        return float(_Z975 * v.std(ddof=0) / np.sqrt(len(v)))
    return float(1.96 * v.std(ddof=1) / np.sqrt(len(v)))


def retrieval_subsets(n_items: int, subset_size: int = 300, n_subsets: int = 30, seed: int = 42) -> list[np.ndarray]:
    """Index subsets for the protocol: one subset of everything if ``n_items <= subset_size``."""
    if n_items <= subset_size:
        return [np.arange(n_items)]
    rng = np.random.RandomState(seed)
    return [rng.choice(n_items, subset_size, replace=False) for _ in range(n_subsets)]


def cosine_scores(brain: torch.Tensor | np.ndarray, image: torch.Tensor | np.ndarray,
                  chunk_mb: float = DEFAULT_CHUNK_MB) -> torch.Tensor:
    """``(n, *shape)`` brain predictions, ``(n, *shape)`` image embeddings -> ``(n, n)`` cosine
    similarities; entry ``[i, j]`` compares brain ``i`` with image ``j`` (true pairs on the diagonal).
    Computed chunk-wise over features (425,984-d bigG tokens at NSD scale); zero vectors score 0.
    """
    scores = similarity_matrix(brain, image, center=False, chunk_mb=chunk_mb)
    return torch.nan_to_num(scores, nan=0.0).float()


def _topk_hits(scores: torch.Tensor, k: int) -> tuple[float, float]:
    """Fraction of correct top-k for both directions of one square score matrix."""
    diag = scores.diagonal()
    # rank = number of candidates strictly better than the true one (ties favour the true pair)
    rank_b2i = (scores > diag[:, None]).sum(dim=1)
    rank_i2b = (scores > diag[None, :]).sum(dim=0)
    return float((rank_b2i < k).float().mean()), float((rank_i2b < k).float().mean())


@dataclass
class RetrievalResult:
    """Top-k accuracies: ``values[direction][k]`` holds one accuracy per subset."""

    values: dict[str, dict[int, np.ndarray]]
    subset_size: int
    n_items: int
    ci_method: str = "population_sd_norm_ppf"

    def mean(self, direction: str, k: int = 1) -> float:
        return float(self.values[direction][k].mean())

    def ci95(self, direction: str, k: int = 1, method: str | None = None) -> float:
        """95% half-width over subsets; ``method`` defaults to ``self.ci_method`` (see CI_METHODS)."""
        return ci95_half_width(self.values[direction][k], method or self.ci_method)

    def summary(self, ks: tuple[int, ...] | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in DIRECTIONS:
            for k in ks or tuple(self.values[d]):
                out[f"{d}_top{k}"] = self.mean(d, k)
                out[f"{d}_top{k}_ci95"] = self.ci95(d, k)
        return out


def retrieval_from_scores(
    scores: torch.Tensor | np.ndarray,
    *,
    subset_size: int = 300,
    n_subsets: int = 30,
    seed: int = 42,
    ks: tuple[int, ...] = (1,),
    posterior: bool = False,
    ci_method: str = "population_sd_norm_ppf",
) -> RetrievalResult:
    """Top-k retrieval from any ``(n, n)`` score matrix (higher = more similar, brain rows,
    image columns, true pairs on the diagonal). Used for cosine scores and for the oracle's
    log-likelihoods alike.

    ``posterior=True`` treats scores as log-likelihoods ``log p(brain_i | image_j)`` and turns
    each subset's rows into log-posteriors over that subset's images (uniform prior), so the
    image→brain direction ranks brain responses by ``p(image_j | brain_i)``: the Bayes-optimal
    rule when every brain response matches exactly one candidate image. (brain→image is
    unchanged: a per-row constant does not move the arg-max.) ``ci_method``: see CI_METHODS."""
    ci95_half_width(np.zeros(2), ci_method)  # refuse an unknown method before the work
    scores = torch.as_tensor(scores).double() if posterior else torch.as_tensor(scores).float()
    n = scores.shape[0]
    if scores.shape != (n, n):
        raise ConfigError(f"score matrix must be square (brain x image), got {tuple(scores.shape)}")
    subsets = retrieval_subsets(n, subset_size, n_subsets, seed)
    values: dict[str, dict[int, list[float]]] = {d: {k: [] for k in ks} for d in DIRECTIONS}
    for idx in subsets:
        t = torch.as_tensor(idx)
        sub = scores[t][:, t]
        if posterior:
            sub = sub - torch.logsumexp(sub, dim=1, keepdim=True)
        for k in ks:
            b2i, i2b = _topk_hits(sub, k)
            values["brain_to_image"][k].append(b2i)
            values["image_to_brain"][k].append(i2b)
    return RetrievalResult(
        values={d: {k: np.asarray(v) for k, v in per_k.items()} for d, per_k in values.items()},
        subset_size=min(subset_size, n),
        n_items=n,
        ci_method=ci_method,
    )


def retrieval_accuracy(
    brain: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    **kwargs,
) -> RetrievalResult:
    """Cosine-similarity retrieval between predicted and true embeddings (docs/evaluation.md)."""
    return retrieval_from_scores(cosine_scores(brain, image), **kwargs)
