"""Shared trunks: subject-independent networks over the adapters' hidden space."""

from __future__ import annotations

import torch
from torch import nn

from braindecode_fw.errors import ConfigError


class ResidualMLPBlock(nn.Module):
    """``x + Dropout(W2 · GELU(W1 · LayerNorm(x)))`` on ``(..., hidden)`` (MindEye2 mixer block,
    docs/methods/mindeye2.md §2, without the input-independent seq_len=1 token mixer)."""

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
    translator block, STTM's adapter and shared blocks, docs/methods/mindbridge.md §2, docs/methods/sttm.md §2)."""

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


TRUNKS = ("as_released", "residual")


class MindEye2Trunk(nn.Module):
    """MindEye2's backbone trunk (Scotti et al. 2024; docs/methods/mindeye2.md §2; the released ``BrainNetwork``),
    ``(..., hidden) -> (..., hidden)``, with its parameters laid out as released
    (``mixer_blocks1[i] = LayerNorm(hidden) -> Linear -> GELU -> Dropout -> Linear`` and the
    token-mixing ``mixer_blocks2[i]`` = the same over a sequence axis of length ``seq_len`` = 1),
    so a released checkpoint's tensors map one to one.

    ``trunk`` (``model.encoder.trunk``):

    - ``as_released``: the released computation. It keeps two residual streams and adds the
      token-mixing block's output to the second one (``x = block2(x) + residual2``). With
      ``seq_len`` 1 the token-mixing block acts on an axis of length 1, so its LayerNorm returns
      its bias and the block is input-independent; and because the second stream starts from the
      input, the channel-mixing MLPs' outputs never reach the result. The trunk is therefore
      ``x + Σ_i c_i`` (learned constants, with dropout noise while training): the published
      MindEye2 numbers come from a ridge -> heads network. The MLPs get zero gradient; they exist
      for checkpoint compatibility. ``docs/fidelity.md``.
    - ``residual``: what the paper describes, a working residual MLP ``x <- x + block1(x)`` (the
      token-mixing blocks, input-independent at ``seq_len`` 1, are left out), equal to
      :class:`ResidualMLP` with ``final_norm`` false.
    """

    def __init__(self, hidden: int, n_blocks: int = 4, dropout: float = 0.15, trunk: str = "as_released"):
        super().__init__()
        if trunk not in TRUNKS:
            raise ConfigError(f"model.encoder.trunk: one of {list(TRUNKS)}, got {trunk!r}")
        self.hidden, self.trunk, self.seq_len = hidden, trunk, 1
        self.mixer_blocks1 = nn.ModuleList(self._mixer(hidden, dropout) for _ in range(n_blocks))
        self.mixer_blocks2 = (nn.ModuleList(self._mixer(self.seq_len, dropout) for _ in range(n_blocks))
                              if trunk == "as_released" else None)

    @staticmethod
    def _mixer(width: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(width), nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                                                nn.Dropout(dropout), nn.Linear(width, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer_blocks2 is None:
            for block in self.mixer_blocks1:
                x = x + block(x)
            return x
        lead = x.shape[:-1]
        x = x.reshape(-1, self.seq_len, self.hidden)  # (B, seq_len, hidden), as the released ridge gives
        residual1, residual2 = x, x.transpose(1, 2)
        for block1, block2 in zip(self.mixer_blocks1, self.mixer_blocks2, strict=True):
            x = block1(x) + residual1
            residual1 = x
            x = block2(x.transpose(1, 2)) + residual2
            residual2 = x
            x = x.transpose(1, 2)
        return x.reshape(*lead, self.hidden)
