"""SoftCLIP and InfoNCE against independent reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from braindecode_fw.losses import InfoNCELoss, SoftCLIPLoss


def _norm(x):
    x = x.reshape(len(x), -1).double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def test_softclip_matches_formula():
    torch.manual_seed(0)
    p, t = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    tau = 0.1
    P, T = _norm(p), _norm(t)
    total = 0.0
    for i in range(5):
        q = _softmax(T[i] @ T.T / tau)
        total -= (q * np.log(_softmax(P[i] @ T.T / tau))).sum() / 5  # rows: brain queries
        total -= (q * np.log(_softmax(T[i] @ P.T / tau))).sum() / 5  # columns: image queries
    assert SoftCLIPLoss(tau)(p, t).item() == pytest.approx(total / 2, rel=1e-5)


def test_infonce_matches_formula_and_learns_temperature():
    torch.manual_seed(1)
    p, t = torch.randn(6, 8), torch.randn(6, 8)
    tau = 0.07
    P, T = _norm(p), _norm(t)
    S = P @ T.T / tau
    ref = 0.0
    for i in range(6):
        ref -= math.log(_softmax(S[i])[i]) / 12 + math.log(_softmax(S[:, i])[i]) / 12
    loss = InfoNCELoss(tau)
    assert loss(p, t).item() == pytest.approx(ref, rel=1e-5)
    learned = InfoNCELoss(tau, learn_temperature=True)
    learned(p, t).backward()
    assert learned.log_scale.grad is not None and learned.temperature == pytest.approx(tau)


def test_aligned_predictions_score_better():
    torch.manual_seed(2)
    t = torch.randn(16, 32)
    for loss in (SoftCLIPLoss(0.05), InfoNCELoss(0.05)):
        assert loss(t + 0.1 * torch.randn_like(t), t) < loss(t[torch.randperm(16)], t)
    with pytest.raises(ValueError, match="loss.temperature"):
        SoftCLIPLoss(0.0)
