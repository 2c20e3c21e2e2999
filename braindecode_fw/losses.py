"""Contrastive losses between brain predictions and target embeddings (docs/methods/mindeye2.md §4).

All take ``pred`` and ``target`` of shape ``(B, *shape)``, flatten and L2-normalise them, and
return a scalar. Row ``i`` of ``pred`` and of ``target`` belong together. Also Benchetrit et al.
2023's CLIP + MSE loss for the MEG brain module (:class:`ClipMSELoss`, docs/methods/meg_brainmodule.md §5)
and Brain-IT's multi-scale InfoNCE (:func:`multiscale_infonce`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.errors import ConfigError


def _flat_normalised(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.reshape(len(x), -1).float(), dim=-1)


class SoftCLIPLoss(nn.Module):
    """MindEye2's SoftCLIP: cross-entropy between brain-image logits and the softmax of the
    image-image similarities, symmetrised over rows and columns:

    ``L = ½[CE(softmax(p·tᵀ/τ), softmax(t·tᵀ/τ)) + CE(softmax(t·pᵀ/τ), softmax(t·tᵀ/τ))]``.
    """

    def __init__(self, temperature: float = 0.006):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, t = _flat_normalised(pred), _flat_normalised(target)
        logits = p @ t.T / self.temperature
        soft = (t @ t.T / self.temperature).softmax(-1)
        loss_rows = -(soft * logits.log_softmax(-1)).sum(-1).mean()
        loss_cols = -(soft * logits.T.log_softmax(-1)).sum(-1).mean()
        return (loss_rows + loss_cols) / 2


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP loss) with hard diagonal labels and a fixed or learned temperature
    (learned as log(1/τ), initialised at ``temperature``, as in CLIP)."""

    def __init__(self, temperature: float = 0.05, learn_temperature: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {temperature}")
        scale = torch.tensor(math.log(1.0 / temperature))
        self.log_scale = nn.Parameter(scale) if learn_temperature else nn.Buffer(scale)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale.detach()))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, t = _flat_normalised(pred), _flat_normalised(target)
        logits = p @ t.T * self.log_scale.exp()
        labels = torch.arange(len(p), device=p.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---------------------------------------------------------------------------------------------
# MixCo / BiMixCo (docs/methods/mindeye2.md §4) and the loss pieces of MindBridge (docs/methods/mindbridge.md §4)


def mixco_permutation(subjects: list[str], *, generator: torch.Generator | None = None,
                      original_label_bug: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-subject partner permutation for MixCo. Returns ``(mix_partner, label_column)``, both
    ``(B,)`` long: row ``i`` is mixed with row ``mix_partner[i]`` (always the same subject: voxel
    spaces differ between subjects) and its soft label points at column ``label_column[i]``.

    MindEye2 drew a local permutation per subject and concatenated them without an offset, so
    mixed rows of every subject but the first point at the first subject's columns (docs/methods/mindeye2.md §4);
    ``original_label_bug=True`` reproduces that (rows are assumed grouped by subject, as ME2's
    concatenated per-subject batches were); the default points the label at the true partner."""
    partner = torch.empty(len(subjects), dtype=torch.long)
    label = torch.empty(len(subjects), dtype=torch.long)
    for s in dict.fromkeys(subjects):
        rows = torch.tensor([i for i, x in enumerate(subjects) if x == s])
        local = torch.randperm(len(rows), generator=generator)
        partner[rows] = rows[local]
        label[rows] = local if original_label_bug else rows[local]
    return partner, label


def mixco_inputs(x: torch.Tensor, partner: torch.Tensor, *, beta_alpha: float = 0.15, select_prob: float = 0.5,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MixCo on the inputs (voxels before the subject adapter): ``x`` ``(B, F)`` -> (mixed ``x``,
    ``beta`` ``(B,)``). Each row is selected with probability ``select_prob``; selected rows become
    ``β·x_i + (1−β)·x_partner(i)`` with ``β ~ Beta(α, α)``; unselected rows keep ``β = 1``."""
    b = len(x)
    beta = _beta_sample(beta_alpha, b, generator).to(x.device)
    selected = torch.rand(b, generator=generator).to(x.device) < select_prob
    beta = torch.where(selected, beta, torch.ones_like(beta)).to(x.dtype)
    shape = (b,) + (1,) * (x.ndim - 1)
    mixed = beta.view(shape) * x + (1 - beta.view(shape)) * x[partner.to(x.device)]
    return mixed, beta


def _beta_sample(alpha: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Beta(α, α) from two Gamma draws (torch's Beta sampler takes no generator)."""
    g1 = torch._standard_gamma(torch.full((n,), alpha), generator=generator)
    g2 = torch._standard_gamma(torch.full((n,), alpha), generator=generator)
    return g1 / (g1 + g2)


def mixco_soft_labels(beta: torch.Tensor, label_column: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` soft labels: ``diag(β)``, then ``P[i, label(i)] = 1 − β_i`` *assigned* (ME2's
    semantics: where ``label(i) = i`` the diagonal is overwritten, so an unmixed row that drew itself
    gets an all-zero row)."""
    p = torch.diag(beta.float())
    p[torch.arange(len(beta)), label_column.to(beta.device)] = 1 - beta.float()
    return p


def bimixco_loss(pred: torch.Tensor, target: torch.Tensor, soft_labels: torch.Tensor,
                 temperature: float = 0.006) -> torch.Tensor:
    """BiMixCo: ``½[−mean_i Σ_j P_ij log softmax(S)_ij − mean_i Σ_j Pᵀ_ij log softmax(Sᵀ)_ij]`` with
    ``S = p̂·tᵀ/τ`` over L2-normalised flattened ``pred``/``target`` ``(B, *shape)``."""
    p, t = _flat_normalised(pred), _flat_normalised(target)
    logits = p @ t.T / temperature
    rows = -(soft_labels * logits.log_softmax(-1)).sum(-1).mean()
    cols = -(soft_labels.T * logits.T.log_softmax(-1)).sum(-1).mean()
    return (rows + cols) / 2


def soft_clip_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Functional :class:`SoftCLIPLoss` with a temperature chosen per call (schedules)."""
    p, t = _flat_normalised(pred), _flat_normalised(target)
    logits = p @ t.T / temperature
    soft = (t @ t.T / temperature).softmax(-1)
    return (-(soft * logits.log_softmax(-1)).sum(-1).mean() - (soft * logits.T.log_softmax(-1)).sum(-1).mean()) / 2


def soft_token_contrast(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MindEye2's ``soft_cont_loss`` (docs/methods/mindeye2.md §4) with the clean teacher on both sides: SoftCLIP
    over every spatial token of the batch as its own row, ``(B, N, C)`` -> ``(B·N, C)`` rows of the
    student (the low-level head's auxiliary tokens) against the teacher's (ConvNeXt tokens)."""
    return soft_clip_loss(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]),
                          temperature)


def cosine_temperature(progress: float, start: float, end: float) -> float:
    """MindEye2's SoftCLIP temperature over the SoftCLIP phase, ``progress`` in [0, 1]:
    ``τ = end + (start − end)/2·(1 + cos(π·progress))`` (rises from ``start`` to ``end``)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) / 2 * (1 + math.cos(math.pi * progress))


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-mean squared error between the L2-normalised flattened vectors (MindBridge's MSE term,
    weighted 1e4 because each element is ~1/D)."""
    return F.mse_loss(_flat_normalised(pred), _flat_normalised(target))


def sample_scale_tokens(scale_sizes: list[int], per_scale: list[int], generator: torch.Generator | None = None,
                        *, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Brain-IT's token sampling for the multi-scale InfoNCE (docs/methods/brainit.md §4, "Low-level (VGG)").

    ``scale_sizes[i]`` tokens of scale ``i`` sit consecutively in the concatenated token axis
    (:func:`braindecode_fw.targets.multiscale.scale_sizes`); ``per_scale[i]`` of them are drawn
    without replacement (Brain-IT: ``[512, 512, 128, 64, 16]``). Returns ``(indices, scale_of_token)``:
    ``indices`` long ``(S,)`` into the token axis (``S = sum(per_scale)``), grouped by scale, or
    ``(batch, S)`` with an independent draw per row when ``batch`` is given; ``scale_of_token`` long
    ``(S,)``, the scale of each column (the same for every row).
    """
    if len(scale_sizes) != len(per_scale):
        raise ConfigError(f"loss.per_scale: one count per scale ({len(scale_sizes)} scales), got {list(per_scale)}")
    too_many = [(i, k, n) for i, (k, n) in enumerate(zip(per_scale, scale_sizes, strict=True)) if not 0 < k <= n]
    if too_many:
        i, k, n = too_many[0]
        raise ConfigError(f"loss.per_scale: scale {i} has {n} tokens, cannot sample {k} without replacement "
                         f"(per_scale {list(per_scale)}, scale sizes {list(scale_sizes)})")
    offsets = [sum(scale_sizes[:i]) for i in range(len(scale_sizes))]

    def draw() -> torch.Tensor:
        return torch.cat([torch.randperm(n, generator=generator)[:k] + o
                          for n, k, o in zip(scale_sizes, per_scale, offsets, strict=True)])

    indices = draw() if batch is None else torch.stack([draw() for _ in range(batch)])
    scale_of_token = torch.repeat_interleave(torch.arange(len(per_scale)), torch.tensor(list(per_scale)))
    return indices, scale_of_token


def multiscale_infonce(pred: torch.Tensor, target: torch.Tensor, scale_of_token: torch.Tensor) -> torch.Tensor:
    """Brain-IT's multi-scale InfoNCE (docs/methods/brainit.md §4, "Low-level (VGG)").

    ``pred``, ``target``: ``(B, S, D)`` predicted and true tokens at the sampled positions;
    ``scale_of_token``: ``(S,)`` scale of each position (:func:`sample_scale_tokens`). Per scale the
    ``B × S_i`` tokens are rows, ``logits = pred · targetᵀ`` (logit scale 1, **no** normalisation:
    the token norms act as the temperature), the loss is the symmetric cross-entropy with the
    diagonal as labels, ``(CE(rows) + CE(columns)) / 2``; the scales are averaged. Memory: a
    ``(B·S_i)²`` logit matrix per scale (32768² at batch 64 and 512 tokens).
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ConfigError(f"multiscale_infonce: pred and target must both be (B, S, D), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if scale_of_token.shape != (pred.shape[1],):
        raise ConfigError(f"multiscale_infonce: scale_of_token must be ({pred.shape[1]},), one scale per sampled "
                         f"token, got {tuple(scale_of_token.shape)}")
    scale_of_token = scale_of_token.to(pred.device)
    losses = []
    for s in torch.unique(scale_of_token):
        keep = scale_of_token == s
        p = pred[:, keep].reshape(-1, pred.shape[-1]).float()
        t = target[:, keep].reshape(-1, target.shape[-1]).float()
        logits = p @ t.T
        labels = torch.arange(len(p), device=p.device)
        losses.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    return torch.stack(losses).mean()


class ClipMSELoss(nn.Module):
    """Benchetrit's objective (docs/methods/meg_brainmodule.md §5): ``L = λ·L_CLIP + (1 − λ)·L_MSE``.

    ``L_CLIP``: logits ``S_ij = exp(t)·cos(ẑ_i^{clip}, z_j)`` (``(B, B)``); symmetric:
    ``½[CE(S, arange) + CE(Sᵀ, arange)]``, otherwise only the brain→image direction ``CE(S, arange)``.
    The scale is ``exp(t)`` with ``t`` learnable (``learn_scale``) initialised at ``init_log_scale``
    (5.0, a THINGS re-implementation's value, docs/methods/meg_brainmodule.md §8; CLIP's
    ``log(1/0.07) ≈ 2.66`` is the usual alternative).
    ``L_MSE = mean_{i,f} (z_if − ẑ_if^{mse})²``.

    ``forward(pred, target)``: pred ``{"clip": (B, F), "mse": (B, F)}`` (a plain tensor is used for
    both terms), target ``(B, F)`` -> scalar. A term whose weight is 0 may be absent from ``pred``.
    """

    def __init__(self, lambda_clip: float = 0.75, init_log_scale: float = 5.0, learn_scale: bool = True,
                 symmetric: bool = True):
        super().__init__()
        if not 0.0 <= lambda_clip <= 1.0:
            raise ConfigError(f"loss.lambda_clip must be in [0, 1], got {lambda_clip}")
        self.lambda_clip, self.symmetric = lambda_clip, symmetric
        t = torch.tensor(float(init_log_scale))
        self.log_scale = nn.Parameter(t) if learn_scale else nn.Buffer(t)

    def clip_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = F.normalize(pred.reshape(len(pred), -1).float(), dim=-1)
        t = F.normalize(target.reshape(len(target), -1).float(), dim=-1)
        logits = p @ t.T * self.log_scale.exp()
        labels = torch.arange(len(p), device=p.device)
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits.T, labels)) / 2
        return loss

    def parts(self, pred: Mapping[str, torch.Tensor] | torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "clip", "mse"}`` (the terms a zero weight skips are absent)."""
        if isinstance(pred, torch.Tensor):
            pred = {"clip": pred, "mse": pred}
        out: dict[str, torch.Tensor] = {}
        total = target.new_zeros((), dtype=torch.float32)
        if self.lambda_clip > 0:
            out["clip"] = self.clip_loss(pred["clip"], target)
            total = total + self.lambda_clip * out["clip"]
        if self.lambda_clip < 1:
            out["mse"] = F.mse_loss(pred["mse"].float(), target.float())
            total = total + (1 - self.lambda_clip) * out["mse"]
        out["loss"] = total
        return out

    def forward(self, pred: Mapping[str, torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.parts(pred, target)["loss"]
