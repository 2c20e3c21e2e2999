"""The CLIP column's tower must use the activation its weights were trained with (OpenAI CLIP:
QuickGELU) under every open_clip the project allows; checked against OpenAI's own CLIP code
(``clip-anytorch``'s ``clip.model.CLIP``) on a tiny randomly initialised model saved locally."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from braindecode_fw.metrics.features import (
    ExtractorSpec,
    FeatureExtractor,
    openclip_needs_quick_gelu,
)

open_clip = pytest.importorskip("open_clip")

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 1, "layers": 1}}


def _openai_clip_model():
    """OpenAI's ``clip/model.py`` loaded on its own: the package ``__init__`` imports
    ``pkg_resources``, which recent setuptools no longer ship, and the model file needs none of it."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-anytorch (OpenAI's CLIP code, a test extra) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_openai_tag_needs_quick_gelu_and_mismatch_is_refused():
    spec = ExtractorSpec(arch="open_clip:ViT-L-14", weights="openai", name="clip")
    assert openclip_needs_quick_gelu(spec)
    assert not openclip_needs_quick_gelu(ExtractorSpec(arch="open_clip:ViT-L-14-quickgelu", weights="openai"))
    with pytest.raises(ValueError, match=r"metrics.extractors.clip.arch_kwargs.force_quick_gelu"):
        openclip_needs_quick_gelu(ExtractorSpec(arch="open_clip:ViT-L-14", weights="openai", name="clip",
                                                arch_kwargs={"force_quick_gelu": False}))
    with pytest.raises(ValueError, match=r"metrics.extractors.clip.quick_gelu"):
        openclip_needs_quick_gelu(ExtractorSpec(arch="open_clip:ViT-L-14", weights="openai", name="clip",
                                                quick_gelu=False))
    with pytest.raises(ValueError, match=r"metrics.extractors.clip.arch: .*GELU"):
        openclip_needs_quick_gelu(ExtractorSpec(arch="open_clip:ViT-B-32", weights="laion2b_s34b_b79k",
                                                name="clip", arch_kwargs={"force_quick_gelu": True}))


def test_local_openai_weights_match_openai_clip(tmp_path, monkeypatch):
    clip_model = _openai_clip_model()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "TinyOpenAI-ViT.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    v, t = TINY["vision_cfg"], TINY["text_cfg"]
    ref = clip_model.CLIP(TINY["embed_dim"], v["image_size"], v["layers"], v["width"], v["patch_size"],
                          t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"]).float().eval()
    with torch.no_grad():  # OpenAI's init leaves some tensors at 0 / 1: perturb so every op matters
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "tiny_openai.pt"
    torch.save(ref.state_dict(), path)
    spec = ExtractorSpec(arch="open_clip:TinyOpenAI-ViT", weights=str(path), resize=32, normalize="clip",
                         quick_gelu=True, name="clip")
    ext = FeatureExtractor(spec, ["image_embedding"])
    acts = {type(m).__name__ for m in ext.body.modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    images = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    ours = ext(images)["image_embedding"]
    with torch.no_grad():
        theirs = ref.encode_image(ext.preprocess(images))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the GELU tower (what open_clip>=3 builds for 'openai' without the fix) is measurably off
    gelu = FeatureExtractor(ExtractorSpec(arch="open_clip:TinyOpenAI-ViT", weights=str(path), resize=32,
                                          normalize="clip", name="clip"), ["image_embedding"])
    assert (gelu(images)["image_embedding"] - theirs).abs().max() > 1e-4
