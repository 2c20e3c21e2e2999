"""Deterministic, name-keyed tensors for golden fixtures whose released code hard-codes widths too
large to store (STTM: 257 tokens, a 2048-wide projector, a 768-wide prior).

:func:`patterned` draws ``U(-1, 1)`` from NumPy's PCG64 seeded with ``(seed, crc32(name))`` and
scales it by the kind of tensor the name denotes, so the reference script (which loads the values
into the authors' modules) and the test (which loads them into ours) build the same tensors without
a file. Fixtures store the small tensors verbatim as well; the test checks they still equal the
regenerated ones, which catches a change of NumPy's stream.

:func:`summary` keeps a fixture small: a strided slice of a large output plus its mean and mean
square over every element.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def patterned(name: str, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """float32 ``shape`` tensor for parameter ``name`` (our naming):

    - biases (leaf ``bias`` or ``*_bias``): ``0.1·u``;
    - other 1-D ``weight`` (norm gains): ``1 + 0.1·u``;
    - ≥2-D ``weight``: ``u·√3/√fan_in`` (unit-variance outputs for unit inputs);
    - anything else (learned tokens, nulls, inputs): ``u·√3`` (unit variance), times ``dim**-0.5``
      for names ending ``_pos`` (position embeddings, initialised that way by dalle2 and STTM).
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    u = rng.uniform(-1.0, 1.0, size=tuple(int(s) for s in shape))
    leaf = name.rpartition(".")[2]
    if leaf == "bias" or leaf.endswith("_bias"):
        v = 0.1 * u
    elif leaf.endswith("weight") and u.ndim == 1:
        v = 1.0 + 0.1 * u
    elif leaf.endswith("weight"):
        v = u * np.sqrt(3.0 / u.shape[1])
    else:
        v = u * np.sqrt(3.0) * (u.shape[-1] ** -0.5 if leaf.endswith("_pos") else 1.0)
    return torch.from_numpy(v.astype(np.float32))


def patterned_state(shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    return {name: patterned(name, shape, seed) for name, shape in shapes.items()}


def summary(key: str, x: torch.Tensor, stride: int = 8, tokens: Sequence[int] = (0, 1, 128, 256)) -> dict[str, torch.Tensor]:
    """``{key/slice, key/mean, key/mean_square}``: for ``(B, T, D)`` tokens the rows ``tokens`` and
    every ``stride``-th feature; the moments over all elements (float64)."""
    x = x.detach()
    part = x[:, list(tokens), ::stride] if x.ndim == 3 else x.reshape(len(x), -1)[:, ::stride]
    xd = x.double()
    return {f"{key}/slice": part.float().contiguous(), f"{key}/mean": xd.mean().reshape(1),
            f"{key}/mean_square": xd.square().mean().reshape(1)}
