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


class TokenProjector(nn.Module):
    """Per-token MLP ``n_layers`` × (LayerNorm -> GELU -> Linear(width, width)), ``(..., width)``:
    MindEye2's ``clip_proj`` retrieval head (3 layers, methods.md §3.2)."""

    def __init__(self, width: int, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n_layers):
            layers += [nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LowLevelHead(nn.Module):
    """MindEye2's low-level branch (methods.md §3.2): ``(B, hidden)`` -> predicted VAE latent
    ``(B, c, s, s)`` (4×28×28 at real scale) and, with ``aux_dim``, auxiliary tokens
    ``(B, (s/4)², aux_dim)`` for the ConvNeXt distillation.

    ``Linear(hidden -> channels·(s/4)²) -> Dropout -> reshape -> GroupNorm(1)`` then a diffusers VAE
    ``Decoder`` (3 up blocks [32, 64, 128], 2 upsamplings) to the latent; the aux projector is
    ``1×1 conv (no bias) -> GN -> ReLU`` twice and a final ``1×1 conv``."""

    def __init__(self, hidden: int, latent_shape: tuple[int, int, int] | list[int] = (4, 28, 28), channels: int = 64,
                 dropout: float = 0.3, up_channels: tuple[int, ...] | list[int] = (32, 64, 128),
                 aux_dim: int | None = 512):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder as VaeDecoder

        c, s, s2 = (int(v) for v in latent_shape)
        factor = 2 ** (len(up_channels) - 1)
        if s != s2 or s % factor:
            raise ValueError(f"model.lowlevel.latent_shape: a square latent divisible by {factor}, got {latent_shape}")
        self.seed = s // factor
        self.channels = channels
        self.linear = nn.Linear(hidden, channels * self.seed ** 2)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.GroupNorm(1, channels)
        self.upsampler = VaeDecoder(in_channels=channels, out_channels=c, up_block_types=["UpDecoderBlock2D"] * len(up_channels),
                                    block_out_channels=list(up_channels), layers_per_block=1,
                                    norm_num_groups=min(32, min(up_channels)))
        self.aux = None
        if aux_dim:
            self.aux = nn.Sequential(
                nn.Conv2d(channels, aux_dim, 1, bias=False), nn.GroupNorm(1, aux_dim), nn.ReLU(),
                nn.Conv2d(aux_dim, aux_dim, 1, bias=False), nn.GroupNorm(1, aux_dim), nn.ReLU(),
                nn.Conv2d(aux_dim, aux_dim, 1))

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm(self.dropout(self.linear(h)).view(len(h), self.channels, self.seed, self.seed))
        out = {"latent": self.upsampler(x)}
        if self.aux is not None:
            out["aux_tokens"] = self.aux(x).flatten(2).transpose(1, 2)
        return out
