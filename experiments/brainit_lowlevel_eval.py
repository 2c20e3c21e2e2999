"""Brain-IT's low-level branch on held-out data (docs/decoders.md, "Measured on the synthetic world").

For a run that trained the low-level branch (e.g. ``experiment=brainit_synthetic_lowlevel``), on one
subject's test images: 300-way retrieval with the predicted multi-scale VGG tokens (all scales and
per scale), then Deep-Image-Prior images (the run's ``reconstruction.lowlevel`` settings) from the
predicted tokens, from the true tokens (the inversion's ceiling) and from the mean prediction (what
is not image-specific), scored with PixCorr and SSIM at 64 px; a grid of the first 8.

    python experiments/brainit_lowlevel_eval.py <run>/checkpoints/best-*.ckpt --images 40 --out <dir>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from braindecode_fw.generation.feature_inversion import FeatureInverter
from braindecode_fw.lit import predict
from braindecode_fw.metrics.images import as_float_images
from braindecode_fw.metrics.pixel import pixcorr, ssim
from braindecode_fw.metrics.retrieval import retrieval_accuracy
from braindecode_fw.pipeline.build import build_datamodule, build_model
from braindecode_fw.pipeline.checkpoint import load_checkpoint
from braindecode_fw.targets.multiscale import multiscale_layout
from braindecode_fw.viz.grids import comparison_grid, save_png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--subject", default="subj01")
    ap.add_argument("--images", type=int, default=40, help="test images inverted by DIP (three times each)")
    ap.add_argument("--source", default="vgg_tokens", help="the low-level branch's target")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    ckpt = load_checkpoint(args.ckpt)
    extra = ckpt["braindecode_fw"]
    cfg = OmegaConf.create(extra["config"])
    dm = build_datamodule(cfg)
    decoder = build_model(cfg, extra["n_features"], {k: tuple(v) for k, v in extra["target_shapes"].items()})
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items()
                             if k.startswith("decoder.")})
    p = predict(decoder, dm.test_dataloader(), cfg.target.feature_name, outputs=[args.source])[args.subject]
    order = np.argsort(p["image_index"])
    index = p["image_index"][order]
    pred = torch.from_numpy(p["outputs"][args.source][order])
    node = next(n for n in cfg.extra_targets.values() if n is not None and n.feature_name == args.source)
    true = instantiate(node).encode(np.asarray(dm.store.images)[index])

    result: dict[str, float | int] = {"subject": args.subject, "n_test": len(index)}
    scores = retrieval_accuracy(pred.flatten(1), true.flatten(1), subset_size=len(index), n_subsets=1)
    result["token_retrieval_brain_to_image"] = scores.mean("brain_to_image")
    result["token_retrieval_image_to_brain"] = scores.mean("image_to_brain")
    layout = multiscale_layout(int(node.image_size))
    for k, part in enumerate(layout.slices):
        scores = retrieval_accuracy(pred[:, part].flatten(1), true[:, part].flatten(1), subset_size=len(index),
                                    n_subsets=1)
        result[f"token_retrieval_brain_to_image_scale{k}"] = scores.mean("brain_to_image")

    settings = {k: v for k, v in OmegaConf.to_container(cfg.reconstruction.lowlevel).items() if k != "_target_"}
    inverter = FeatureInverter(**settings)
    n = min(args.images, len(index))
    seeds = [inverter.seed + int(i) for i in index[:n]]
    gts = as_float_images(np.asarray(dm.store.images)[index[:n]])
    images = {"predicted tokens": inverter(pred[:n], seeds=seeds), "true tokens": inverter(true[:n], seeds=seeds),
              "mean prediction": inverter(pred.mean(0, keepdim=True).expand(n, -1, -1), seeds=seeds)}
    size = gts.shape[-1]
    images = {k: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for k, v in images.items()}
    for name, im in images.items():
        result[f"pixcorr[{name}]"] = float(pixcorr(im, gts, size=size).mean())
        result[f"ssim[{name}]"] = float(ssim(im, gts, size=size).mean())
    result["pixcorr[predicted tokens vs the next test image]"] = float(
        pixcorr(images["predicted tokens"], gts.roll(1, 0), size=size).mean())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowlevel_eval.json").write_text(json.dumps(result, indent=1))
    save_png(comparison_grid({"ground truth": gts[:8], **{k: v[:8] for k, v in images.items()}}, cell=64),
             out / "lowlevel_grid.png")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
