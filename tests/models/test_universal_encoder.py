"""Universal Brain Encoder (docs/methods/brainit.md §2): shapes at real scale, the unscaled voxel-query
attention and the whole forward pass against independent NumPy code, the loss, and a tiny fit on a
planted world whose clusters V2C must recover."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.data.datamodule import Batch
from braindecode_fw.models.universal_encoder import (
    UniversalEncoder,
    UniversalEncoderConfig,
    VoxelQueryAttention,
    encoder_loss,
    fit_universal_encoder,
    mean_correlation,
    sample_voxels,
    universal_encoder_parameter_count,
    voxel_correlations,
)
from braindecode_fw.models.voxel_clusters import cluster_agreement, fit_voxel_clusters

TINY = {"in_dim": 12, "n_layers": 2, "n_tokens": 9, "dim": 8, "embed_dim": 8, "dropout": 0.0}


def test_real_scale_forward_backward_with_voxel_subsampling():
    torch.manual_seed(0)
    enc = UniversalEncoder({"subj01": 40_000, "subj02": 40_000}, init="unit")  # real-scale defaults
    cfg = enc.config
    assert (cfg.in_dim, cfg.n_layers, cfg.n_tokens, cfg.dim, cfg.embed_dim, cfg.dropout) == (1024, 5, 257, 128, 256, 0.25)
    c, d, e, t, L = 1024, 128, 256, 257, 5
    per_layer = 2 * c + (c * d + d) + (e * e + e) + (d * e + e) + t * e + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = L * per_layer - (L - 1) * t * e + e * L * d + 80_000 * e  # one positional embedding
    n_params = sum(p.numel() for p in enc.parameters())
    assert n_params == expected == universal_encoder_parameter_count(cfg, enc.n_voxels) == 22_529_792

    x = torch.randn(2, L, t, c)
    subjects = ["subj01", "subj02"]
    idx = sample_voxels(enc, subjects, 5000, torch.Generator().manual_seed(0))
    assert idx.shape == (2, 5000)
    for row in idx:  # without replacement, inside the subject's range
        assert len(torch.unique(row)) == 5000 and 0 <= int(row.min()) and int(row.max()) < 40_000
    pred = enc(x, subjects, idx)
    assert pred.shape == (2, 5000) and torch.isfinite(pred).all()
    assert 0.2 < float(pred.detach().std()) < 5.0  # unit-scale initial predictions
    encoder_loss(pred, torch.randn_like(pred)).backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if not n.startswith("voxel_embeddings"))
    # only the sampled voxels' embeddings receive gradient, each from its own subject's row
    g = enc.voxel_embeddings["subj01"].grad
    touched = torch.zeros(40_000, dtype=torch.bool)
    touched[idx[0]] = True
    assert (g[touched].abs().sum(1) > 0).all() and (g[~touched] == 0).all()


def test_attention_without_scaling_matches_numpy():
    torch.manual_seed(1)
    b, n, t, d, e = 2, 5, 7, 3, 4
    attn = VoxelQueryAttention(d, e, t)
    with torch.no_grad():
        attn.pos.normal_()  # make the positional term matter
    q, v = 1.5 * torch.randn(b, n, e), torch.randn(b, t, d)
    out = attn(q, v).detach().numpy()
    qn, vn = q.numpy().astype(np.float64), v.numpy().astype(np.float64)
    w, bias, pos = (p.detach().numpy().astype(np.float64) for p in (attn.key.weight, attn.key.bias, attn.pos))
    wq, bq = (p.detach().numpy().astype(np.float64) for p in (attn.query.weight, attn.query.bias))
    keys = vn @ w.T + bias + pos
    logits = np.einsum("bne,bte->bnt", qn @ wq.T + bq, keys)  # no 1/sqrt(e)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, weights @ vn, rtol=1e-5, atol=1e-6)
    scaled = np.exp(logits / np.sqrt(e) - (logits / np.sqrt(e)).max(-1, keepdims=True))
    scaled /= scaled.sum(-1, keepdims=True)
    assert np.abs(out - scaled @ vn).max() > 1e-2  # the scaled variant would be told apart


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_forward_matches_numpy_reference_for_mixed_subjects():
    torch.manual_seed(2)
    enc = UniversalEncoder({"a": 6, "b": 4}, **TINY).eval()
    x = torch.randn(3, 2, 9, 12)
    subjects = ["b", "a", "b"]
    idx = torch.tensor([[0, 3, 1], [5, 0, 2], [2, 2, 1]])
    pred = enc(x, subjects, idx).detach().numpy()
    P = {k: v.detach().numpy().astype(np.float64) for k, v in enc.state_dict().items()}  # shared pos under each layer
    xn = x.numpy().astype(np.float64)
    for r, s in enumerate(subjects):
        q = P[f"voxel_embeddings.{s}"][idx[r].numpy()]  # (n, e)
        feats = []
        for layer in range(2):
            p = lambda name, layer=layer: P[f"layers.{layer}.{name}"]  # noqa: E731
            h = _layer_norm(xn[r, layer], p("norm_in.weight"), p("norm_in.bias")) @ p("proj.weight").T + p("proj.bias")
            k = h @ p("attn.key.weight").T + p("attn.key.bias") + p("attn.pos")
            qp = q @ p("attn.query.weight").T + p("attn.query.bias")
            a = np.exp(qp @ k.T - (qp @ k.T).max(-1, keepdims=True))
            y = _layer_norm((a / a.sum(-1, keepdims=True)) @ h, p("norm_out.weight"), p("norm_out.bias"))
            feats.append(y + _gelu(y @ p("mlp.0.weight").T + p("mlp.0.bias")) @ p("mlp.2.weight").T + p("mlp.2.bias"))
        w_v = q @ P["readout"]  # W_v = e_v F, (n, L·d)
        np.testing.assert_allclose(pred[r], (np.concatenate(feats, -1) * w_v).sum(-1), rtol=1e-4, atol=1e-5)


def test_all_voxels_are_padded_and_agree_with_subsets():
    torch.manual_seed(3)
    enc = UniversalEncoder({"a": 6, "b": 4}, **TINY).eval()
    x = torch.randn(3, 2, 9, 12)
    full = enc(x, ["b", "a", "b"])
    assert full.shape == (3, 6)
    assert (full[[0, 2], 4:] == 0).all() and (full[1] != 0).all()
    sub = enc(x, ["b", "a", "b"], torch.tensor([[3, 0], [5, 1], [1, 2]]))
    torch.testing.assert_close(sub, torch.stack([full[0, [3, 0]], full[1, [5, 1]], full[2, [1, 2]]]))
    alone = enc(x[1:2], ["a"], torch.arange(6))  # (n,) index broadcast, single-subject batch
    torch.testing.assert_close(alone[0], full[1])
    one_layer = UniversalEncoder({"a": 6}, **{**TINY, "n_layers": 1}).eval()
    assert one_layer(x[:, 0], ["a"] * 3).shape == (3, 6)  # (B, T, C) input


def test_errors_name_the_problem():
    enc = UniversalEncoder({"a": 6}, **TINY)
    with pytest.raises(ValueError, match="n_layers"):
        enc(torch.randn(1, 3, 9, 12), ["a"])
    with pytest.raises(ValueError, match="n_tokens"):
        enc(torch.randn(1, 2, 8, 12), ["a"])
    with pytest.raises(KeyError, match="'zz'"):
        enc(torch.randn(1, 2, 9, 12), ["zz"])
    with pytest.raises(IndexError, match="6 voxels"):
        enc(torch.randn(1, 2, 9, 12), ["a"], torch.tensor([[6]]))
    with pytest.raises(ValueError, match=r"model.universal_encoder: unknown key\(s\) \['depth'\]"):
        UniversalEncoderConfig.from_mapping({"depth": 3})
    with pytest.raises(ValueError, match="model.universal_encoder.dropout"):
        UniversalEncoderConfig.from_mapping({"dropout": 1.5})
    with pytest.raises(ValueError, match=r"expected \(3, 8\)"):
        enc.add_subject("new", 3, init=np.zeros((3, 7)))
    batch = Batch(subject=["a"], responses=torch.zeros(1, 6), image_index=torch.zeros(1), targets={})
    with pytest.raises(KeyError, match="'tok'"):
        fit_universal_encoder(enc, lambda: [batch], feature="tok", epochs=1, log=None)


def test_encoder_loss_is_mse_minus_tenth_of_mean_cosine():
    pred = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 1.0], [-0.5, 1.0, 0.0]])
    p, t = pred.numpy(), target.numpy()
    cos = (p * t).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(t, axis=1)
    expected = ((p - t) ** 2).mean() - 0.1 * cos.mean()
    assert float(encoder_loss(pred, target)) == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    pm, tm = p * mask.numpy(), t * mask.numpy()
    cos_m = (pm * tm).sum(1) / np.linalg.norm(pm, axis=1) / np.linalg.norm(tm, axis=1)
    expected_m = ((p - t) ** 2)[mask.numpy()].mean() - 0.1 * cos_m.mean()
    assert float(encoder_loss(pred, target, mask=mask)) == pytest.approx(expected_m, rel=1e-6)


def _planted_world(seed: int = 0, n_voxels=(48, 60, 72), k: int = 4, n_train: int = 200, n_val: int = 60,
                   noise: float = 0.3) -> dict[str, dict]:
    """Random tokens (N, L=2, T=9, C=12); ``k`` latent groups, each reading a weighted pair of
    tokens of one layer along one channel direction; every voxel belongs to one group (gain
    0.8–1.2, noise sd ``noise``), so a voxel's ideal embedding is its group's."""
    rng = np.random.default_rng(seed)
    where = np.zeros((k, 9))
    for g in range(k):
        where[g, rng.choice(9, 2, replace=False)] = [0.7, 0.3]
    what, layer = rng.standard_normal((k, 12)), rng.integers(0, 2, k)
    world = {}
    for i, v in enumerate(n_voxels):
        groups, gain = rng.integers(0, k, v), rng.uniform(0.8, 1.2, v)

        def sample(n: int, groups=groups, gain=gain, v=v) -> tuple[np.ndarray, np.ndarray]:
            x = rng.standard_normal((n, 2, 9, 12)).astype(np.float32)
            drive = np.stack([(x[:, layer[g]] * where[g][None, :, None]).sum(1) @ what[g] for g in range(k)], 1)
            drive /= drive.std(0)
            return x, (drive[:, groups] * gain + noise * rng.standard_normal((n, v))).astype(np.float32)

        world[f"s{i}"] = {"groups": groups, "train": sample(n_train), "val": sample(n_val)}
    return world


def _batches(world: dict, split: str, batch_size: int = 24, seed: int = 0) -> list[Batch]:
    """Mixed-subject batches, responses zero-padded to the widest subject (the datamodule's layout)."""
    f_max = max(len(w["groups"]) for w in world.values())
    items = [(s, j) for s in world for j in range(len(world[s][split][0]))]
    order = np.random.default_rng(seed).permutation(len(items))
    out = []
    for a in range(0, len(order), batch_size):
        sel = [items[i] for i in order[a: a + batch_size]]
        resp = np.zeros((len(sel), f_max), np.float32)
        for r, (s, j) in enumerate(sel):
            resp[r, : len(world[s]["groups"])] = world[s][split][1][j]
        tokens = np.stack([world[s][split][0][j] for s, j in sel])
        out.append(Batch(subject=[s for s, _ in sel], responses=torch.from_numpy(resp),
                         image_index=torch.zeros(len(sel), dtype=torch.long), targets={"tok": torch.from_numpy(tokens)}))
    return out


def test_fit_on_planted_world_raises_correlation_and_v2c_recovers_groups():
    torch.manual_seed(0)
    world = _planted_world()
    enc = UniversalEncoder({s: len(w["groups"]) for s, w in world.items()}, **TINY)
    val = _batches(world, "val")
    r0 = mean_correlation(voxel_correlations(enc, val, "tok"))
    epoch = iter(range(1000))
    history = fit_universal_encoder(enc, lambda: _batches(world, "train", seed=next(epoch)), feature="tok",
                                    epochs=12, lr=1e-2, voxels_per_sample=32, seed=0, val_batches=val, log=None)
    assert [h["epoch"] for h in history] == list(range(12)) and history[-1]["steps"] == 12 * 25
    corrs = voxel_correlations(enc, val, "tok")
    assert {s: c.shape for s, c in corrs.items()} == {"s0": (48,), "s1": (60,), "s2": (72,)}
    r1 = mean_correlation(corrs)
    assert abs(r0) < 0.15 and r1 > 0.7, (r0, r1)  # noise ceiling ≈ 0.96
    assert history[-1]["val_r"] == pytest.approx(r1)
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    clusters = fit_voxel_clusters(enc.embeddings(), n_clusters=4, seed=0)
    scores = cluster_agreement(clusters, {s: w["groups"] for s, w in world.items()})
    assert scores["ari"] > 0.8 and abs(scores["random_ari"]) < 0.1, scores


def test_voxel_correlations_match_numpy_and_fit_is_seeded():
    torch.manual_seed(4)
    world = _planted_world(n_voxels=(10, 7), n_train=24, n_val=20)
    enc = UniversalEncoder({"s0": 10, "s1": 7}, **TINY)
    val = _batches(world, "val", batch_size=8)
    corrs = voxel_correlations(enc, val, "tok", voxel_chunk=3)
    with torch.no_grad():
        for s in ("s0", "s1"):
            x, y = world[s]["val"]
            pred = enc.eval()(torch.from_numpy(x), [s] * len(x)).numpy()
            ref = [np.corrcoef(pred[:, v], y[:, v])[0, 1] for v in range(y.shape[1])]
            np.testing.assert_allclose(corrs[s], ref, atol=1e-6)

    def run() -> tuple[list[dict], dict[str, torch.Tensor]]:
        torch.manual_seed(5)
        model = UniversalEncoder({"s0": 10, "s1": 7}, **{**TINY, "dropout": 0.25})
        hist = fit_universal_encoder(model, lambda: _batches(world, "train", batch_size=8), feature="tok",
                                     epochs=5, voxels_per_sample=5, seed=3, max_steps=8, log=None)
        return hist, {k: v.detach().clone() for k, v in model.state_dict().items()}

    state = torch.random.get_rng_state()
    (h1, s1), (h2, s2) = run(), run()
    assert len(h1) == 2 and [h["steps"] for h in h1] == [6, 8]  # max_steps stops inside the second epoch
    assert h1 == h2 and all(torch.equal(s1[k], s2[k]) for k in s1)
    torch.random.set_rng_state(state)


def test_transfer_trains_only_the_new_voxel_embeddings():
    torch.manual_seed(6)
    world = _planted_world(n_voxels=(10, 7), n_train=16, n_val=4)
    enc = UniversalEncoder({"s0": 10}, **TINY)
    init = torch.randn(7, 8)
    enc.add_subject("s1", 7, init=init)
    torch.testing.assert_close(enc.voxel_embeddings["s1"].detach(), init)
    before = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    only_s1 = {"s1": world["s1"]}
    fit_universal_encoder(enc, lambda: _batches(only_s1, "train", batch_size=8), feature="tok", epochs=1,
                          parameters=enc.voxel_parameters(["s1"]), log=None)
    changed = {k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"voxel_embeddings.s1"}
