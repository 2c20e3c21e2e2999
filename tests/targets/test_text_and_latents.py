"""Caption targets (transformers and open_clip text towers, VD normalisation), VAE latents, the
ME2 input quirk, and several targets in one datamodule — all from tiny locally built models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.data.store import open_store
from braindecode_fw.targets.cache import load_or_compute_targets
from braindecode_fw.targets.encoders import HFClipImageEncoder, OpenClipImageEncoder, Preprocess
from braindecode_fw.targets.latents import VaeLatentEncoder
from braindecode_fw.targets.text import HFClipTextEncoder, OpenClipTextEncoder, store_captions
from tests.targets.test_encoders import PRE, TINY

TINY_TEXT = {**TINY, "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def _tiny_clip_tokenizer(folder):
    """A CLIPTokenizer with CLIP's byte-level alphabet and no merges (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256 + k
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + k) for k in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.save_pretrained(folder)
    return len(vocab)


def test_hf_text_tokens_vd_normalised(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    n_vocab = _tiny_clip_tokenizer(tmp_path / "clip")
    cfg = CLIPTextConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=24,
                         bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1)
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    enc = HFClipTextEncoder(str(tmp_path / "clip"), local_files_only=True)
    texts = ["a red star at the top", "two blue circles"]
    out = enc.encode_texts(texts)
    assert out.shape == (2, 77, 24) and enc.output_shape == (77, 24)  # ViT-L/14: 77 × 768
    ids = enc.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(input_ids=ids)
        manual = model.text_projection(ref.last_hidden_state) / ref.text_embeds.norm(dim=-1)[:, None, None]
    torch.testing.assert_close(out, manual)
    pooled = HFClipTextEncoder(str(tmp_path / "clip"), local_files_only=True, output="pooled")
    torch.testing.assert_close(pooled.encode_texts(texts), ref.text_embeds)
    assert pooled.encoder_id != enc.encoder_id


def test_open_clip_text_tokens_against_encode_text():
    import open_clip

    enc = OpenClipTextEncoder("ViT-B-32", None, seed=2, model_overrides=TINY_TEXT)
    texts = ["a small green square", "a large red star at the top left"]
    out = enc.encode_texts(texts)
    assert out.shape == (2, 12, 16)
    torch.manual_seed(2)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_TEXT).eval()
    ids = open_clip.tokenizer.SimpleTokenizer(context_length=12)(texts)
    with torch.no_grad():
        pooled = model.encode_text(ids)  # open_clip's own pooled embedding: the reference
    pooled_enc = OpenClipTextEncoder("ViT-B-32", None, seed=2, model_overrides=TINY_TEXT, output="pooled")
    torch.testing.assert_close(pooled_enc.encode_texts(texts), pooled)
    # VD normalisation: the end-of-text token of the projected sequence has unit norm
    eot = ids.argmax(-1)
    torch.testing.assert_close(out[torch.arange(2), eot].norm(dim=-1), torch.ones(2))
    # "tokens": the final-layer ln_final outputs, unprojected (NeuroPictor's L_sem target); projected and
    # pooled at the end-of-text token they give open_clip's embedding
    tokens = OpenClipTextEncoder("ViT-B-32", None, seed=2, model_overrides=TINY_TEXT, output="tokens").encode_texts(texts)
    assert tokens.shape == (2, 12, TINY_TEXT["text_cfg"]["width"])
    torch.testing.assert_close(tokens[torch.arange(2), eot] @ model.text_projection, pooled)
    with pytest.raises(ValueError, match="'tokens' .* is an open_clip text output"):
        HFClipTextEncoder("unused", output="tokens")
    small = {**TINY_TEXT, "text_cfg": {**TINY_TEXT["text_cfg"], "vocab_size": 100}}
    with pytest.raises(ValueError, match="text_cfg.vocab_size: 100 is smaller than the tokenizer's vocabulary"):
        OpenClipTextEncoder("ViT-B-32", None, model_overrides=small).encode_texts(texts)


def test_hf_image_tokens_vd(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=24)
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    enc = HFClipImageEncoder(str(tmp_path / "clip"), output="tokens_vd", local_files_only=True, preprocess=PRE)
    x = np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    out = enc.encode(x)
    assert out.shape == (3, 17, 24)  # ViT-L/14 at 224: 257 × 768
    with torch.no_grad():
        h = model(pixel_values=PRE(x)).last_hidden_state
        tokens = model.visual_projection(model.vision_model.post_layernorm(h))
    torch.testing.assert_close(out, tokens / tokens[:, :1].norm(dim=-1, keepdim=True))
    torch.testing.assert_close(out[:, 0].norm(dim=-1), torch.ones(3))


def test_vae_latents_from_local_folder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()
    vae.save_pretrained(tmp_path / "sd" / "vae")
    enc = VaeLatentEncoder(str(tmp_path / "sd"), image_size=32, local_files_only=True)
    x = np.random.default_rng(1).integers(0, 255, (2, 48, 48, 3), dtype=np.uint8)
    out = enc.encode(x)
    assert out.shape == (2, 4, 16, 16) and enc.scaling_factor == pytest.approx(0.18215)
    pixels = Preprocess(image_size=32, mean=[0.5] * 3, std=[0.5] * 3)(x)
    assert float(pixels.min()) >= -1 and float(pixels.max()) <= 1  # the VAE's [-1, 1]
    with torch.no_grad():
        ref = vae.encode(pixels).latent_dist.mode() * 0.18215
    torch.testing.assert_close(out, ref)


def test_mindeye2_half_shift_and_stable_cache_ids():
    x = np.random.default_rng(2).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    plain = Preprocess(image_size=32)
    quirk = Preprocess(image_size=32, mindeye2_half_shift=True)
    mean, std = torch.tensor(plain.mean).view(1, 3, 1, 1), torch.tensor(plain.std).view(1, 3, 1, 1)
    raw = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(quirk(x), ((raw + 1) / 2 - mean) / std)  # bigG sees [0.5, 1]
    a = OpenClipImageEncoder("ViT-B-32", None, output="pooled", model_overrides=TINY, preprocess=plain)
    b = OpenClipImageEncoder("ViT-B-32", None, output="pooled", model_overrides=TINY, preprocess=quirk)
    assert a.encoder_id != b.encoder_id
    # the id of an encoder without the new options is what it was before they existed
    assert "mindeye2_half_shift" not in a.id_blob()["preprocess"]


def test_datamodule_with_caption_target(tiny_store, tmp_path):
    store = open_store(tiny_store)
    text = OpenClipTextEncoder("ViT-B-32", None, model_overrides=TINY_TEXT)
    cached = load_or_compute_targets(store, text, tmp_path / "cache", chunk=50)
    assert cached.shape == (store.images.shape[0], 12, 16)
    torch.testing.assert_close(torch.from_numpy(np.array(cached[:3])),
                               text.encode_texts(store_captions(store, 0, 3)))
    image = OpenClipImageEncoder("ViT-B-32", None, feature_name="clip_image_tokens", output="tokens",
                                 model_overrides=TINY, preprocess=PRE)
    dm = BrainDataModule(tiny_store, image, extra_target_encoders=[text], batch_size=8, cache_dir=tmp_path / "cache")
    dm.setup()
    assert dm.target_shapes == {"clip_image_tokens": (16, 32), "clip_text_tokens": (12, 16)}
    batch = next(iter(dm.train_dataloader()))
    assert batch.targets["clip_text_tokens"].shape == (8, 12, 16)
    idx = batch.image_index.numpy()
    torch.testing.assert_close(batch.targets["clip_text_tokens"], torch.from_numpy(np.array(cached[idx])))
    with pytest.raises(ValueError, match=r"extra_targets: feature name\(s\) \['clip_text_tokens'\] appear twice"):
        BrainDataModule(tiny_store, image, extra_target_encoders=[text, text])
