"""``bdf-prepare demo_models=retrain``: regenerate the tiny CLIP and the tiny generator from scratch
for the synthetic world's current scene settings (``dataset.world.image_size``/``max_objects``).

Stages run in order, each into ``<output_dir>/<name>`` (written atomically): ``clip`` (the tiny
CLIP, :mod:`~braindecode_fw.demo.tiny_clip`), then ``generator`` (:mod:`~braindecode_fw.demo.tiny_generator`,
conditioned on the CLIP just written, then evaluated on held-out scenes). The shipped models live
in ``braindecode_fw/demo/weights`` (``paths.demo_models``); point ``paths.demo_models`` at
``output_dir`` to use retrained ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from braindecode_fw.demo import generator_eval, tiny_clip, tiny_generator
from braindecode_fw.demo.corpus import build_corpus
from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.io import atomic_write_json

log = logging.getLogger(__name__)

STAGES = ("clip", "generator")
CLIP_FOLDER, GENERATOR_FOLDER = "tiny_clip", "tiny_generator"
# the scene classifier that judges the generator draws its own scenes
CLASSIFIER_STREAM = 3_000_003


def package_weights_dir() -> Path:
    """The shipped demo models: ``braindecode_fw/demo/weights``."""
    return Path(__file__).resolve().parent / "weights"


def retrain(demo_cfg: dict[str, Any], world: dict[str, Any]) -> dict[str, Any]:
    """Run the configured ``stages`` (``demo_cfg``: ``output_dir``, ``stages``, ``threads``,
    ``clip`` and ``generator`` settings) for the scene settings of ``world``. Returns a summary
    with each stage's seconds, metrics and folder."""
    stages = list(demo_cfg.get("stages") or STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"demo_models.stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    scene = {"image_size": int(world["image_size"]), "max_objects": int(world["max_objects"])}
    out = Path(demo_cfg["output_dir"]).expanduser()
    if demo_cfg.get("threads"):
        torch.set_num_threads(int(demo_cfg["threads"]))
    summary: dict[str, Any] = {"output_dir": str(out), "scene": scene, "stages": {}}
    if "clip" in stages:
        cfg = tiny_clip.TinyClipConfig.from_mapping({**dict(demo_cfg.get("clip") or {}), **scene})
        cfg.overrides["vision_cfg"]["image_size"] = scene["image_size"]
        model, record = tiny_clip.train(cfg)
        folder = tiny_clip.save(model, record, out / CLIP_FOLDER)
        summary["stages"]["clip"] = {"folder": str(folder), "seconds": record["train_seconds"],
                                     "metrics": record["metrics"]}
    if "generator" in stages:
        clip_folder = out / CLIP_FOLDER
        if not (clip_folder / "config.json").is_file():
            raise MissingFileError(f"demo_models.stages: the generator stage needs a tiny CLIP in {clip_folder}; "
                                    f"run the clip stage first (demo_models.stages=[clip,generator])")
        cfg = tiny_generator.TinyGeneratorConfig.from_mapping({**dict(demo_cfg.get("generator") or {}), **scene})
        previous = out / GENERATOR_FOLDER
        pipe, record = tiny_generator.train(cfg, clip_folder, vae_from=previous if cfg.reuse_vae else None,
                                            unet_from=previous if cfg.resume_unet else None)
        folder = tiny_generator.save(pipe, record, out / GENERATOR_FOLDER)
        start = time.perf_counter()
        classifier_corpus = build_corpus(int(demo_cfg.get("classifier_scenes", 20000)), seed=cfg.seed,
                                         stream=CLASSIFIER_STREAM, **scene)
        metrics, grids = generator_eval.evaluate(folder, tiny_clip.load(clip_folder),
                                                 tiny_generator.heldout_corpus(cfg), classifier_corpus,
                                                 steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                                                 seed=cfg.seed, classifier_steps=int(demo_cfg.get("classifier_steps", 600)),
                                                 device=tiny_generator.training_device(cfg).type)
        record["metrics"] = metrics
        record["eval_seconds"] = round(time.perf_counter() - start, 1)
        folder = tiny_generator.save(pipe, record, folder,
                                     grids=grids)
        summary["stages"]["generator"] = {"folder": str(folder), "seconds": record["train_seconds"],
                                          "metrics": metrics}
    atomic_write_json(out / "demo_models.json", {"scene": scene, "config": demo_cfg})
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The one-screen report ``bdf-prepare demo_models=retrain`` prints."""
    lines = []
    clip = summary["stages"].get("clip")
    if clip:
        m = clip["metrics"]
        lines.append(f"tiny CLIP ({clip['seconds']:.0f} s): zero-shot category {m['zero_shot_category_top1']:.3f} "
                     f"(chance {m['zero_shot_category_chance']:.3f}), colour {m['zero_shot_colour_top1']:.3f}, "
                     f"caption→image top-1 of 100 {m['caption_to_image_top1_of_100']:.3f} (chance 0.010); "
                     f"{clip['folder']}")
    gen = summary["stages"].get("generator")
    if gen:
        m = gen["metrics"]
        lines.append(f"tiny generator ({gen['seconds']:.0f} s): two-way (tiny CLIP) {m['two_way_clip']:.3f}, "
                     f"category {m['category_accuracy']:.3f} / colour {m['colour_accuracy']:.3f} on one-object "
                     f"scenes (real images {m['category_accuracy_real']:.3f} / {m['colour_accuracy_real']:.3f}); "
                     f"{gen['folder']}")
    lines.append(f"use them with paths.demo_models={summary['output_dir']}")
    return "\n".join(lines)
