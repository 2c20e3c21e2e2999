"""Generators: tiny real-class pipelines saved with save_pretrained and loaded by the user's code
path (offline); shapes, ranges, determinism; needs/provides errors; selection blind to ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.generation.controlnet import ControlNetModulatedReconstructor
from braindecode_fw.generation.diffusion import EmbedsConditionedReconstructor, UnClipReconstructor
from braindecode_fw.generation.loading import load_pipeline
from braindecode_fw.generation.reconstructor import select_best_samples
from braindecode_fw.generation.tiny import build_tiny_pipeline
from braindecode_fw.generation.versatile import (
    DualStreamTransformer,
    VersatileDualReconstructor,
    renormalize_by_token0,
)


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
    with pytest.raises(ValueError, match="diffusers has no class 'NoSuchPipeline'"):
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


@pytest.fixture(scope="module")
def versatile_pipe(tmp_path_factory):
    return build_tiny_pipeline("versatile", tmp_path_factory.mktemp("gen") / "tiny_vd", image_size=32,
                               cross_attention_dim=24)


@pytest.fixture(scope="module")
def controlnet_pipe(tmp_path_factory):
    return build_tiny_pipeline("controlnet", tmp_path_factory.mktemp("gen") / "tiny_cn", image_size=32,
                               cross_attention_dim=24)


def _vd(folder, **kw) -> VersatileDualReconstructor:
    kw = {"steps": 3, "guidance_scale": 2.0, "renormalize": "none", **kw}
    return VersatileDualReconstructor("versatile_dual", str(folder), image_condition="img", text_condition="txt", **kw)


def test_dual_stream_mixing_matches_diffusers_dual_transformer():
    """The replacement block does DualTransformer2DModel's arithmetic on the same two transformers."""
    from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel

    torch.manual_seed(0)
    ref = DualTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4,
                                 cross_attention_dim=6)
    ref.mix_ratio, ref.condition_lengths, ref.transformer_index_for_condition = 0.3, [5, 7], [1, 0]
    ours = DualStreamTransformer(ref.transformers[0], ref.transformers[1])
    ours.text_weight, ours.text_tokens = 0.3, 5
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 12, 6)
    with torch.no_grad():
        assert torch.allclose(ours(x, ctx, return_dict=False)[0], ref(x, ctx, return_dict=False)[0], atol=1e-6)


def test_versatile_dual_streams_and_mix_ratio(versatile_pipe):
    gen = _vd(versatile_pipe)
    assert gen.needs() == {"img": (None, 24), "txt": (None, 24)} and gen.image_size == 32
    assert len(gen.streams) == 4  # every cross-attention position of the tiny UNet: 1 down, 1 mid, 2 up
    img, txt = torch.randn(2, 9, 24), torch.randn(2, 5, 24)
    a = gen.reconstruct({"img": img, "txt": txt}, [1, 2])["final"]
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, gen.reconstruct({"img": img, "txt": txt}, [1, 2])["final"])
    assert not torch.allclose(a, gen.reconstruct({"img": img, "txt": -txt}, [1, 2])["final"])
    # mix 0: only the image stream counts; mix 1: only the text stream (MindBridge uses 0.5)
    image_only = _vd(versatile_pipe, text_to_image_strength=0.0)
    assert torch.allclose(image_only.reconstruct({"img": img, "txt": txt}, [1, 2])["final"],
                          image_only.reconstruct({"img": img, "txt": 3 * txt + 1}, [1, 2])["final"], atol=1e-6)
    text_only = _vd(versatile_pipe, text_to_image_strength=1.0)
    assert torch.allclose(text_only.reconstruct({"img": img, "txt": txt}, [1, 2])["final"],
                          text_only.reconstruct({"img": -img, "txt": txt}, [1, 2])["final"], atol=1e-6)
    with pytest.raises(ValueError, match=r"generator \(versatile_dual\).text_to_image_strength: must be in \[0, 1\]"):
        _vd(versatile_pipe, text_to_image_strength=1.5)


def test_versatile_matches_the_stock_dual_guided_loop(versatile_pipe):
    """The pipeline's own ``__call__`` with its prompt encoders replaced by the predicted tokens
    (zeros as the unconditional half) gives the same images as the reconstructor."""
    gen = _vd(versatile_pipe, renormalize="token0")
    img, txt = torch.randn(2, 9, 24), torch.randn(2, 5, 24)
    ours = gen.reconstruct({"img": img, "txt": txt}, [4, 5])["final"]
    img_n, txt_n = renormalize_by_token0(img), renormalize_by_token0(txt)
    assert torch.allclose(img_n[:, 0].norm(dim=-1), torch.ones(2), atol=1e-5)
    pipe = gen.pipe
    pipe._encode_text_prompt = lambda *a, **k: torch.cat([torch.zeros_like(txt_n), txt_n])
    pipe._encode_image_prompt = lambda *a, **k: torch.cat([torch.zeros_like(img_n), img_n])
    ref = pipe(prompt=["a", "b"], image=["a", "b"], text_to_image_strength=0.5, num_inference_steps=3,
               guidance_scale=2.0, generator=[torch.Generator().manual_seed(s) for s in (4, 5)],
               output_type="pt").images
    assert torch.allclose(ours, torch.as_tensor(ref).float(), atol=1e-5)


def test_versatile_missing_text_unet_is_a_clear_error(versatile_pipe, tmp_path):
    import shutil

    broken = tmp_path / "vd"
    shutil.copytree(versatile_pipe, broken)
    shutil.rmtree(broken / "text_unet")
    with pytest.raises(FileNotFoundError, match=r"generator \(versatile_dual\).model: .*vd is not a diffusers model "
                                                r"folder \(no text_unet/config.json\)"):
        _vd(broken)


def test_controlnet_first_block_injection(controlnet_pipe):
    gen = ControlNetModulatedReconstructor("controlnet_modulated", str(controlnet_pipe), condition="tokens",
                                           control="ctl", steps=3, guidance_scale=2.0)
    # the map has the ControlNet's first-block width at latent resolution (NeuroPictor: 320×64×64)
    assert gen.needs() == {"tokens": (None, 24), "ctl": (32, 8, 8)}
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 5, 24)
    control = torch.randn(1, 32, 8, 8)
    net = gen.controlnet
    with torch.no_grad():
        down, _ = net(x, t, encoder_hidden_states=ctx, controlnet_cond=control, return_dict=False)
        # the map is added to conv_in's output as is: the first skip residual is the zero-conv of it
        assert torch.allclose(down[0], net.controlnet_down_blocks[0](net.conv_in(x) + control), atol=1e-5)
    tokens = torch.randn(2, 5, 24)
    maps = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    a = gen.reconstruct({"tokens": tokens, "ctl": maps}, [1, 2])["final"]
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, gen.reconstruct({"tokens": tokens, "ctl": maps}, [1, 2])["final"])
    assert not torch.allclose(a, gen.reconstruct({"tokens": tokens, "ctl": -maps}, [1, 2])["final"])
    off = ControlNetModulatedReconstructor("c", str(controlnet_pipe), condition="tokens", control="ctl", steps=3,
                                           guidance_scale=2.0, control_scale=0.0)
    plain = EmbedsConditionedReconstructor("t", str(controlnet_pipe), condition="tokens", steps=3, guidance_scale=2.0,
                                           components={"controlnet": None})
    # scale 0: exactly the locked UNet alone
    assert torch.allclose(off.reconstruct({"tokens": tokens, "ctl": maps}, [1, 2])["final"],
                          plain.reconstruct({"tokens": tokens}, [1, 2])["final"], atol=1e-5)
    with pytest.raises(ValueError, match=r"negative: empty_prompt needs the pipeline's text encoder"):
        ControlNetModulatedReconstructor("c", str(controlnet_pipe), negative="empty_prompt")
    with pytest.raises(ValueError, match=r"injection: one of \('first_block', 'hint'\), got 'adapter'"):
        ControlNetModulatedReconstructor("c", str(controlnet_pipe), injection="adapter")


def test_separate_controlnet_folder_and_missing_one(controlnet_pipe, embeds_pipe, tmp_path):
    gen = ControlNetModulatedReconstructor("c", str(embeds_pipe), controlnet=str(controlnet_pipe / "controlnet"),
                                           steps=2)
    assert gen.needs()["control_map"] == (32, 8, 8)
    with pytest.raises(FileNotFoundError, match=r"generator \(c\).controlnet: .* is not a diffusers model folder "
                                                r"\(no config.json\)"):
        ControlNetModulatedReconstructor("c", str(embeds_pipe), controlnet=str(tmp_path))


def test_img2img_generator_requires_lowlevel(embeds_pipe):
    gen = EmbedsConditionedReconstructor("sd_img2img", str(embeds_pipe), condition="clip_text_tokens", steps=2,
                                         lowlevel_target="vae_latent", require_lowlevel=True, strength=0.85)
    assert gen.needs() == {"clip_text_tokens": (None, 24), "vae_latent": (4, None, None)} and gen.optional() == {}
    with pytest.raises(ValueError, match=r"generator sd_img2img needs vae_latent \(4×\*×\*\); decoder provides "
                                         r"clip_text_tokens \*×24|needs vae_latent"):
        gen.check({"clip_text_tokens": (77, 24)})
    with pytest.raises(ValueError, match=r"require_lowlevel: set lowlevel_target"):
        EmbedsConditionedReconstructor("sd_img2img", str(embeds_pipe), require_lowlevel=True)


def test_unclip_img2img_from_lowlevel(unclip_pipe):
    kw = dict(condition="clip_image_pooled", steps=4, lowlevel_target="vae_latent")
    emb, latents = torch.randn(2, 20), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    half = UnClipReconstructor("u", str(unclip_pipe), strength=0.5, **kw)
    full = UnClipReconstructor("u", str(unclip_pipe), strength=1.0, **kw)
    out = half.reconstruct({"clip_image_pooled": emb, "vae_latent": latents}, [1, 2])
    assert out["lowlevel"].shape == (2, 3, 32, 32) and out["final"].shape == (2, 3, 32, 32)
    no_init = full.reconstruct({"clip_image_pooled": emb, "vae_latent": latents}, [1, 2])["final"]
    assert not torch.allclose(out["final"], no_init)
    # strength 1 ignores the low-level image; strength 0.5 starts from it
    assert torch.allclose(no_init, full.reconstruct({"clip_image_pooled": emb, "vae_latent": -latents}, [1, 2])["final"])
    assert not torch.allclose(out["final"], half.reconstruct({"clip_image_pooled": emb, "vae_latent": -latents},
                                                             [1, 2])["final"])


def test_contrast_compression(embeds_pipe):
    """Brain-IT's output compression (docs/methods/brainit.md §6 step 2): clamp((s − 0.5)·0.8 + 0.5) of the
    final image, not of the low-level one; 1 (the default) leaves the images as they are."""
    kw = dict(condition="tokens", steps=2, lowlevel_target="low", lowlevel_kind="image", strength=0.5)
    inputs = {"tokens": torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0)),
              "low": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    plain = EmbedsConditionedReconstructor("t", str(embeds_pipe), **kw).reconstruct(inputs, [3, 4])
    soft = EmbedsConditionedReconstructor("t", str(embeds_pipe), contrast=0.8, **kw).reconstruct(inputs, [3, 4])
    torch.testing.assert_close(soft["final"], ((plain["final"] - 0.5) * 0.8 + 0.5).clamp(0, 1))
    assert float(soft["final"].min()) >= 0.1 - 1e-6 and float(soft["final"].max()) <= 0.9 + 1e-6
    assert torch.equal(soft["lowlevel"], inputs["low"]) and torch.equal(plain["lowlevel"], inputs["low"])
    with pytest.raises(ValueError, match=r"generator \(t\).contrast: a factor > 0 \(1 = unchanged, Brain-IT 0.8\), "
                                         r"got 0"):
        EmbedsConditionedReconstructor("t", str(embeds_pipe), contrast=0)


def test_option_values_are_checked(embeds_pipe, versatile_pipe):
    with pytest.raises(ValueError, match=r"generator \(t\).lowlevel_kind: one of \('latent', 'image'\), got 'mask'"):
        EmbedsConditionedReconstructor("t", str(embeds_pipe), lowlevel_kind="mask")
    with pytest.raises(ValueError, match=r"generator \(versatile_dual\).renormalize: one of \('token0', 'none'\)"):
        _vd(versatile_pipe, renormalize="cls")
