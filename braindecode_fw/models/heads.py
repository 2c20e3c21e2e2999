"""Per-target output heads: hidden vector -> a target's embedding shape."""

from __future__ import annotations

import math

import torch
from torch import nn

from braindecode_fw.errors import ConfigError


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
    """Per-token MLP ``n_layers`` × (LayerNorm -> GELU -> Linear), ``(..., width) -> (..., width)``.

    MindEye2's ``clip_proj`` retrieval head keeps the width (3 layers, docs/methods/mindeye2.md §2); with
    ``inner`` the hidden layers are ``inner`` wide (STTM / MindEye1: 768 -> 2048 -> 2048 -> 768,
    docs/methods/sttm.md §2)."""

    def __init__(self, width: int, n_layers: int = 3, inner: int | None = None):
        super().__init__()
        sizes = [width, *[inner or width] * (n_layers - 1), width]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.LayerNorm(a), nn.GELU(), nn.Linear(a, b)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenAttentionHead(nn.Module):
    """STTM's token head (docs/methods/sttm.md §2), ``(B, hidden) -> (B, T, width)``.

    ``LayerNorm -> GELU -> Linear(hidden -> T·token_dim)`` gives ``T`` narrow tokens (257 × 128 at
    real scale); a pre-norm self-attention block (``heads`` heads, q/k/v projected to
    ``attention_dim`` = 768, output projected back to ``token_dim``) mixes them with a residual;
    ``LayerNorm -> Linear(token_dim -> mlp_dim) -> LayerNorm -> GELU -> Dropout -> Linear(mlp_dim
    -> width)`` widens each token to the target width (128 -> 1536 -> 768).

    As in STTM's released ``SelfAttention_with_MLP``, ``dropout`` also drops the attention branch
    before the residual sum, and ``attention_dropout`` the attention probabilities (0.1 there).
    ``logit_scale``: ``"inverse_sqrt"`` multiplies q·k by 1/√d_head (standard attention);
    ``"sqrt"`` by √d_head, what the released ``MultiHeadAttention`` computes (it divides by its
    ``scale = d_head**-0.5``), i.e. 96× sharper logits at real scale.
    """

    def __init__(self, hidden: int, n_tokens: int, width: int, token_dim: int = 128, attention_dim: int | None = None,
                 heads: int = 8, mlp_dim: int | None = None, dropout: float = 0.15, attention_dropout: float = 0.0,
                 logit_scale: str = "inverse_sqrt"):
        super().__init__()
        if logit_scale not in ("inverse_sqrt", "sqrt"):
            raise ConfigError(f"model.token_head.logit_scale: 'inverse_sqrt' or 'sqrt', got {logit_scale!r}")
        attention_dim = attention_dim or width
        mlp_dim = mlp_dim or 2 * width
        if attention_dim % heads:
            raise ConfigError(f"model.token_head: attention_dim {attention_dim} is not divisible by heads {heads}")
        self.n_tokens, self.token_dim, self.heads = n_tokens, token_dim, heads
        self.attention_dropout = attention_dropout
        head_dim = attention_dim // heads
        self.logit_scale = head_dim ** 0.5 if logit_scale == "sqrt" else head_dim ** -0.5
        self.residual_dropout = nn.Dropout(dropout)
        self.to_tokens = nn.Sequential(nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, n_tokens * token_dim))
        self.attention_norm = nn.LayerNorm(token_dim)
        self.qkv = nn.Linear(token_dim, 3 * attention_dim)
        self.attention_out = nn.Linear(attention_dim, token_dim)
        self.widen = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, mlp_dim), nn.LayerNorm(mlp_dim),
                                   nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.to_tokens(h).view(len(h), self.n_tokens, self.token_dim)
        q, k, v = self.qkv(self.attention_norm(x)).view(len(h), self.n_tokens, 3, self.heads, -1).unbind(2)
        attended = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=self.attention_dropout if self.training else 0.0, scale=self.logit_scale)
        x = x + self.residual_dropout(self.attention_out(attended.transpose(1, 2).flatten(2)))
        return self.widen(x)


class LowLevelHead(nn.Module):
    """MindEye2's low-level branch (docs/methods/mindeye2.md §2): ``(B, hidden)`` -> predicted VAE latent
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
            raise ConfigError(f"model.lowlevel.latent_shape: a square latent divisible by {factor}, got {latent_shape}")
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
