"""Decoder: subject adapters -> shared encoder -> one head per target (design.md §2, §4)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn


class Decoder(nn.Module):
    """Composes the three parts; built from config with the data-dependent sizes injected.

    ``forward(responses, subjects)``: ``(B, F_max)`` -> ``{target_name: (B, *target_shape)}``.
    With ``responses`` of shape ``(B, R, F_max)`` and ``repeat_mask`` ``(B, R)``, every repetition
    goes through the network and the outputs are averaged over the real repetitions (MindEye2's
    test-time averaging in output space, methods.md §1.3).
    """

    def __init__(self, adapter: nn.Module, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.adapter = adapter
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, responses: torch.Tensor, subjects: Sequence[str],
                repeat_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if repeat_mask is not None:
            b, r = responses.shape[:2]
            flat_subjects = [s for s in subjects for _ in range(r)]
            out = self.forward(responses.reshape(b * r, -1), flat_subjects)
            w = repeat_mask.to(responses.dtype)
            w = w / w.sum(1, keepdim=True).clamp(min=1)
            return {k: torch.einsum("br...,br->b...", v.reshape(b, r, *v.shape[1:]), w) for k, v in out.items()}
        h = self.encoder(self.adapter(responses, subjects))
        return {name: head(h) for name, head in self.heads.items()}


def build_decoder(
    n_features: Mapping[str, int],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    adapter: Callable[..., nn.Module],
    encoder: Callable[..., nn.Module],
    head: Callable[..., nn.Module],
    hidden: int,
) -> Decoder:
    """Build from partial constructors (Hydra ``_partial_: true`` nodes) and data-derived sizes."""
    return Decoder(
        adapter=adapter(n_features=n_features, hidden=hidden),
        encoder=encoder(hidden=hidden),
        heads={name: head(hidden=hidden, target_shape=shape) for name, shape in target_shapes.items()},
    )
