"""Closed-form ridge regression with leave-one-out selection of the penalty.

Used to initialise a new subject's linear adapter from a small budget (``adaptation.init: ridge``,
docs/decoders.md): with a few hundred trials and thousands of voxels, the exact ridge solution with
a penalty chosen by leave-one-out error is the best linear map the trials can determine, and
gradient descent from a random start does not reach it in the few hundred steps a budget allows.

Both sides are centred (the intercept is unpenalised). The fit works in whichever of the primal
(``F × F``) or dual (``N × N``) space is smaller, from one eigendecomposition shared by every
penalty, and the leave-one-out residuals come from the hat matrix' diagonal,
``e_i = (y_i − ŷ_i) / (1 − H_ii)`` with ``H = 11ᵀ/N + X_c (X_cᵀX_c + αI)⁻¹ X_cᵀ`` — exact for
penalised least squares, the intercept (the centring) refitted without the left-out row too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from braindecode_fw.errors import ConfigError


@dataclass
class RidgeFit:
    """``Y ≈ X @ weight + bias``: ``weight`` ``(F, D)``, ``bias`` ``(D,)``; ``alpha`` the chosen
    penalty; ``loo_mse`` the mean leave-one-out squared error for every candidate in ``alphas``."""

    weight: torch.Tensor
    bias: torch.Tensor
    alpha: float
    alphas: list[float]
    loo_mse: list[float]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype) @ self.weight + self.bias

    def still_improving_at_edge(self, tolerance: float = 0.01) -> bool:
        """The chosen penalty is the grid's smallest or largest and beats its neighbour by more
        than ``tolerance`` (relative): a wider grid would likely choose beyond it. (With more
        features than trials the error is flat for penalties far below the data's own noise
        eigenvalues, and an edge choice there means nothing.)"""
        order = sorted(range(len(self.alphas)), key=lambda i: self.alphas[i])
        best = order.index(self.alphas.index(self.alpha))
        if len(order) < 2 or best not in (0, len(order) - 1):
            return False
        neighbour = self.loo_mse[order[1 if best == 0 else -2]]
        return self.loo_mse[order[best]] < (1 - tolerance) * neighbour


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alphas: Sequence[float]) -> RidgeFit:
    """Ridge regression of ``y`` ``(N, D)`` on ``x`` ``(N, F)`` for every penalty in ``alphas``,
    keeping the one with the smallest leave-one-out MSE. ``x`` is used in its own dtype (it may be a
    flattened token target); the Gram matrix, its eigendecomposition and the solution are float64."""
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ConfigError(f"fit_ridge: x (N, F) and y (N, D) with the same N, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 3:
        raise ConfigError(f"fit_ridge: at least 3 samples are needed, got {len(x)}")
    if not alphas or min(alphas) <= 0:
        raise ConfigError(f"fit_ridge: positive penalties are needed, got {list(alphas)}")
    # the (possibly huge) design matrix stays in its own dtype; everything of size min(N, F)² or
    # smaller is float64
    y = y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    n, f = xc.shape
    dual = n <= f
    # one eigendecomposition for every alpha: K = XXᵀ = U S Uᵀ (dual) or XᵀX = V S Vᵀ (primal)
    s, u = torch.linalg.eigh((xc @ xc.T if dual else xc.T @ xc).double())
    s = s.clamp(min=0)
    null = s <= 1e-10 * s.max()  # the centring's constant direction (and any other exact null space)
    basis = None if dual else (xc @ u.to(xc.dtype)).double()  # primal: the hat matrix is B diag(1/(s+α)) Bᵀ
    rotated = (u if dual else basis).T @ yc  # (k, D)
    losses = []
    for alpha in alphas:
        if dual:
            # I − H_c = U diag(α / (s + α)) Uᵀ, summed directly: no cancellation when the fit
            # (nearly) interpolates; the constant eigenvector (s = 0) gives the 1/N the intercept takes
            keep = torch.where(null, 1.0, alpha / (s + alpha))
            residual = u @ (keep[:, None] * rotated)
            one_minus_hat = (u ** 2) @ keep - 1 / n
        else:
            residual = yc - basis @ ((1 / (s + alpha))[:, None] * rotated)
            one_minus_hat = 1 - 1 / n - (basis ** 2) @ (1 / (s + alpha))
        # the unpenalised intercept adds 11ᵀ/N to the hat matrix; leaving it out would let the
        # left-out row leak through the centring (exactly so once N < F and the fit interpolates)
        loo = residual / one_minus_hat.clamp(min=1e-12)[:, None]
        losses.append(float(loo.pow(2).mean()))
    best = int(torch.tensor(losses).argmin())
    alpha = float(alphas[best])
    # W = X_cᵀ U (S + α)⁻¹ Uᵀ Y_c (dual) or V (S + α)⁻¹ Vᵀ X_cᵀ Y_c (primal); both Uᵀ Y_c and
    # Vᵀ X_cᵀ Y_c are `rotated`
    solved = (1 / (s + alpha))[:, None] * rotated
    weight = (xc.T @ (u @ solved).to(xc.dtype)).double() if dual else u @ solved
    return RidgeFit(weight=weight, bias=y_mean - x_mean.double() @ weight, alpha=alpha, alphas=[float(a) for a in alphas],
                    loo_mse=losses)
