"""SoftCLIP, InfoNCE, BiMixCo/MixCo, temperature schedule and normalised MSE against independent
reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from braindecode_fw.losses import (
    InfoNCELoss,
    SoftCLIPLoss,
    bimixco_loss,
    cosine_temperature,
    mixco_inputs,
    mixco_permutation,
    mixco_soft_labels,
    normalized_mse,
    soft_clip_loss,
)


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


def _bimixco_reference(pred, target, beta, label, tau):
    """Loop-by-loop BiMixCo as MindEye2 writes it (numpy float64)."""
    p = pred.reshape(len(pred), -1).double().numpy()
    t = target.reshape(len(target), -1).double().numpy()
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    s = p @ t.T / tau
    n = len(p)
    labels = np.zeros((n, n))
    for i in range(n):
        labels[i, i] = beta[i]
    for i in range(n):
        labels[i, label[i]] = 1 - beta[i]  # an assignment: overwrites the diagonal when label[i] == i

    def log_softmax(m):
        m = m - m.max(1, keepdims=True)
        return m - np.log(np.exp(m).sum(1, keepdims=True))

    rows = -np.mean([(labels[i] * log_softmax(s)[i]).sum() for i in range(n)])
    cols = -np.mean([(labels.T[i] * log_softmax(s.T)[i]).sum() for i in range(n)])
    return (rows + cols) / 2


def test_bimixco_matches_loop_reference_including_self_partner():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    beta = torch.tensor([1.0, 0.3, 1.0, 0.8, 0.5, 1.0])
    label = torch.tensor([0, 2, 1, 3, 5, 4])  # rows 0 (unmixed) and 3 (mixed) drew themselves
    soft = mixco_soft_labels(beta, label)
    assert soft[0].sum() == 0 and soft[3, 3] == pytest.approx(0.2)  # ME2's overwrite semantics
    ours = bimixco_loss(pred, target, soft, temperature=0.05)
    assert float(ours) == pytest.approx(_bimixco_reference(pred, target, beta.numpy(), label.numpy(), 0.05), rel=1e-5)


def test_mixco_partners_stay_within_subject_and_the_original_label_bug():
    subjects = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    partner, label = mixco_permutation(subjects, generator=torch.Generator().manual_seed(1))
    for i, j in enumerate(partner.tolist()):
        assert subjects[i] == subjects[j]  # voxel spaces differ: never mix across subjects
    assert torch.equal(partner, label)  # fixed: the soft label points at the true partner
    _, buggy = mixco_permutation(subjects, generator=torch.Generator().manual_seed(1), original_label_bug=True)
    assert torch.equal(buggy, partner - torch.tensor([0] * 4 + [4] * 4 + [8] * 4))  # local indices, no offset
    assert (buggy[4:] < 4).all()  # subjects b and c point at subject a's columns, as in ME2 pretraining


def test_mixco_inputs_mix_selected_rows_only():
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    partner = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    mixed, beta = mixco_inputs(x, partner, generator=torch.Generator().manual_seed(3))
    for i in range(8):
        assert torch.allclose(mixed[i], beta[i] * x[i] + (1 - beta[i]) * x[partner[i]], atol=1e-6)
    assert (beta == 1).any() and (beta < 1).any() and ((beta > 0) & (beta <= 1)).all()
    again, beta2 = mixco_inputs(x, partner, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, mixed) and torch.equal(beta, beta2)  # seeded


def test_beta_sampler_moments():
    from braindecode_fw.losses import _beta_sample

    x = _beta_sample(0.15, 200_000, torch.Generator().manual_seed(0)).double()
    assert float(x.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(x.var()) == pytest.approx(1 / (4 * (2 * 0.15 + 1)), rel=0.02)  # Beta(α, α) variance


def test_cosine_temperature_schedule_and_functional_softclip():
    # MindEye2: τ_e = 0.0075 + (0.004 − 0.0075)/2·(1 + cos(π·e/100)), rising from 0.004 to 0.0075
    assert cosine_temperature(0.0, 0.004, 0.0075) == pytest.approx(0.004)
    assert cosine_temperature(1.0, 0.004, 0.0075) == pytest.approx(0.0075)
    e = 37
    ref = 0.0075 + (0.004 - 0.0075) / 2 * (1 + math.cos(math.pi * e / 100))
    assert cosine_temperature(e / 100, 0.004, 0.0075) == pytest.approx(ref)
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.allclose(soft_clip_loss(pred, target, 0.01), SoftCLIPLoss(0.01)(pred, target))


def test_normalized_mse_matches_manual():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(3, 2, 6, generator=g), 5 * torch.randn(3, 2, 6, generator=g)
    p = pred.reshape(3, -1) / pred.reshape(3, -1).norm(dim=1, keepdim=True)
    t = target.reshape(3, -1) / target.reshape(3, -1).norm(dim=1, keepdim=True)
    assert torch.allclose(normalized_mse(pred, target), ((p - t) ** 2).mean())
    assert float(normalized_mse(pred, 3 * pred)) == pytest.approx(0.0, abs=1e-7)  # scale-free


def test_sample_scale_tokens_per_scale_without_replacement():
    from braindecode_fw.losses import sample_scale_tokens

    sizes, per = [1024, 961, 256, 64, 16], [512, 512, 128, 64, 16]  # Brain-IT's counts at 64 px
    idx, scale = sample_scale_tokens(sizes, per, torch.Generator().manual_seed(0))
    assert idx.shape == scale.shape == (1232,) and idx.dtype == scale.dtype == torch.long
    bounds = np.cumsum([0, *sizes])
    for s in range(5):
        mine = idx[scale == s].numpy()
        assert len(mine) == per[s] and len(set(mine.tolist())) == per[s]  # without replacement
        assert mine.min() >= bounds[s] and mine.max() < bounds[s + 1]
    assert sorted(idx[scale == 4].tolist()) == list(range(bounds[4], bounds[5]))  # all 16 of the last scale
    again, _ = sample_scale_tokens(sizes, per, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    rows, scale_b = sample_scale_tokens(sizes, per, torch.Generator().manual_seed(0), batch=3)
    assert rows.shape == (3, 1232) and torch.equal(scale_b, scale) and not torch.equal(rows[0], rows[1])
    with pytest.raises(ValueError, match=r"loss.per_scale: scale 2 has 256 tokens, cannot sample 300"):
        sample_scale_tokens(sizes, [512, 512, 300, 64, 16])
    with pytest.raises(ValueError, match=r"loss.per_scale: one count per scale \(5 scales\)"):
        sample_scale_tokens(sizes, [512, 512])


def _ce_rows_numpy(logits):
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - np.diag(logits)))


def test_multiscale_infonce_matches_loops_and_prefers_the_match():
    from braindecode_fw.losses import multiscale_infonce

    g = torch.Generator().manual_seed(5)
    scale = torch.tensor([0, 0, 0, 1, 1, 2])
    pred, target = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    # hand computation: rows are (image, token) pairs of one scale, raw dot products, both directions
    p, t = pred.double().numpy(), target.double().numpy()
    per_scale = []
    for s in range(3):
        cols = [j for j in range(6) if int(scale[j]) == s]
        rows_p = np.array([p[b, j] for b in range(4) for j in cols])
        rows_t = np.array([t[b, j] for b in range(4) for j in cols])
        logits = np.array([[rows_p[i] @ rows_t[k] for k in range(len(rows_t))] for i in range(len(rows_p))])
        per_scale.append((_ce_rows_numpy(logits) + _ce_rows_numpy(logits.T)) / 2)
    assert float(multiscale_infonce(pred, target, scale)) == pytest.approx(np.mean(per_scale), rel=1e-5)
    # no normalisation: scaling the prediction changes the loss
    assert float(multiscale_infonce(3 * pred, target, scale)) != pytest.approx(float(multiscale_infonce(pred, target, scale)))
    # a perfect prediction beats the same tokens shuffled
    target = torch.randn(8, 6, 16, generator=g)
    shuffled = target.reshape(48, 16)[torch.randperm(48, generator=g)].reshape(8, 6, 16)
    assert float(multiscale_infonce(target, target, scale)) < 0.5 * float(multiscale_infonce(shuffled, target, scale))
    with pytest.raises(ValueError, match=r"scale_of_token must be \(6,\)"):
        multiscale_infonce(pred, pred, scale[:5])
