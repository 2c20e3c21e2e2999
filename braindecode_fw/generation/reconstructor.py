"""The reconstructor interface (docs/architecture.md §4.5) and sample selection.

A :class:`Reconstructor` declares which decoder outputs it needs (target name -> shape) so that a
mismatch fails before any sampling, with a message naming both sides, and turns those outputs into
images: ``reconstruct(outputs, seeds) -> (n, 3, H, W)`` float in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from braindecode_fw.errors import ConfigError


def format_shape(shape: Sequence[int | None] | None) -> str:
    """``(None, 24)`` -> ``*×24``, ``(1024,)`` -> ``1024-d``, as the shape errors write them."""
    if shape is None:
        return "any shape"
    if len(shape) == 1:
        return f"{shape[0]}-d"
    return "×".join("*" if s is None else str(s) for s in shape)


def shape_fits(shape: Sequence[int | None] | None, got: Sequence[int]) -> bool:
    """Whether a provided shape ``got`` matches a declared ``shape`` (``None`` entries match any size,
    a ``None`` shape anything)."""
    return shape is None or (len(got) == len(shape) and all(
        s is None or s == g for s, g in zip(shape, got, strict=True)))


class ProgressSink(Protocol):
    """What :meth:`Reconstructor.reconstruct` reports finished images to."""

    def update(self, n: int = 1) -> None: ...


class Reconstructor:
    """Base class. Subclasses set :attr:`name` and implement :meth:`needs` and :meth:`reconstruct`."""

    name: str = "reconstructor"

    def needs(self) -> dict[str, tuple[int | None, ...] | None]:
        """Required decoder outputs: target name -> shape (``None`` entries match any size)."""
        raise NotImplementedError

    def optional(self) -> dict[str, tuple[int | None, ...] | None]:
        """Outputs used when present (e.g. a low-level VAE latent)."""
        return {}

    def check(self, provides: dict[str, tuple[int, ...]]) -> None:
        """Raise a ValueError naming what is needed and what the decoder provides."""
        problems = []
        for name, shape in self.needs().items():
            got = provides.get(name)
            if got is None or not shape_fits(shape, got):
                problems.append(f"{name} ({format_shape(shape)})")
        if problems:
            have = ", ".join(f"{k} {format_shape(v)}" for k, v in sorted(provides.items())) or "nothing"
            raise ConfigError(f"generator {self.name} needs {', '.join(problems)}; decoder provides {have}")

    def reconstruct(self, outputs: dict[str, torch.Tensor], seeds: Sequence[int], *,
                    progress: ProgressSink | None = None) -> dict[str, torch.Tensor]:
        """``outputs[name]``: ``(n, *shape)`` -> ``{"final": (n, 3, H, W)}`` (+ ``"lowlevel"`` when
        the generator produced one), float in [0, 1]; the keys are ``contracts.GENERATED_FINAL`` /
        ``GENERATED_LOWLEVEL``. ``progress.update(k)`` is called as each ``k`` images are done
        (:class:`~braindecode_fw.ops.progress.Progress`)."""
        raise NotImplementedError


def select_best_samples(candidates: torch.Tensor, predicted: torch.Tensor, encode) -> tuple[np.ndarray, np.ndarray]:
    """Pick, for each brain response, the sample whose embedding is most similar to the *predicted*
    embedding (cosine). ``candidates``: ``(n, k, 3, H, W)`` in [0, 1]; ``predicted``: ``(n, *shape)``;
    ``encode``: uint8 ``(m, H, W, 3)`` -> ``(m, *shape)`` (the target encoder). The ground-truth
    image is not an argument: selection cannot see it. Returns (chosen index, all scores ``(n, k)``)."""
    n, k = candidates.shape[:2]
    u8 = (candidates.flatten(0, 1).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    emb = torch.as_tensor(encode(u8)).float().reshape(n, k, -1)
    pred = torch.as_tensor(predicted).float().reshape(n, 1, -1)
    scores = torch.nn.functional.cosine_similarity(emb, pred, dim=-1)
    return scores.argmax(dim=1).numpy(), scores.numpy()
