"""Per-subject, per-session z-scoring with statistics from training trials only, and NSD's ncsnr.

NSD practice (docs/datasets/nsd.md) z-scores each voxel within each session. We fit the statistics on
the *training* trials of each session only, so that test trials (shared1000 / the synthetic shared
set) never leak into the normalisation, and apply them to every trial of that session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braindecode_fw.errors import DataError, UnknownNameError

_CHUNK_ROWS = 2048


@dataclass
class SessionStats:
    """Voxel-wise statistics per session: ``mean``/``std`` are ``(n_sessions, *feature_shape)``.

    ``sessions`` maps a session label to its row in ``mean``/``std``.
    """

    sessions: np.ndarray  # (n_sessions,) int64 session labels
    mean: np.ndarray  # float32
    std: np.ndarray  # float32
    fallback_sessions: list[int]  # sessions without enough training trials (use subject stats)

    def row_of(self, session: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.sessions, session)
        if np.any(pos >= len(self.sessions)) or np.any(self.sessions[np.minimum(pos, len(self.sessions) - 1)] != session):
            raise UnknownNameError(f"session(s) {np.setdiff1d(session, self.sessions)} have no statistics")
        return pos

    def apply(self, responses: np.ndarray, session: np.ndarray) -> np.ndarray:
        """``(n, *features)`` responses of the given sessions -> z-scored float32."""
        rows = self.row_of(np.asarray(session))
        return (np.asarray(responses, dtype=np.float32) - self.mean[rows]) / self.std[rows]


def _moments(responses: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sum and sum of squares (float64) over ``rows`` of a (possibly memory-mapped) array, chunked."""
    feat_shape = responses.shape[1:]
    s = np.zeros(feat_shape, dtype=np.float64)
    ss = np.zeros(feat_shape, dtype=np.float64)
    # ~64 MB of float64 per chunk whatever the row size (an MEG row is sensors × times)
    step = max(1, min(_CHUNK_ROWS, 2**23 // max(1, int(np.prod(feat_shape)))))
    for start in range(0, len(rows), step):
        chunk = np.asarray(responses[np.sort(rows[start : start + step])], dtype=np.float64)
        s += chunk.sum(0)
        ss += np.square(chunk).sum(0)
    return s, ss, len(rows)


def fit_session_stats(
    responses: np.ndarray,
    session: np.ndarray,
    train_mask: np.ndarray,
    *,
    min_trials: int = 10,
    eps: float = 1e-6,
) -> SessionStats:
    """Fit z-scoring statistics per session from the training trials of that session.

    responses: ``(trials, *features)`` (memory-mapped is fine; read in chunks).
    session: ``(trials,)`` session label per trial.  train_mask: ``(trials,)`` bool.
    Sessions with fewer than ``min_trials`` training trials use the subject-wide training
    statistics (listed in ``fallback_sessions``).
    """
    session = np.asarray(session)
    train_mask = np.asarray(train_mask, dtype=bool)
    if not train_mask.any():
        raise DataError("no training trials: cannot fit normalisation statistics")
    labels = np.unique(session)
    feat_shape = responses.shape[1:]
    mean = np.zeros((len(labels), *feat_shape), dtype=np.float32)
    std = np.ones((len(labels), *feat_shape), dtype=np.float32)
    total_s = np.zeros(feat_shape)
    total_ss = np.zeros(feat_shape)
    total_n = 0
    fallback: list[int] = []
    per_session: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    for label in labels:
        rows = np.flatnonzero((session == label) & train_mask)
        s, ss, n = _moments(responses, rows)
        total_s += s
        total_ss += ss
        total_n += n
        per_session[int(label)] = (s, ss, n)
    g_mean = total_s / total_n
    g_std = np.sqrt(np.maximum(total_ss / total_n - g_mean**2, 0.0))
    for i, label in enumerate(labels):
        s, ss, n = per_session[int(label)]
        if n < min_trials:
            fallback.append(int(label))
            m, sd = g_mean, g_std
        else:
            m = s / n
            sd = np.sqrt(np.maximum(ss / n - m**2, 0.0))
        mean[i] = m
        std[i] = np.maximum(sd, eps)
    return SessionStats(sessions=labels.astype(np.int64), mean=mean, std=std, fallback_sessions=fallback)


def ncsnr_from_repeats(responses: np.ndarray) -> np.ndarray:
    """Noise-ceiling SNR per voxel with NSD's formula (Allen et al. 2022, Methods "noise ceiling").

    responses: ``(n_images, n_repeats, n_voxels)``, each image shown ``n_repeats`` (>= 2) times,
    typically session-z-scored. Noise variance is the mean over images of the unbiased variance
    across repeats; signal variance is the total variance minus the noise variance (floored at 0;
    NSD's betas are z-scored so its total variance is 1); ncsnr = signal sd / noise sd.
    Returns ``(n_voxels,)`` float64.
    """
    r = np.asarray(responses, dtype=np.float64)
    if r.ndim != 3 or r.shape[1] < 2:
        raise DataError(f"expected (n_images, n_repeats>=2, n_voxels), got {r.shape}")
    noise_var = r.var(axis=1, ddof=1).mean(axis=0)
    total_var = r.reshape(-1, r.shape[-1]).var(axis=0)
    signal_var = np.maximum(total_var - noise_var, 0.0)
    return np.sqrt(signal_var) / np.sqrt(np.maximum(noise_var, 1e-12))


def noise_ceiling_percent(ncsnr: np.ndarray, n_average: int) -> np.ndarray:
    """NSD's noise ceiling in % variance explained when ``n_average`` trials are averaged."""
    return 100.0 * ncsnr**2 / (ncsnr**2 + 1.0 / n_average)
