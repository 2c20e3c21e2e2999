"""Held-out evaluation of the tiny generator (issue 10 acceptance): samples conditioned on the
ground-truth tiny-CLIP embeddings of unseen scenes, judged by the tiny CLIP (two-way
identification) and by an independent scene classifier (category and colour match), plus the
grids of the model card. Sampling goes through :class:`UnClipReconstructor` on the saved folder,
the code path ``bdf-train``/``bdf-reconstruct`` take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from braindecode_fw.contracts import GENERATED_FINAL
from braindecode_fw.data.synthetic import scenes as sc
from braindecode_fw.demo import scene_classifier, tiny_clip
from braindecode_fw.demo.corpus import SceneCorpus
from braindecode_fw.metrics.identification import two_way_identification
from braindecode_fw.metrics.pixel import pixcorr
from braindecode_fw.viz.grids import comparison_grid


def reconstructor(folder: str | Path, *, steps: int, guidance_scale: float, condition: str = "tiny_clip_image",
                  device: str = "cpu"):
    from braindecode_fw.generation.diffusion import UnClipReconstructor

    return UnClipReconstructor("tiny", str(folder), condition=condition, condition_norm=1.0, steps=steps,
                               guidance_scale=guidance_scale, device=device, batch_size=50)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(n, 3, h, w)`` in [0, 1] -> uint8 ``(n, h, w, 3)``."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def unconditional_samples(generator, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` samples with the zero (unconditional) label -> ``(n, 3, H, W)`` in [0, 1]."""
    config = generator.unet.config

    def model(x, t, guided):  # both halves of a guided batch are unconditional: guidance is a no-op
        labels = torch.zeros(len(x), config.projection_class_embeddings_input_dim, device=x.device, dtype=x.dtype)
        context = torch.zeros(len(x), 1, config.cross_attention_dim, device=x.device, dtype=x.dtype)
        return generator.unet(x, t, encoder_hidden_states=context, class_labels=labels).sample

    return generator.sample(model, list(range(seed, seed + n)), None)


def evaluate(folder: str | Path, clip, heldout: SceneCorpus, classifier_corpus: SceneCorpus, *,
             steps: int = 20, guidance_scale: float = 3.0, n_grid: int = 16, seed: int = 0,
             classifier_steps: int = 600, device: str = "cpu") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Returns (metrics, grids): ``grids["samples_conditional"]``, ``["samples_unconditional"]``
    uint8 images. ``device`` is where the generator samples (the judges run on the CPU)."""
    generator = reconstructor(folder, steps=steps, guidance_scale=guidance_scale, device=device)
    embeds = tiny_clip.encode_images(clip, heldout.images)
    samples = generator.reconstruct({"tiny_clip_image": embeds}, list(range(seed, seed + len(heldout))))[GENERATED_FINAL]
    gts = scene_classifier.as_unit_images(heldout.images)
    vae_roundtrip = generator.decode_latents(generator.encode_images(gts))

    sample_emb = tiny_clip.encode_images(clip, to_uint8(samples))
    two_way = float(two_way_identification(embeds, sample_emb).mean())
    classifier = scene_classifier.train_classifier(classifier_corpus, steps=classifier_steps, seed=seed)
    single = heldout.single_object()
    cat_true, col_true = heldout.first_object_labels()
    cat_s, col_s = classifier.predict(samples)
    cat_r, col_r = classifier.predict(gts)
    in_scene = [[o.category for o in s.objects] for s in heldout.scenes]
    metrics = {
        "n_heldout": len(heldout), "n_single_object": int(len(single)), "sample_steps": steps,
        "guidance_scale": guidance_scale,
        "two_way_clip": two_way,
        "category_accuracy": float((cat_s[single] == cat_true[single]).mean()),
        "category_accuracy_real": float((cat_r[single] == cat_true[single]).mean()),
        "category_chance": 1 / len(sc.CATEGORIES),
        "colour_accuracy": float((col_s[single] == col_true[single]).mean()),
        "colour_accuracy_real": float((col_r[single] == col_true[single]).mean()),
        "colour_chance": 1 / len(sc.COLOURS),
        "category_in_scene": float(np.mean([c in cats for c, cats in zip(cat_s, in_scene, strict=True)])),
        "category_in_scene_real": float(np.mean([c in cats for c, cats in zip(cat_r, in_scene, strict=True)])),
        "pixcorr": float(pixcorr(samples, gts, size=gts.shape[-1]).mean()),
        "vae_pixcorr": float(pixcorr(vae_roundtrip, gts, size=gts.shape[-1]).mean()),
        "classifier_train_scenes": len(classifier_corpus),
    }
    order = np.concatenate([single, np.setdiff1d(np.arange(len(heldout)), single)])[:n_grid]
    grids = {
        "samples_conditional": comparison_grid({"ground truth": gts[order], "sample": samples[order]}, cell=64),
        "samples_unconditional": comparison_grid(
            {f"{k}": v for k, v in enumerate(unconditional_samples(generator, 4 * n_grid, seed).chunk(4))}, cell=64),
    }
    return metrics, grids
