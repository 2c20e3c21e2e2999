"""MEG brain module (docs/methods/meg_brainmodule.md §2–5): shapes at real size, spatial attention masking and
dropout, subject routing, receptive field, Fourier features, aggregation, loss, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from braindecode_fw.models.meg import (
    ClipMSELoss,
    DilatedConvStack,
    MEGBrainModule,
    SpatialAttention,
    SubjectLayers,
    TemporalAggregation,
    fourier_positions,
)

SUBJECTS = ["subj01", "subj02", "subj03", "subj04"]


def _grid_positions(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, generator=g)


def test_real_size_forward_backward():
    torch.manual_seed(0)
    model = MEGBrainModule(SUBJECTS, n_sensors=272, n_times=181, backbone_out=2048, out_dim=768)
    model.train()
    meg = torch.randn(2, 272, 181)
    pos = _grid_positions(272)
    valid = torch.ones(2, 272, dtype=torch.bool)
    valid[1, -5:] = False  # padded channels in the second row
    out = model(meg, ["subj02", "subj04"], pos, valid, return_features=True)
    assert out["clip"].shape == (2, 768) and out["mse"].shape == (2, 768)
    assert out["features"].shape == (2, 2048, 181)
    loss = ClipMSELoss()({"clip": out["clip"], "mse": out["mse"]}, torch.randn(2, 768))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # only the two subjects of the batch receive subject-layer gradients
    g = model.subject_layers.weights.grad
    assert g[1].abs().sum() > 0 and g[3].abs().sum() > 0
    assert g[0].abs().sum() == 0 and g[2].abs().sum() == 0


def test_fourier_features_against_loop():
    pos = _grid_positions(7)
    k_, m = 4, 0.2
    feats = fourier_positions(pos, n_harmonics=k_, margin=m)
    assert feats.shape == (7, 2 * k_ * k_)
    w = 1 + 2 * m
    for c in range(7):
        x, y = pos[c].tolist()
        cos, sin = [], []
        for k in range(k_):
            for ll in range(k_):
                phi = 2 * math.pi * (k * (x + m) + ll * (y + m)) / w
                cos.append(math.cos(phi))
                sin.append(math.sin(phi))
        torch.testing.assert_close(feats[c], torch.tensor(cos + sin), atol=1e-5, rtol=1e-5)
    assert fourier_positions(pos).shape == (7, 2048)
    assert fourier_positions(pos[None].expand(3, -1, -1)).shape == (3, 7, 2048)


def test_spatial_attention_ignores_invalid_channels():
    torch.manual_seed(0)
    sa = SpatialAttention(n_out=16, n_harmonics=8).eval()
    pos = _grid_positions(12)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[0, [2, 5]] = False
    valid[2, 9:] = False
    x = torch.randn(3, 12, 20, requires_grad=True)
    y = sa(x, pos, valid)
    assert y.shape == (3, 16, 20)
    y.square().sum().backward()
    assert (x.grad[~valid] == 0).all()
    assert (x.grad[valid].abs().sum(-1) > 0).all()
    x2 = x.detach().clone()
    x2[~valid] = torch.randn(int((~valid).sum()), 20) * 1e3
    assert torch.equal(sa(x2, pos, valid), y.detach())
    x2[~valid] = float("nan")  # garbage in padding never leaks
    assert torch.equal(sa(x2, pos, valid), y.detach())
    # weights: zero on invalid channels, a distribution over the valid ones
    w = sa.attention_weights(pos, valid, 3)
    assert (w.permute(0, 2, 1)[~valid] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 16))
    # sentinel positions (-0.1) are invalid by default
    pos_s = pos.clone()
    pos_s[4] = -0.1
    w = sa.attention_weights(pos_s, None, 1)
    assert (w[0, :, 4] == 0).all()


def test_spatial_attention_all_invalid_row_is_zero_not_nan():
    sa = SpatialAttention(n_out=8, n_harmonics=4).train()
    pos = _grid_positions(6)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1] = False
    x = torch.randn(2, 6, 5, requires_grad=True)
    y = sa(x, pos, valid, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    y.sum().backward()
    assert torch.isfinite(sa.heads.grad).all() and torch.isfinite(x.grad).all()


def test_spatial_dropout_training_only_and_seeded():
    torch.manual_seed(0)
    sa = SpatialAttention(n_out=10, n_harmonics=8, dropout_radius=0.2)
    side = torch.linspace(0, 1, 15)
    pos = torch.cartesian_prod(side, side)  # (225, 2) grid
    x = torch.randn(2, 225, 4)
    sa.eval()
    w_eval = sa.attention_weights(pos, None, 2, generator=torch.Generator().manual_seed(3))
    assert (w_eval > 0).all()  # no dropout in eval mode
    torch.testing.assert_close(sa(x, pos), sa(x, pos))
    sa.train()
    w1 = sa.attention_weights(pos, None, 2, generator=torch.Generator().manual_seed(3))
    w2 = sa.attention_weights(pos, None, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(w1, w2)
    centre = torch.rand(2, generator=torch.Generator().manual_seed(3))
    dropped = (pos - centre).norm(dim=-1) <= 0.2
    assert dropped.any() and (~dropped).any()
    for b in range(2):  # one centre for the whole batch
        assert (w1[b][:, dropped] == 0).all()
        assert (w1[b][:, ~dropped] > 0).all()
    y1 = sa(x, pos, generator=torch.Generator().manual_seed(3))
    y2 = sa(x, pos, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, sa(x, pos, generator=torch.Generator().manual_seed(4)))


def test_subject_layers_route_by_subject():
    torch.manual_seed(0)
    sl = SubjectLayers(6, ["subj01", "subj02", "subj03"])
    x = torch.randn(4, 6, 5)
    ids = ["subj03", "subj01", "subj03", "subj02"]
    y = sl(x, ids)
    index = {"subj01": 0, "subj02": 1, "subj03": 2}
    for b, s in enumerate(ids):
        ref = sl.weights[index[s]].T @ x[b]  # y[d, t] = Σ_c W[c, d] x[c, t]
        torch.testing.assert_close(y[b], ref)
    swapped = sl(x, ["subj02", "subj01", "subj03", "subj02"])
    torch.testing.assert_close(swapped[0], sl.weights[1].T @ x[0])
    torch.testing.assert_close(swapped[1:], y[1:])
    assert not torch.allclose(swapped[0], y[0])
    with pytest.raises(KeyError, match=r"subj09.*subj01"):
        sl(x, ["subj01", "subj09", "subj01", "subj01"])
    # init scale randn/√C
    big = SubjectLayers(270, ["a"])
    assert abs(big.weights.std().item() - 1 / math.sqrt(270)) < 0.002
    sl.add_subject("subj05")
    assert sl.weights.shape == (4, 6, 6) and sl(x, ["subj05"] * 4).shape == (4, 6, 5)


def test_dilation_schedule_and_receptive_field():
    depth, period, growth, kernel = 10, 5, 2, 3
    schedule = [growth ** (k % period) for k in range(depth)]
    assert schedule == [1, 2, 4, 8, 16, 1, 2, 4, 8, 16]
    n_glu = len([k for k in range(depth) if k % 2 == 1])
    rf = 1 + sum((kernel - 1) * d for d in schedule) + 2 * n_glu
    assert rf == 135  # docs/methods/meg_brainmodule.md §3: 1 + 2·Σd + 5·2
    torch.manual_seed(0)
    stack = DilatedConvStack(in_channels=8, hidden=16, depth=depth).double().eval()
    assert stack.dilations == schedule and stack.glu_after == [1, 3, 5, 7, 9]
    assert stack.receptive_field == rf
    assert [m[0].dilation[0] for m in stack.layers] == schedule
    t_len, t0 = 201, 100
    x = torch.randn(1, 8, t_len, dtype=torch.float64)
    x2 = x.clone()
    x2[0, :, t0] += 1.0
    with torch.no_grad():
        diff = (stack(x2) - stack(x)).abs().amax(1)[0]
    half = (rf - 1) // 2
    inside = torch.zeros(t_len, dtype=torch.bool)
    inside[t0 - half: t0 + half + 1] = True
    assert (diff[~inside] == 0).all()  # float64 direct convolution: exactly no influence outside
    assert diff[t0 - half] > 0 and diff[t0 + half] > 0  # ... and the field's edges are reached
    assert diff[t0] > 1e3 * diff[t0 - half]
    assert stack(x).shape == (1, 16, t_len)


def test_temporal_aggregation():
    x = torch.randn(3, 12, 181)
    assert TemporalAggregation("mean", 181)(x).shape == (3, 12)
    torch.testing.assert_close(TemporalAggregation("mean", 181)(x), x.mean(-1))
    aff = TemporalAggregation("affine", 181)
    w, b = aff.linear.weight[0], aff.linear.bias[0]
    ref = torch.stack([torch.stack([sum(w[t] * x[i, f, t] for t in range(181)) + b for f in range(12)])
                       for i in range(3)])
    torch.testing.assert_close(aff(x), ref, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in aff.parameters()) == 182
    att = TemporalAggregation("attention", 181, channels=12, hidden=256)
    y = att(x)
    assert y.shape == (3, 12)
    alpha = att.score(torch.tanh(att.proj(x.transpose(1, 2)))).softmax(1)
    torch.testing.assert_close(y, torch.einsum("btk,bft->bf", alpha, x))
    with pytest.raises(ValueError):
        TemporalAggregation("max", 181)
    with pytest.raises(ValueError):
        aff(torch.randn(2, 12, 100))


def _reference_clip(pred, target, scale, symmetric):
    b = len(pred)
    sim = torch.empty(b, b)
    for i in range(b):
        for j in range(b):
            sim[i, j] = F.cosine_similarity(pred[i], target[j], dim=0) * scale
    rows = -sum(sim[i, i] - torch.logsumexp(sim[i], 0) for i in range(b)) / b
    if not symmetric:
        return rows
    cols = -sum(sim[i, i] - torch.logsumexp(sim[:, i], 0) for i in range(b)) / b
    return (rows + cols) / 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_mse_loss_reference(symmetric):
    torch.manual_seed(0)
    pc, pm, z = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    loss = ClipMSELoss(lambda_clip=0.75, init_log_scale=1.5, symmetric=symmetric)
    clip = _reference_clip(pc, z, math.exp(1.5), symmetric)
    mse = sum(((z[i] - pm[i]) ** 2).sum() for i in range(5)) / (5 * 8)
    torch.testing.assert_close(loss({"clip": pc, "mse": pm}, z), 0.75 * clip + 0.25 * mse)
    parts = loss.parts({"clip": pc, "mse": pm}, z)
    torch.testing.assert_close(parts["clip"], clip)
    torch.testing.assert_close(parts["mse"], mse)
    # limits
    only_clip = ClipMSELoss(lambda_clip=1.0, init_log_scale=1.5, symmetric=symmetric)
    torch.testing.assert_close(only_clip({"clip": pc}, z), clip)
    torch.testing.assert_close(ClipMSELoss(lambda_clip=0.0)({"mse": pm}, z), mse)
    # learned scale gets a gradient; fixed scale is a buffer
    value = loss({"clip": pc, "mse": pm}, z)
    value.backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad != 0
    fixed = ClipMSELoss(learn_scale=False)
    assert not list(fixed.parameters()) and float(fixed.log_scale) == 5.0
    with pytest.raises(ValueError):
        ClipMSELoss(lambda_clip=1.5)


def test_parameter_counts_brainmagick_and_recommended():
    # brainmagick clip_conv: SA 270 (K=32), 1×1 270→270, subject layers, 10 layers hidden 320,
    # complex_out 320→640→F with F = 1024, no aggregation / heads (docs/methods/meg_brainmodule.md §3: ≈7.6 M + 72,900/subject)
    bm = MEGBrainModule(SUBJECTS, backbone_out=1024, aggregation=None, out_dim=None)
    counts = bm.parameter_counts()
    expected_shared = (
        270 * 2048                                  # spatial attention heads
        + 270 * 270 + 270                           # initial 1×1 conv
        + (270 * 320 * 3 + 320) + 2 * 320           # layer 0 conv + BN
        + 9 * ((320 * 320 * 3 + 320) + 2 * 320)     # layers 1–9
        + 5 * (320 * 640 * 3 + 640)                 # 5 GLU gates
        + (320 * 640 + 640) + (640 * 1024 + 1024)   # complex_out
    )
    assert counts["shared"] == expected_shared == 7_596_754
    assert abs(counts["shared"] - 7.6e6) / 7.6e6 < 0.01
    assert counts["per_subject"] == 72_900 and counts["subject_total"] == 4 * 72_900
    out = bm(torch.randn(2, 272, 181), ["subj01", "subj02"], _grid_positions(272))
    assert out["features"].shape == (2, 1024, 181)
    # recommended Benchetrit config: F' = 2048, affine aggregation, 2 heads F = 768
    rec = MEGBrainModule(SUBJECTS).parameter_counts()
    extra = (640 * 2048 + 2048) - (640 * 1024 + 1024) + 182 + 2 * (2 * 2048 + 2048 * 768 + 768)
    assert rec["shared"] == expected_shared + extra == 11_408_776
    assert rec["total"] == 11_408_776 + 4 * 72_900 == 11_700_376


def test_module_input_validation_and_default_positions():
    pos = _grid_positions(10)
    m = MEGBrainModule(["subj01"], n_sensors=10, n_times=20, spatial_channels=8, hidden=12, depth=4,
                       backbone_out=16, out_dim=4, n_harmonics=4, positions=pos).eval()
    out = m(torch.randn(3, 10, 20), ["subj01"] * 3)
    assert out["clip"].shape == (3, 4)
    with pytest.raises(ValueError, match="expected"):
        m(torch.randn(3, 9, 20), ["subj01"] * 3)
    with pytest.raises(KeyError, match="subj02"):
        m(torch.randn(1, 10, 20), ["subj02"])
    for kind in ("mean", "attention"):
        mk = MEGBrainModule(["subj01"], n_sensors=10, n_times=20, spatial_channels=8, hidden=12, depth=4,
                            backbone_out=16, out_dim=4, n_harmonics=4, aggregation=kind)
        assert mk(torch.randn(2, 10, 20), ["subj01"] * 2, pos)["mse"].shape == (2, 4)


def test_module_training_dropout_reproducible_with_generator():
    torch.manual_seed(0)
    pos = _grid_positions(30)
    m = MEGBrainModule(["subj01", "subj02"], n_sensors=30, n_times=20, spatial_channels=8, hidden=12, depth=4,
                       backbone_out=16, out_dim=4, n_harmonics=4).train()
    x = torch.randn(2, 30, 20)
    a = m(x, ["subj01", "subj02"], pos, generator=torch.Generator().manual_seed(7))
    b = m(x, ["subj01", "subj02"], pos, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    m.eval()
    torch.testing.assert_close(m(x, ["subj01", "subj02"], pos), m(x, ["subj01", "subj02"], pos))


# ---------------------------------------------------------------------------------------------
# MEGDecoder: the brain module behind the decoder contract, and its objective


def _small_decoder(n_features=None, **kw):
    from braindecode_fw.models.meg import build_meg_decoder

    kw = {"spatial_channels": 16, "n_harmonics": 4, "hidden": 16, "depth": 2, "backbone_out": 32,
          "n_times": 20, **kw}
    return build_meg_decoder(n_features or {"s1": 272, "s2": 271}, {"z": (8,)}, **kw)


def test_meg_decoder_ignores_padded_sensors_and_round_trips_geometry():
    from braindecode_fw.data.meg_layout import sensor_positions, things_meg_channel_names

    torch.manual_seed(0)
    decoder = _small_decoder().eval()
    names = things_meg_channel_names()
    decoder.set_sensor_positions("s1", sensor_positions(names))
    decoder.set_sensor_positions("s2", sensor_positions(names[1:]))  # s2 lacks the first sensor
    x = torch.randn(3, 272, 20)
    garbage = x.clone()
    garbage[:, 271] = 1e3  # s2's 272nd channel is padding: its values must not matter
    subjects = ["s2", "s2", "s1"]
    a, b = decoder(x, subjects), decoder(garbage, subjects)
    torch.testing.assert_close(a["z"][:2], b["z"][:2])
    torch.testing.assert_close(a["regression/z"][:2], b["regression/z"][:2])
    assert not torch.allclose(a["z"][2], b["z"][2])  # for s1 the same channel is real
    # a fresh decoder restores the positions from the state dict (checkpoints carry the geometry)
    fresh = _small_decoder().eval()
    fresh.load_state_dict(decoder.state_dict())
    torch.testing.assert_close(fresh(x, subjects)["z"], a["z"])
    assert fresh.sensor_valid.sum(1).tolist() == [272, 271]
    with pytest.raises(KeyError, match="no subject layer for subject 's9'"):
        decoder(x[:1], ["s9"])


def test_clip_mse_objective_equals_the_reference_loss():
    from braindecode_fw.data.datamodule import Batch
    from braindecode_fw.objectives import ClipMSEObjective

    torch.manual_seed(1)
    decoder = _small_decoder({"s1": 10})
    decoder.set_sensor_positions("s1", torch.rand(10, 2))
    batch = Batch(subject=["s1"] * 6, responses=torch.randn(6, 10, 20), image_index=torch.arange(6),
                  targets={"z": torch.randn(6, 8)})
    objective = ClipMSEObjective(lambda_clip=0.6, init_log_scale=2.0).train()
    loss, parts, out = objective(decoder, batch, 0.0)
    reference = ClipMSELoss(lambda_clip=0.6, init_log_scale=2.0)(
        {"clip": out["z"], "mse": out["regression/z"]}, batch.targets["z"])
    torch.testing.assert_close(loss, reference)
    assert parts["negatives"] == 5 and parts["scale"] == pytest.approx(math.exp(2.0))
    # the learned scale gets a gradient through the objective (the optimiser sees it)
    loss.backward()
    assert objective.loss.log_scale.grad is not None and objective.loss.log_scale.grad != 0
    no_regression = _small_decoder({"s1": 10}, regression_heads=False)
    with pytest.raises(KeyError, match=r"loss.lambda_clip=0.6 needs the regression output 'regression/z'"):
        objective(no_regression, batch, 0.0)


def test_meg_objective_and_adaptation_errors_name_the_problem():
    from braindecode_fw.data.datamodule import Batch
    from braindecode_fw.objectives import ClipMSEObjective
    from braindecode_fw.tasks.adapt import add_subject

    decoder = _small_decoder({"s1": 10})
    batch = Batch(subject=["s1"] * 2, responses=torch.randn(2, 10, 20), image_index=torch.arange(2),
                  targets={"other": torch.randn(2, 8)})
    with pytest.raises(KeyError, match=r"no decoder output matches a batch target; outputs \['regression/z', 'z'\]"):
        ClipMSEObjective()(decoder, batch, 0.0)
    with pytest.raises(ValueError, match=r"bdf-adapt: MEGDecoder has no subject adapter to extend"):
        add_subject(decoder, "s2", 10, None)
