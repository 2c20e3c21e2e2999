"""Shared trunks: subject-independent networks over the adapters' hidden space."""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLPBlock(nn.Module):
    """``x + Dropout(W2 · GELU(W1 · LayerNorm(x)))`` on ``(..., hidden)`` (MindEye2 mixer block,
    methods.md §3.2, without the input-independent seq_len=1 token mixer)."""

    def __init__(self, hidden: int, expansion: float = 1.0, dropout: float = 0.15):
        super().__init__()
        inner = int(hidden * expansion)
        self.net = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualMLP(nn.Module):
    """Stack of :class:`ResidualMLPBlock`, ``(..., hidden) -> (..., hidden)``.

    Real scale (MindEye2): hidden 4096, 4 blocks; the synthetic default is much smaller.
    """

    def __init__(self, hidden: int, n_blocks: int = 4, expansion: float = 1.0, dropout: float = 0.15,
                 final_norm: bool = True):
        super().__init__()
        self.hidden = hidden
        self.blocks = nn.Sequential(*[ResidualMLPBlock(hidden, expansion, dropout) for _ in range(n_blocks)])
        # MindEye2's backbone feeds the last block straight into its heads (final_norm: false)
        self.norm = nn.LayerNorm(hidden) if final_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


class PostNormResidualBlock(nn.Sequential):
    """``x + Dropout(GELU(LayerNorm(W·x)))`` on ``(..., hidden)`` (post-norm ordering: MindBridge's
    translator block, STTM's adapter and shared blocks, methods.md §4.2, §7.2)."""

    def __init__(self, hidden: int, dropout: float = 0.15):
        super().__init__(nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class PostNormResidualMLP(nn.Module):
    """``n_blocks`` × :class:`PostNormResidualBlock`, ``(..., hidden) -> (..., hidden)``: MindBridge's
    translator (4 blocks of 2048 at real scale) and STTM's shared MLP (4 blocks of 4096)."""

    def __init__(self, hidden: int, n_blocks: int = 4, dropout: float = 0.15):
        super().__init__()
        self.hidden = hidden
        self.blocks = nn.Sequential(*[PostNormResidualBlock(hidden, dropout) for _ in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)
