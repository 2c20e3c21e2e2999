"""A new shared trunk for braindecode_fw's decoder: a stack of gated MLP blocks.

Each block computes ``x + W_o((W_a x) * sigmoid(W_g x))`` after a LayerNorm (a gated linear unit,
Dauphin et al., ICML 2017, arXiv 1612.08083, used as a residual feed-forward block). It plugs into
``braindecode_fw.models.decoder.build_decoder`` as the ``encoder`` part: the per-subject adapters
map voxels to ``hidden`` features before it, one head per target reads its output.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedBlock(nn.Module):
    """``(B, hidden) -> (B, hidden)``: LayerNorm -> gated linear unit of width ``expansion·hidden``
    -> projection back, added to the input."""

    def __init__(self, hidden: int, expansion: float = 2.0, dropout: float = 0.1):
        super().__init__()
        width = int(hidden * expansion)
        self.norm = nn.LayerNorm(hidden)
        self.value = nn.Linear(hidden, width)
        self.gate = nn.Linear(hidden, width)
        self.out = nn.Linear(width, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.dropout(self.out(self.value(h) * torch.sigmoid(self.gate(h))))


class GatedMLP(nn.Module):
    """``n_blocks`` :class:`GatedBlock` s, ``(B, hidden) -> (B, hidden)``. ``hidden`` is injected by
    ``build_decoder``; the other arguments come from the model config."""

    def __init__(self, hidden: int, n_blocks: int = 2, expansion: float = 2.0, dropout: float = 0.1):
        super().__init__()
        self.blocks = nn.Sequential(*[GatedBlock(hidden, expansion, dropout) for _ in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)
