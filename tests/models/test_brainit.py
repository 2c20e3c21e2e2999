"""Brain-IT's BIT decoder (docs/methods/brainit.md §3): the brain tokenizer against an explicit per-cluster
TransformerConv, the cross block against per-head attention written out, routing, voxel
subsampling, real-scale shapes and the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from braindecode_fw.models.brainit import (
    BrainInteractionTransformer,
    BrainTokenizer,
    CrossAttentionBlock,
    cluster_layout,
)


def reference_tokenizer(tok: BrainTokenizer, values: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor):
    """TransformerConv (1 head, root weight) over voxel -> cluster edges, one cluster at a time,
    with full voxel tokens t_v = y_v e_v pushed through the (biased) key/value layers."""
    out = []
    for b in range(values.shape[0]):
        rows = []
        for c in range(tok.n_clusters):
            z = tok.centers[c]
            members = torch.nonzero(labels == c).flatten()
            row = tok.skip(z)
            if len(members):
                t = values[b, members, None] * emb[members]  # (m, d)
                att = torch.softmax((tok.key(t) @ tok.query(z)) / math.sqrt(tok.dim), 0)
                row = row + (att[:, None] * tok.value(t)).sum(0)
            rows.append(row)
        out.append(torch.stack(rows))
    return tok.norm(torch.relu(torch.stack(out)))


def test_tokenizer_matches_per_cluster_transformer_conv():
    torch.manual_seed(0)
    tok = BrainTokenizer(dim=16, n_clusters=6)
    with torch.no_grad():  # non-zero biases so the affine-logit factorisation is really tested
        for lin in (tok.query, tok.key, tok.value, tok.skip):
            lin.bias.normal_()
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 4, 4, 1, 0, 2, 1])  # clusters 3 and 5 empty
    values, emb = torch.randn(3, 12), torch.randn(12, 16)
    got = tok(values, emb, labels)
    want = reference_tokenizer(tok, values, emb, labels)
    assert got.shape == (3, 6, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # gradients reach the voxel embeddings through both the attention and the values
    emb.requires_grad_(True)
    tok(values, emb, labels).square().sum().backward()
    assert emb.grad is not None and bool((emb.grad.abs().sum(1) > 0).all())


def test_cluster_layout_groups_voxels():
    labels = torch.tensor([3, 0, 3, 1, 3, 0])
    order, slot, m = cluster_layout(labels, 4)
    assert m == 3
    assert labels[order].tolist() == [0, 0, 1, 3, 3, 3]
    assert slot.tolist() == [0, 1, 0, 0, 1, 2]


def test_cross_block_is_unprojected_multihead_attention():
    torch.manual_seed(1)
    block = CrossAttentionBlock(dim=8, heads=2)
    q, brain = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    k, v = block.kv(block.norm_kv(brain)).chunk(2, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, -1)  # scale 1/sqrt(head_dim 4)
        heads.append(att @ v[..., sl])
    y = block.proj(torch.cat(heads, -1))
    want = y + block.mlp(block.norm_mlp(y))
    torch.testing.assert_close(block(q, brain), want, atol=1e-5, rtol=1e-5)


def small_bit(**kw) -> BrainInteractionTransformer:
    torch.manual_seed(0)
    bit = BrainInteractionTransformer({"subj01": 40, "subj02": 55}, n_queries=7, out_dim=5, n_clusters=6, dim=16,
                                      heads=4, depth=2, **kw)
    bit.set_cluster_labels("subj01", torch.arange(40) % 6)
    bit.set_cluster_labels("subj02", torch.arange(55) % 5)
    return bit.eval()


def test_mixed_batches_route_rows_and_queries_subset():
    bit = small_bit()
    x = torch.randn(4, 55)
    subjects = ["subj02", "subj01", "subj02", "subj01"]
    mixed = bit(x, subjects)
    alone = bit(x[[1, 3]], ["subj01", "subj01"])
    torch.testing.assert_close(mixed[[1, 3]], alone, atol=1e-5, rtol=1e-5)
    # subj01 reads only its own 40 voxels: padding beyond them is ignored
    padded = x.clone()
    padded[[1, 3], 40:] = 100.0
    torch.testing.assert_close(bit(padded, subjects)[[1, 3]], alone, atol=1e-5, rtol=1e-5)
    index = torch.tensor([6, 0, 3])
    torch.testing.assert_close(bit(x, subjects, query_index=index), mixed[:, index], atol=1e-5, rtol=1e-5)


def test_voxel_subsampling():
    bit = small_bit()
    x = torch.randn(2, 55)
    full = bit(x, ["subj02", "subj02"])
    torch.testing.assert_close(bit(x, ["subj02", "subj02"], voxels_per_step=55), full)
    a = bit(x, ["subj02", "subj02"], voxels_per_step=20, generator=torch.Generator().manual_seed(3))
    b = bit(x, ["subj02", "subj02"], voxels_per_step=20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, full)


def test_errors_name_the_problem():
    bit = BrainInteractionTransformer({"subj01": 10}, n_queries=2, out_dim=3, n_clusters=4, dim=8, heads=2, depth=1)
    with pytest.raises(RuntimeError, match="subject 'subj01' has no voxel clusters yet"):
        bit(torch.randn(1, 10), ["subj01"])
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\) \(model.n_clusters\)"):
        bit.set_cluster_labels("subj01", torch.arange(10))
    with pytest.raises(ValueError, match="subj01.*shape \\(9,\\), the subject has 10 voxels"):
        bit.set_cluster_labels("subj01", torch.zeros(9, dtype=torch.long))
    bit.set_cluster_labels("subj01", torch.arange(10) % 4)
    with pytest.raises(KeyError, match="no voxel embeddings for subject 'subj09'"):
        bit(torch.randn(1, 10), ["subj09"])
    with pytest.raises(ValueError, match="model.dim \\(10\\) must be divisible by model.heads \\(4\\)"):
        BrainInteractionTransformer({"s": 3}, n_queries=1, out_dim=1, dim=10, heads=4)


def bit_parameters(n_voxels: list[int], n_queries: int, out_dim: int, dim: int = 512, depth: int = 5,
                   n_clusters: int = 128) -> int:
    """The BIT's parameter count written out from its definition (docs/methods/brainit.md §3)."""
    ln, lin = 2 * dim, dim * dim + dim
    mlp = dim * 4 * dim + 4 * dim + 4 * dim * dim + dim
    tokenizer = n_clusters * dim + 4 * lin + ln
    self_block = 2 * ln + 3 * dim * dim + lin + mlp
    cross_block = ln + 2 * dim * dim + lin + ln + mlp
    return (sum(n_voxels) * dim + tokenizer + depth * self_block + (depth + 1) * cross_block
            + n_queries * dim + dim * out_dim + out_dim)


@pytest.mark.parametrize("branch,n_queries,out_dim,sampled", [("semantic", 256, 1664, None),
                                                              ("lowlevel", 7190, 512, 1232)])
def test_real_scale_forward_backward(branch, n_queries, out_dim, sampled):
    """NSD surface scale (docs/methods/brainit.md §1, §3): ~40k vertices per subject, 15,000 sampled per
    step, 128 clusters, dim 512, 8 heads, 5 blocks; the low-level branch predicts 1,232 sampled
    queries of 7,190 in training."""
    torch.manual_seed(0)
    n_vox = [39548, 40210]
    bit = BrainInteractionTransformer({"subj01": n_vox[0], "subj02": n_vox[1]}, n_queries=n_queries,
                                      out_dim=out_dim)
    for s, n in zip(("subj01", "subj02"), n_vox, strict=True):
        bit.set_cluster_labels(s, torch.randint(0, 128, (n,)))
    assert sum(p.numel() for p in bit.parameters()) == bit_parameters(n_vox, n_queries, out_dim)
    x = torch.randn(2, max(n_vox))
    index = None if sampled is None else torch.randperm(n_queries)[:sampled]
    out = bit(x, ["subj01", "subj02"], query_index=index, voxels_per_step=15000)
    assert out.shape == (2, sampled or n_queries, out_dim)
    F.mse_loss(out, torch.randn_like(out)).backward()
    assert bit.voxels.weight("subj02").grad is not None and bit.queries.grad is not None


def test_brainit_recipes_compose_and_build():
    """experiment=brainit_nsd names its extra targets and builds at real scale (meta device);
    experiment=brainit_synthetic builds, and its loss terms find their outputs."""
    from hydra.utils import instantiate

    from braindecode_fw.objectives import TermsObjective
    from braindecode_fw.schedules import WarmupPlateau
    from tests.conftest import compose_config

    nsd = compose_config("train", ["experiment=brainit_nsd"])
    assert sorted(t.feature_name for t in nsd.extra_targets.values()) == ["encoder_features", "vgg_tokens"]
    assert nsd.model.stage0.features == "encoder_features" and nsd.optim.scheduler._target_.endswith("WarmupPlateau")
    shapes = {"clip_image_tokens": (256, 1664), "vgg_tokens": (7190, 512), "encoder_features": (5, 257, 1024)}
    with torch.device("meta"):
        decoder = instantiate(nsd.model)(n_features={"subj01": 39548, "subj02": 40210}, target_shapes=shapes)
    assert {n: (b.n_queries, b.out_dim) for n, b in decoder.branches.items()} == {
        "semantic": (256, 1664), "lowlevel": (7190, 512)}
    assert decoder.token_sampling["lowlevel"] == ([3136, 3025, 784, 196, 49], [512, 512, 128, 64, 16])
    assert decoder.universal_encoder.config.n_layers == 5 and decoder.universal_encoder.config.n_tokens == 257
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=nsd.optim.optimizer.lr)
    assert isinstance(instantiate(nsd.optim.scheduler)(optimizer=opt), WarmupPlateau)

    syn = compose_config("train", ["experiment=brainit_synthetic"])
    shapes = {"clip_image_tokens": (64, 128)}
    torch.manual_seed(0)
    decoder = instantiate(syn.model)(n_features={"subj01": 120, "subj02": 160}, target_shapes=shapes)
    decoder.set_clusters({"subj01": torch.arange(120) % 32, "subj02": torch.arange(160) % 32})
    objective = instantiate(syn.loss)
    assert isinstance(objective, TermsObjective) and set(objective.terms) == {"semantic", "semantic_contrast"}
    out = decoder(torch.randn(2, 160), ["subj01", "subj02"], targets={"clip_image_tokens": torch.zeros(2, 64, 128)})
    for term in objective.terms.values():
        assert out[term.output].shape == (2, 64, 128)


def test_lowlevel_branch_samples_queries_only_when_a_loss_is_computed():
    from braindecode_fw.losses import multiscale_infonce
    from braindecode_fw.models.brainit import build_brainit_decoder
    from braindecode_fw.objectives import TermsObjective

    sizes = [16, 9, 4, 1, 1]  # a 31-token toy "multi-scale" target
    decoder = build_brainit_decoder({"subj01": 30}, {"vgg_tokens": (31, 6)}, dim=8, heads=2, depth=1, n_clusters=3,
                                    branches={"lowlevel": {"target": "vgg_tokens", "token_sampling": {
                                        "scale_sizes": sizes, "per_scale": [4, 3, 2, 1, 1]}}})
    decoder.set_clusters({"subj01": torch.arange(30) % 3})
    x, y = torch.randn(3, 30), torch.randn(3, 31, 6)
    full = decoder.eval()(x, ["subj01"] * 3)
    assert full["vgg_tokens"].shape == (3, 31, 6) and "vgg_tokens/index" not in full
    out = decoder(x, ["subj01"] * 3, targets={"vgg_tokens": y})
    index, scale = out["vgg_tokens/index"], out["vgg_tokens/scale"]
    assert out["vgg_tokens"].shape == (3, 11, 6) and scale.tolist() == [0] * 4 + [1] * 3 + [2] * 2 + [3, 4]
    torch.testing.assert_close(out["vgg_tokens"], full["vgg_tokens"][:, index])  # the sampled queries, same values
    objective = TermsObjective({"low": {"kind": "multiscale_infonce", "output": "vgg_tokens", "target": "vgg_tokens"}})
    objective.eval()
    from braindecode_fw.data.datamodule import Batch

    batch = Batch(subject=["subj01"] * 3, responses=x, image_index=torch.arange(3), targets={"vgg_tokens": y})
    decoder.generator.manual_seed(5)
    loss, parts, out = objective(decoder, batch, 0.5)
    torch.testing.assert_close(loss, multiscale_infonce(out["vgg_tokens"], y[:, out["vgg_tokens/index"]],
                                                        out["vgg_tokens/scale"]))
    del out["vgg_tokens/scale"]
    with pytest.raises(KeyError, match=r"a multiscale_infonce term needs the decoder's sampled queries"):
        objective(lambda *args, **kwargs: out, batch, 0.5)  # a decoder that gave the index but no scale


def test_embedding_target_is_read_by_one_query():
    """A 1-D target (a pooled CLIP embedding, e.g. the synthetic world's tiny CLIP) gets one query
    and a (B, D) output; it cannot be token-sampled."""
    from braindecode_fw.models.brainit import build_brainit_decoder

    torch.manual_seed(0)
    shapes = {"tiny_clip_image": (128,)}
    dec = build_brainit_decoder({"subj01": 30}, shapes, branches={"semantic": {"target": "tiny_clip_image"}},
                                dim=16, heads=2, depth=1, n_clusters=4, voxels_per_step=None)
    assert dec.branches["semantic"].n_queries == 1
    dec.set_clusters({"subj01": torch.arange(30) % 4})
    x = torch.randn(3, 30)
    out = dec(x, ["subj01"] * 3)["tiny_clip_image"]
    assert out.shape == (3, 128)
    torch.testing.assert_close(out, dec.branches["semantic"](x, ["subj01"] * 3)[:, 0])
    with pytest.raises(ValueError, match="token_sampling: the target 'tiny_clip_image' is an embedding"):
        build_brainit_decoder({"subj01": 30}, shapes, branches={"semantic": {
            "target": "tiny_clip_image", "token_sampling": {"image_size": 32, "per_scale": [1, 1, 1, 1, 1]}}})
    with pytest.raises(ValueError, match=r"must be a token target \(N, W\) or an embedding \(D,\)"):
        build_brainit_decoder({"subj01": 30}, {"x": (2, 3, 4)}, branches={"semantic": {"target": "x"}})
