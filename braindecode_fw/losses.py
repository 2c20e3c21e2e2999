"""Contrastive losses between brain predictions and target embeddings (methods.md §3.4).

All take ``pred`` and ``target`` of shape ``(B, *shape)``, flatten and L2-normalise them, and
return a scalar. Row ``i`` of ``pred`` and of ``target`` belong together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
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
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
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
