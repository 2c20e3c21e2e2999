"""Closed-form ridge with leave-one-out penalty selection, against direct solves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.models.ridge import fit_ridge


def _reference(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return w, ym - xm @ w


def _loo_reference(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """Leave-one-out MSE by refitting (intercept included) without each row in turn."""
    errs = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        w, b = _reference(x[keep], y[keep], alpha)
        errs.append((y[i] - x[i] @ w - b) ** 2)
    return float(np.mean(errs))


@pytest.mark.parametrize(("n", "f"), [(40, 12), (12, 40), (12, 400)])  # primal, dual, dual far below N = F
def test_fit_ridge_matches_direct_solve_and_loo(n, f):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, f))
    w_true = rng.standard_normal((f, 3))
    y = x @ w_true + 0.5 * rng.standard_normal((n, 3)) + 2.0
    alphas = [1e-6, 0.1, 1.0, 10.0, 100.0]  # 1e-6: an interpolating fit must not look perfect
    fit = fit_ridge(torch.from_numpy(x), torch.from_numpy(y), alphas)
    loo = [_loo_reference(x, y, a) for a in alphas]
    np.testing.assert_allclose(fit.loo_mse, loo, rtol=1e-6)  # the 400×400 reference solve at α 1e-6 is ill-conditioned
    assert fit.alpha == alphas[int(np.argmin(loo))]
    w, b = _reference(x, y, fit.alpha)
    np.testing.assert_allclose(fit.weight.numpy(), w, atol=1e-6)
    np.testing.assert_allclose(fit.bias.numpy(), b, atol=1e-6)
    np.testing.assert_allclose(fit.predict(torch.from_numpy(x[:2])).numpy(), x[:2] @ w + b, atol=1e-6)


def test_edge_warning_only_when_the_error_still_falls():
    from braindecode_fw.models.ridge import RidgeFit

    w = torch.zeros(1, 1)
    assert RidgeFit(w, w[0], 0.1, [0.1, 1.0, 10.0], [0.5, 1.0, 2.0]).still_improving_at_edge()
    assert not RidgeFit(w, w[0], 0.1, [0.1, 1.0, 10.0], [0.999, 1.0, 2.0]).still_improving_at_edge()  # flat
    assert not RidgeFit(w, w[0], 1.0, [0.1, 1.0, 10.0], [1.5, 1.0, 2.0]).still_improving_at_edge()  # inside
    assert RidgeFit(w, w[0], 10.0, [10.0, 0.1, 1.0], [0.5, 2.0, 1.0]).still_improving_at_edge()  # unsorted grid


def test_fit_ridge_rejects_bad_input():
    with pytest.raises(ValueError, match=r"x \(N, F\) and y \(N, D\) with the same N, got \(5, 2\) and \(4, 1\)"):
        fit_ridge(torch.zeros(5, 2), torch.zeros(4, 1), [1.0])
    with pytest.raises(ValueError, match="positive penalties"):
        fit_ridge(torch.zeros(5, 2), torch.zeros(5, 1), [0.0])
