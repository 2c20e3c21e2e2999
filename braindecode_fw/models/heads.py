"""Per-target output heads: hidden vector -> a target's embedding shape."""

from __future__ import annotations

import math

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """``(..., hidden) -> (..., *target_shape)``: a linear map to the flattened target (MindEye2's
    ``backbone_linear``, 4096 -> 256·1664 at real scale) followed by an optional per-token MLP
    projector (MindEye2's ``clip_proj``: LN -> GELU -> Linear, ``projector_layers`` times), which
    acts on the last axis of the target (token width, or the whole vector for pooled targets).
    """

    def __init__(self, hidden: int, target_shape: tuple[int, ...] | list[int], projector_layers: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.target_shape = tuple(int(s) for s in target_shape)
        self.linear = nn.Linear(hidden, math.prod(self.target_shape))
        self.dropout = nn.Dropout(dropout)
        width = self.target_shape[-1]
        layers: list[nn.Module] = []
        for _ in range(projector_layers):
            layers += [nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width)]
        self.projector = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.linear(self.dropout(h)).reshape(*h.shape[:-1], *self.target_shape)
        return self.projector(out) if len(self.projector) else out
