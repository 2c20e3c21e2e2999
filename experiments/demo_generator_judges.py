"""The tiny generator's shape and colour fidelity with two judges (docs/demo_models.md, "A larger
check"): samples from the ground-truth tiny-CLIP embeddings of ``n`` held-out scenes (the card's
stream, so the first 200 are the card's), judged by the card's classifier (trained on rendered
scenes) and by one trained on the VAE round trips of the same scenes (the generator's image domain);
the real images and their round trips are judged beside them.

    python experiments/demo_generator_judges.py 600 braindecode_fw/demo/weights/tiny_generator [more folders]
"""

from __future__ import annotations

import json
import sys

import torch

from braindecode_fw.demo import generator_eval, retrain, scene_classifier, tiny_clip, tiny_generator
from braindecode_fw.demo.corpus import SceneCorpus, build_corpus
from braindecode_fw.metrics.identification import two_way_identification


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        raise SystemExit(f"usage: python {sys.argv[0]} <number of held-out scenes> <generator folder> [more folders]")
    n, folders = int(sys.argv[1]), sys.argv[2:]
    held = tiny_generator.heldout_corpus(tiny_generator.TinyGeneratorConfig.from_mapping({"n_heldout_scenes": n}))
    judge_scenes = build_corpus(20000, seed=0, stream=777, image_size=64, max_objects=3)
    first = generator_eval.reconstructor(folders[0], steps=20, guidance_scale=5.0)

    def roundtrip(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([first.decode_latents(first.encode_images(images[i:i + 500]))
                          for i in range(0, len(images), 500)])

    judges = {"rendered": scene_classifier.train_classifier(judge_scenes, steps=600, seed=0),
              "vae_domain": scene_classifier.train_classifier(SceneCorpus(
                  generator_eval.to_uint8(roundtrip(scene_classifier.as_unit_images(judge_scenes.images))),
                  judge_scenes.scenes, judge_scenes.captions), steps=600, seed=0)}
    clip = tiny_clip.load(retrain.package_weights_dir() / retrain.CLIP_FOLDER)
    emb = tiny_clip.encode_images(clip, held.images)
    real = scene_classifier.as_unit_images(held.images)
    images = {"real": real, "vae_roundtrip": roundtrip(real)}
    two_way = {}
    for folder in folders:
        samples = generator_eval.reconstructor(folder, steps=20, guidance_scale=5.0).reconstruct(
            {"tiny_clip_image": emb}, list(range(n)))["final"]
        images[folder] = samples
        two_way[folder] = float(two_way_identification(
            emb, tiny_clip.encode_images(clip, generator_eval.to_uint8(samples))).mean())
    single = held.single_object()
    category, colour = held.first_object_labels()
    for name, x in images.items():
        row = {"images": name, "n_single_object": len(single), "two_way_clip": two_way.get(name)}
        for judge_name, judge in judges.items():
            cat, col = judge.predict(x)
            row[f"category[{judge_name}]"] = round(float((cat[single] == category[single]).mean()), 3)
            row[f"colour[{judge_name}]"] = round(float((col[single] == colour[single]).mean()), 3)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
