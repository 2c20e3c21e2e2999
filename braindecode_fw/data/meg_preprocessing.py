"""Epoch-level MEG preprocessing shared by the THINGS-MEG converter and the synthetic MEG world.

Benchetrit et al. 2023 / brainmagick (docs/methods/meg_brainmodule.md §1, §6): per epoch and channel, subtract the
mean over the baseline window ``[tmin, 0]``; then per *recording* (one run) and channel, centre on the
median and divide by the inter-quartile range (``RobustScaler``), and clamp to ``±clamp``.
brainmagick fits the scaler on ~200 sampled windows; we fit it on every sample of every epoch of the
recording (exact quantiles, deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braindecode_fw.errors import DataError


def baseline_correct(epochs: np.ndarray, times: np.ndarray, window: tuple[float | None, float] = (None, 0.0)) -> np.ndarray:
    """Subtract each channel's mean over ``window`` (seconds; ``None`` = first sample), per epoch.

    epochs: ``(n, C, T)``; times: ``(T,)`` seconds. Returns a new float array of the same shape.
    """
    times = np.asarray(times)
    lo = times[0] if window[0] is None else window[0]
    sel = (times >= lo - 1e-9) & (times <= window[1] + 1e-9)
    if not sel.any():
        raise DataError(f"baseline window {window} s contains no sample of the epoch ({times[0]:.3f}..{times[-1]:.3f} s)")
    x = np.asarray(epochs)
    return x - x[..., sel].mean(axis=-1, keepdims=True)


@dataclass
class RobustScaling:
    """Per-channel median and inter-quartile range of one recording: ``(C,)`` each."""

    median: np.ndarray
    iqr: np.ndarray

    @classmethod
    def fit(cls, epochs: np.ndarray, eps: float = 1e-20) -> RobustScaling:
        """Statistics over every epoch and sample of ``epochs`` ``(n, C, T)``, per channel (in blocks of
        channels, so a 2,000-epoch session needs tens of MB, not a float64 copy of the whole array)."""
        n_channels = epochs.shape[1]
        q = np.empty((3, n_channels), dtype=np.float64)
        step = max(1, 2**24 // max(1, epochs.shape[0] * epochs.shape[2]))
        for start in range(0, n_channels, step):
            block = np.asarray(epochs[:, start : start + step])
            block = np.moveaxis(block, 1, 0).reshape(block.shape[1], -1)
            q[:, start : start + step] = np.percentile(block, [25, 50, 75], axis=1)
        return cls(median=q[1], iqr=np.maximum(q[2] - q[0], eps))

    def apply(self, epochs: np.ndarray, clamp: float | None = None) -> np.ndarray:
        """``(n, C, T)`` -> ``(x - median) / iqr``, clamped to ``±clamp`` (``None``: no clamping), float32."""
        # float32 throughout (float32 keeps ~7 significant digits of any scale, Tesla included): no
        # float64 copy of a whole session
        out = np.asarray(epochs, dtype=np.float32) - self.median.astype(np.float32)[:, None]
        out /= self.iqr.astype(np.float32)[:, None]
        if clamp is not None:
            np.clip(out, -clamp, clamp, out=out)
        return out
