"""Target encoders (open_clip and transformers backends, local weights) and the target cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.data.store import open_store
from braindecode_fw.targets.cache import load_or_compute_targets, target_cache_path
from braindecode_fw.targets.encoders import HFClipImageEncoder, OpenClipImageEncoder, Preprocess

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1},
}
PRE = Preprocess(image_size=32)


def _images(n=5, size=40):
    return np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def test_open_clip_random_init_is_seeded():
    a = OpenClipImageEncoder("ViT-B-32", None, output="tokens", seed=3, model_overrides=TINY, preprocess=PRE)
    b = OpenClipImageEncoder("ViT-B-32", None, output="tokens", seed=3, model_overrides=TINY, preprocess=PRE)
    c = OpenClipImageEncoder("ViT-B-32", None, output="tokens", seed=4, model_overrides=TINY, preprocess=PRE)
    x = _images()
    assert a.output_shape == (16, 32)  # (32/8)^2 patch tokens x width
    torch.testing.assert_close(a.encode(x), b.encode(x))
    assert a.encoder_id == b.encoder_id != c.encoder_id
    pooled = OpenClipImageEncoder("ViT-B-32", None, output="pooled", seed=3, model_overrides=TINY, preprocess=PRE)
    assert pooled.output_shape == (16,) and pooled.encoder_id != a.encoder_id


def test_open_clip_loads_local_weights_file(tmp_path):
    import open_clip

    torch.manual_seed(7)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY)
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    enc = OpenClipImageEncoder("ViT-B-32", str(path), output="pooled", model_overrides=TINY, preprocess=PRE)
    x = _images()
    ref = model.visual(PRE(x))
    torch.testing.assert_close(enc.encode(x), ref.detach())
    assert str(path) in str(enc.identity()["weights"])


def test_open_clip_unknown_model():
    with pytest.raises(ValueError, match="target.model_name: unknown open_clip model 'ViT-Q-99'"):
        OpenClipImageEncoder("ViT-Q-99")


def test_transformers_backend_from_local_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4, projection_dim=24)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    tokens = HFClipImageEncoder(str(tmp_path / "clip"), output="tokens", local_files_only=True, preprocess=PRE)
    pooled = HFClipImageEncoder(str(tmp_path / "clip"), output="pooled", local_files_only=True, preprocess=PRE)
    assert tokens.output_shape == (65, 32)  # class token + 8x8 patches (ViT-L/14 at 224: 257 x 768)
    assert pooled.output_shape == (24,)
    assert tokens.encoder_id != pooled.encoder_id


def test_preprocess_resizes_and_normalises():
    x = np.full((2, 64, 64, 3), 255, np.uint8)
    out = Preprocess(image_size=32, mean=[0.5] * 3, std=[0.5] * 3)(x)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_cache_keyed_by_dataset_and_encoder(tiny_store, tmp_path, monkeypatch):
    store = open_store(tiny_store)
    enc = OpenClipImageEncoder("ViT-B-32", None, output="pooled", seed=0, model_overrides=TINY, preprocess=PRE)
    first = load_or_compute_targets(store, enc, tmp_path, chunk=50)
    assert first.shape == (store.images.shape[0], 16)
    torch.testing.assert_close(torch.from_numpy(np.array(first[:7])), enc.encode(np.asarray(store.images[:7])))
    path = target_cache_path(tmp_path, store, enc)
    assert path.exists() and path.with_suffix(".json").exists()
    assert not list(path.parent.glob("*partial*"))

    def boom(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(enc, "encode", boom)
    np.testing.assert_array_equal(load_or_compute_targets(store, enc, tmp_path), first)  # hit
    other = OpenClipImageEncoder("ViT-B-32", None, output="pooled", seed=1, model_overrides=TINY, preprocess=PRE)
    assert target_cache_path(tmp_path, store, other) != path  # new encoder -> new entry
    store.meta["version"] = "0" * 16
    assert target_cache_path(tmp_path, store, enc) != path  # new dataset version -> new entry
