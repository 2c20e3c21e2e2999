"""Session z-scoring from training trials only; NSD ncsnr against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from braindecode_fw.data.normalization import (
    fit_session_stats,
    ncsnr_from_repeats,
    noise_ceiling_percent,
)


def test_zscore_uses_training_trials_only():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    session = np.repeat([0, 1], 20)
    train = np.ones(40, bool)
    train[[3, 5, 25, 30]] = False
    x[~train] += 1000.0  # test trials far away: must not move the statistics
    st = fit_session_stats(x, session, train)
    for i, s in enumerate([0, 1]):
        ref = x[(session == s) & train].astype(np.float64)
        np.testing.assert_allclose(st.mean[i], ref.mean(0), rtol=1e-5)
        np.testing.assert_allclose(st.std[i], ref.std(0), rtol=1e-5)
    z = st.apply(x, session)
    np.testing.assert_allclose(z[train & (session == 1)].mean(0), 0, atol=1e-5)
    assert (z[~train] > 100).all()


def test_session_without_training_trials_falls_back_to_subject_stats():
    x = np.arange(30, dtype=np.float32).reshape(15, 2)
    session = np.array([0] * 12 + [1] * 3)
    train = session == 0
    st = fit_session_stats(x, session, train, min_trials=5)
    assert st.fallback_sessions == [1]
    np.testing.assert_allclose(st.mean[1], x[train].mean(0))


def test_zscore_unknown_session_is_an_error():
    st = fit_session_stats(np.ones((4, 2), np.float32), np.zeros(4, int), np.ones(4, bool))
    with pytest.raises(KeyError, match="no statistics"):
        st.apply(np.ones((1, 2)), np.array([3]))


def test_ncsnr_matches_loop_reference():
    rng = np.random.default_rng(1)
    r = rng.standard_normal((30, 3, 4))
    got = ncsnr_from_repeats(r)
    for v in range(4):
        noise = np.mean([np.var(r[i, :, v], ddof=1) for i in range(30)])
        total = np.var(r[:, :, v].ravel())
        np.testing.assert_allclose(got[v], np.sqrt(max(total - noise, 0)) / np.sqrt(noise))


def test_ncsnr_recovers_simulated_snr():
    rng = np.random.default_rng(2)
    true = np.array([0.1, 0.3, 0.6, 1.2])
    signal = rng.standard_normal((4000, 1, 4))
    r = signal + rng.standard_normal((4000, 3, 4)) / true
    np.testing.assert_allclose(ncsnr_from_repeats(r), true, rtol=0.06, atol=0.03)
    # NSD: NC = 100 * ncsnr^2 / (ncsnr^2 + 1/n)
    np.testing.assert_allclose(noise_ceiling_percent(np.array([1.0]), 3), [75.0])


def test_ncsnr_needs_repeats():
    with pytest.raises(ValueError, match="n_repeats>=2"):
        ncsnr_from_repeats(np.zeros((5, 1, 2)))
