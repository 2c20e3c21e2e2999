"""Adapters, trunk, heads and decoder: shapes at real sizes, routing, repetition averaging."""

from __future__ import annotations

import functools

import torch

from braindecode_fw.models.adapters import SubjectLinearAdapter
from braindecode_fw.models.decoder import build_decoder
from braindecode_fw.models.encoders import ResidualMLP
from braindecode_fw.models.heads import ProjectionHead

NSD_VOXELS = {"subj01": 15724, "subj06": 17907, "subj07": 12682}


def test_adapter_routes_rows_at_nsd_sizes():
    torch.manual_seed(0)
    ad = SubjectLinearAdapter(NSD_VOXELS, hidden=32)
    subjects = ["subj07", "subj01", "subj06", "subj01"]
    x = torch.randn(4, 17907)
    out = ad(x, subjects)
    assert out.shape == (4, 32)
    for i, s in enumerate(subjects):
        ref = ad.linears[s](x[i : i + 1, : NSD_VOXELS[s]])
        torch.testing.assert_close(out[i : i + 1], ref)
    # padding beyond a subject's voxel count is ignored
    x2 = x.clone()
    x2[0, 12682:] = 1e6
    torch.testing.assert_close(ad(x2, subjects)[0], out[0])


def test_adapter_unknown_subject():
    ad = SubjectLinearAdapter({"a": 3}, 4)
    try:
        ad(torch.zeros(1, 3), ["b"])
    except KeyError as e:
        assert "no adapter for subject 'b'" in str(e)
    else:  # pragma: no cover
        raise AssertionError


def test_trunk_and_token_head_at_real_shapes():
    trunk = ResidualMLP(64, n_blocks=4)
    head = ProjectionHead(64, (256, 1664), projector_layers=1)  # MindEye2 bigG token target
    h = trunk(torch.randn(3, 64))
    assert h.shape == (3, 64)
    out = head(h)
    assert out.shape == (3, 256, 1664)
    assert ProjectionHead(64, (257, 768))(h).shape == (3, 257, 768)  # CLIP ViT-L/14 tokens


def test_decoder_output_averaging_equals_manual_average():
    torch.manual_seed(0)
    dec = build_decoder(
        {"a": 5, "b": 7}, {"clip_image_tokens": (4, 3), "clip_image_pooled": (6,)},
        adapter=SubjectLinearAdapter, encoder=functools.partial(ResidualMLP, n_blocks=1, dropout=0.0),
        head=ProjectionHead, hidden=8,
    ).eval()
    x = torch.randn(2, 3, 7)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    out = dec(x, ["a", "b"], mask)
    assert set(out) == {"clip_image_tokens", "clip_image_pooled"}
    assert out["clip_image_tokens"].shape == (2, 4, 3)
    single = [dec(x[i, r : r + 1], [s]) for i, s in enumerate(["a", "b"]) for r in range(3)]
    ref0 = torch.stack([single[r]["clip_image_pooled"][0] for r in range(3)]).mean(0)
    ref1 = (single[3]["clip_image_pooled"][0] + single[5]["clip_image_pooled"][0]) / 2
    torch.testing.assert_close(out["clip_image_pooled"][0], ref0)
    torch.testing.assert_close(out["clip_image_pooled"][1], ref1)
