"""Generators: tiny real-class pipelines saved with save_pretrained and loaded by the user's code
path (offline); shapes, ranges, determinism; needs/provides errors; selection blind to ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.generation.diffusion import EmbedsConditionedReconstructor, UnClipReconstructor
from braindecode_fw.generation.loading import load_pipeline
from braindecode_fw.generation.reconstructor import select_best_samples
from braindecode_fw.generation.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def embeds_pipe(tmp_path_factory):
    return build_tiny_pipeline("embeds", tmp_path_factory.mktemp("gen") / "tiny_embeds", image_size=32,
                               cross_attention_dim=24)


@pytest.fixture(scope="module")
def unclip_pipe(tmp_path_factory):
    return build_tiny_pipeline("unclip", tmp_path_factory.mktemp("gen") / "tiny_unclip", image_size=32,
                               cross_attention_dim=16, embed_dim=20)


def test_embeds_conditioned_shapes_range_determinism(embeds_pipe):
    gen = EmbedsConditionedReconstructor("tiny", str(embeds_pipe), condition="tokens", steps=3, guidance_scale=2.0)
    assert gen.needs() == {"tokens": (None, 24)} and gen.image_size == 32
    tokens = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(0))
    a = gen.reconstruct({"tokens": tokens}, [1, 2, 3])["final"]
    b = gen.reconstruct({"tokens": tokens}, [1, 2, 3])["final"]
    c = gen.reconstruct({"tokens": tokens}, [9, 2, 3])["final"]
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)  # same seeds, same images
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1:], c[1:])  # seeds are per image
    small = EmbedsConditionedReconstructor("tiny", str(embeds_pipe), condition="tokens", steps=3, guidance_scale=2.0,
                                           batch_size=2)
    assert torch.allclose(small.reconstruct({"tokens": tokens}, [1, 2, 3])["final"], a, atol=1e-5)  # batching-free


def test_lowlevel_latents_decode_and_img2img(embeds_pipe):
    gen = EmbedsConditionedReconstructor("tiny", str(embeds_pipe), condition="tokens", steps=4, strength=0.5,
                                         lowlevel_target="vae_latent")
    assert gen.optional() == {"vae_latent": (4, None, None)}
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = gen.reconstruct({"tokens": torch.randn(2, 5, 24), "vae_latent": latents}, [0, 1])
    assert out["lowlevel"].shape == (2, 3, 32, 32) and out["final"].shape == (2, 3, 32, 32)
    # the low-level image is the pipeline's own VAE decode of latents / scaling factor, mapped to [0, 1]
    vae = gen.pipe.vae
    with torch.no_grad():
        ref = ((vae.decode(latents / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(out["lowlevel"], ref, atol=1e-5)


def test_unclip_from_image_embeds(unclip_pipe):
    gen = UnClipReconstructor("sd21_unclip", str(unclip_pipe), condition="clip_image_pooled", steps=3)
    assert gen.needs() == {"clip_image_pooled": (20,)}
    emb = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    a = gen.reconstruct({"clip_image_pooled": emb}, [5, 6])["final"]
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, gen.reconstruct({"clip_image_pooled": emb}, [5, 6])["final"])
    other = gen.reconstruct({"clip_image_pooled": -emb}, [5, 6])["final"]
    assert not torch.allclose(a, other)  # the embedding conditions the image


def test_needs_provides_mismatch_message(unclip_pipe):
    gen = UnClipReconstructor("sd21_unclip", str(unclip_pipe), condition="clip_image_pooled", steps=2)
    with pytest.raises(ValueError) as err:
        gen.check({"clip_image_tokens": (257, 768)})
    assert str(err.value) == ("generator sd21_unclip needs clip_image_pooled (20-d); "
                              "decoder provides clip_image_tokens 257×768")
    with pytest.raises(ValueError, match=r"needs clip_image_pooled \(20-d\); decoder provides clip_image_pooled 32-d"):
        gen.check({"clip_image_pooled": (32,)})
    gen.check({"clip_image_pooled": (20,), "other": (3,)})  # extra outputs are fine


def test_missing_or_wrong_model_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="is not a diffusers pipeline folder"):
        load_pipeline("StableDiffusionPipeline", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"generator.model: cannot load StableUnCLIPImg2ImgPipeline from "
                                                r"'someone/not-cached'.*huggingface-cli download"):
        load_pipeline("StableUnCLIPImg2ImgPipeline", "someone/not-cached")
    with pytest.raises(ValueError, match="diffusers has no pipeline 'NoSuchPipeline'"):
        load_pipeline("NoSuchPipeline", tmp_path)


def test_selection_uses_prediction_never_ground_truth():
    """Candidates are uniform colours; the 'encoder' returns the mean colour. The predicted
    embedding points to red, the ground truth is blue: the red sample must be chosen."""
    colours = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    candidates = colours[None, :, :, None, None].expand(1, 3, 3, 8, 8).clone()
    ground_truth_embedding = torch.tensor([[0.0, 0.0, 1.0]])  # would choose sample 0
    predicted = torch.tensor([[0.9, 0.1, 0.0]])

    def encode(u8: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(u8.reshape(len(u8), -1, 3).mean(axis=1))

    chosen, scores = select_best_samples(candidates, predicted, encode)
    assert chosen.tolist() == [1] and scores.shape == (1, 3)
    gt_choice, _ = select_best_samples(candidates, ground_truth_embedding, encode)
    assert gt_choice.tolist() == [0]  # the ground truth would have changed the choice
