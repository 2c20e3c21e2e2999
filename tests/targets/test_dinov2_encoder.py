"""DINOv2 image target encoder (Benchetrit et al. 2023 MEG targets) on a tiny local Dinov2Model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.targets.encoders import (
    DINOV2_OUTPUTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    HFDinov2ImageEncoder,
    Preprocess,
)

HIDDEN = 32
PRE = Preprocess(image_size=28, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # 2x2 patches of 14


def _images(n=5, size=40):
    return np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                       image_size=28, patch_size=14)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dinov2") / "model"
    Dinov2Model(cfg).save_pretrained(path)
    return str(path)


def _enc(path, output, **kw):
    return HFDinov2ImageEncoder(path, output=output, local_files_only=True, preprocess=PRE, **kw)


def _enc_any(path, output, **kw):
    return _enc(path, output, **({"layers": [1, 2]} if output == "layer_tokens" else {}), **kw)


def test_output_shapes(dinov2_dir):
    shapes = {o: _enc_any(dinov2_dir, o).output_shape for o in DINOV2_OUTPUTS}
    # facebook/dinov2-giant at 224 px: pooled/mean 1536, cls_mean 3072, tokens 257 x 1536
    assert shapes == {"pooled": (HIDDEN,), "mean": (HIDDEN,), "cls_mean": (2 * HIDDEN,), "tokens": (5, HIDDEN),
                      "layer_tokens": (2, 5, HIDDEN)}


def test_outputs_match_independent_forward(dinov2_dir):
    from transformers import AutoModel

    images = _images()
    got = {o: _enc_any(dinov2_dir, o, batch_size=2).encode(images) for o in DINOV2_OUTPUTS}
    model = AutoModel.from_pretrained(dinov2_dir, local_files_only=True).eval()
    with torch.no_grad():
        pixels = PRE(images)
        out = model(pixel_values=pixels)
        # independent: run the encoder stack and apply the final layernorm ourselves
        hidden = model.encoder(model.embeddings(pixels)).last_hidden_state
        normed = model.layernorm(hidden)
    torch.testing.assert_close(got["pooled"], out.pooler_output)
    torch.testing.assert_close(got["pooled"], normed[:, 0])
    torch.testing.assert_close(got["tokens"], normed)
    torch.testing.assert_close(got["mean"], normed[:, 1:].mean(dim=1))
    torch.testing.assert_close(got["cls_mean"], torch.cat([normed[:, 0], normed[:, 1:].mean(dim=1)], dim=-1))
    assert not torch.allclose(got["pooled"], got["mean"])


def test_deterministic_and_batch_independent(dinov2_dir):
    images = _images(n=6)
    a = _enc(dinov2_dir, "cls_mean", batch_size=6).encode(images)
    b = _enc(dinov2_dir, "cls_mean", batch_size=4).encode(images)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, _enc(dinov2_dir, "cls_mean").encode(images), rtol=0, atol=0)


def test_encoder_id_tracks_output_revision_and_preprocess(dinov2_dir):
    ids = {o: _enc_any(dinov2_dir, o).encoder_id for o in DINOV2_OUTPUTS}
    assert len(set(ids.values())) == len(DINOV2_OUTPUTS)
    assert _enc(dinov2_dir, "pooled").encoder_id == ids["pooled"]  # stable
    other_pre = HFDinov2ImageEncoder(dinov2_dir, output="pooled", local_files_only=True,
                                     preprocess=Preprocess(image_size=28))  # CLIP statistics
    assert other_pre.encoder_id != ids["pooled"]
    blob = _enc(dinov2_dir, "pooled").id_blob()
    assert blob["backend"] == "transformers-dinov2" and blob["revision"] is None
    assert blob["preprocess"]["mean"] == IMAGENET_MEAN and blob["output"] == "pooled"
    enc = _enc(dinov2_dir, "pooled")
    enc.revision = "abc123"  # what revision=... records (a local folder has no revisions to load)
    assert enc.encoder_id != ids["pooled"]


def test_default_preprocess_is_imagenet_224(dinov2_dir):
    enc = HFDinov2ImageEncoder(dinov2_dir, local_files_only=True)
    assert enc.output == "pooled" and enc.feature_name == "dinov2_image"
    assert enc.preprocess.image_size == 224 and enc.preprocess.mean == IMAGENET_MEAN
    assert enc.preprocess.std == IMAGENET_STD


def test_unknown_output_names_config_key(dinov2_dir):
    with pytest.raises(ValueError, match=r"target\.output.*'pooled', 'mean', 'cls_mean', 'tokens'.*'cls'"):
        _enc(dinov2_dir, "cls")


def test_non_dinov2_folder_names_model_id(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"target\.model_id .* is not a DINOv2 model.*clip_vision_model"):
        _enc(str(tmp_path / "clip"), "pooled")
    with pytest.raises(OSError, match=r"target\.model_id"):
        _enc(str(tmp_path / "missing"), "pooled")


def test_config_instantiates_from_local_folder(dinov2_dir):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    GlobalHydra.instance().clear()
    try:
        cfg = compose_config("train", ["target=hf_dinov2_giant"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.target.model_id == "facebook/dinov2-giant" and cfg.target.output == "pooled"
    assert cfg.target.feature_name == "dinov2_image"
    cfg.target.model_id = dinov2_dir
    cfg.target.local_files_only = True
    cfg.target.preprocess.image_size = 28
    enc = instantiate(cfg.target)
    assert isinstance(enc, HFDinov2ImageEncoder) and enc.output_shape == (HIDDEN,)


def test_register_tokens_excluded_from_mean(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, image_size=28, patch_size=14, num_register_tokens=4)
    torch.manual_seed(0)
    Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "reg")
    images = _images(n=3)
    tokens = _enc(str(tmp_path / "reg"), "tokens").encode(images)
    assert tokens.shape == (3, 1 + 4 + 4, HIDDEN)  # class + registers + 2x2 patches
    torch.testing.assert_close(_enc(str(tmp_path / "reg"), "mean").encode(images), tokens[:, 5:].mean(dim=1))


def test_layer_tokens_are_block_outputs_without_registers(tmp_path):
    """Brain-IT's universal-encoder input (docs/methods/brainit.md §2): chosen blocks' outputs, registers dropped."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=37, image_size=28, patch_size=14, num_register_tokens=4)
    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(cfg).eval()
    model.save_pretrained(tmp_path / "reg")
    images = _images(n=3)
    got = _enc(str(tmp_path / "reg"), "layer_tokens", layers=[1, 3]).encode(images)
    assert got.shape == (3, 2, 1 + 4, HIDDEN)  # class + 2x2 patches per layer, the 4 registers gone
    with torch.no_grad():  # independent: run the blocks one by one
        x = model.embeddings(PRE(images))
        outs = []
        for block in model.encoder.layer:
            y = block(x)
            x = y[0] if isinstance(y, tuple) else y
            outs.append(x)
    for j, layer in enumerate([1, 3]):
        want = torch.cat([outs[layer - 1][:, :1], outs[layer - 1][:, 5:]], dim=1)
        torch.testing.assert_close(got[:, j], want)
    with pytest.raises(ValueError, match=r"target\.layers: \[1, 4\] must lie in \[1, 3\]"):
        _enc(str(tmp_path / "reg"), "layer_tokens", layers=[1, 4])
    with pytest.raises(ValueError, match=r"target\.layers: give the 1-based block indices"):
        _enc(str(tmp_path / "reg"), "layer_tokens")
