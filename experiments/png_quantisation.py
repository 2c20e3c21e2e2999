"""How much saving reconstructions as 8-bit PNG moves each metric column (docs/evaluation.md).

A generator returns float images; ``bdf-reconstruct`` saves them as 8-bit PNGs and ``bdf-evaluate``
reads them back, so every reconstruction is rounded to the 1/255 grid before any metric (the
papers' evaluation code scores the float tensors). This script scores the same float
reconstructions twice — as floats, and rounded to 8 bits at the generator's resolution exactly as a
PNG round trip does (``tests/tasks/test_evaluate.py`` checks the equality) — and reports, per
column, the change of the mean and the largest change of any image's score.

Ground truths are natural photographs shipped with scikit-image (random square crops, stored as
8-bit 425×425 like NSD stimuli); reconstructions are 512×512 floats in three conditions: ``close``
(blurred, colour-shifted, noisy), ``blurry`` (a 16-px low-level reconstruction upsampled) and
``mixed`` (half another image).

    python experiments/png_quantisation.py                       # metrics=random_weights (runs anywhere)
    python experiments/png_quantisation.py --metrics literature  # the published networks (needs their weights)
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from braindecode_fw.cli import CONF_DIR
from braindecode_fw.metrics.images import as_float_images, resize
from braindecode_fw.metrics.suite import ImageMetricSuite

PHOTOS = ("astronaut", "immunohistochemistry", "coffee", "rocket", "chelsea", "cat", "hubble_deep_field",
          "retina", "colorwheel")


def ground_truths(n: int, seed: int, size: int = 425) -> np.ndarray:
    """``n`` random square crops of scikit-image's colour photographs -> uint8 ``(n, size, size, 3)``."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in PHOTOS]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(crop))
    return np.stack(out)


def reconstructions(gts: torch.Tensor, condition: str, seed: int, size: int = 512) -> torch.Tensor:
    """Float ``(n, 3, size, size)`` in [0, 1], off the 8-bit grid, from ground truths ``(n, 3, h, w)``."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(gts, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    if condition == "close":
        k = torch.exp(-0.5 * (torch.arange(-4, 5.0) / 1.5) ** 2)
        k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="reflect"), k, groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 4, 4), mode="reflect"), k.transpose(2, 3), groups=3)
        gain = 0.9 + 0.2 * torch.rand(x.shape[0], 3, 1, 1, generator=g)
        x = x * gain + 0.03 * torch.randn(x.shape, generator=g)
    elif condition == "blurry":
        x = F.interpolate(F.adaptive_avg_pool2d(x, 16), size=(size, size), mode="bicubic", align_corners=False)
    elif condition == "mixed":
        x = 0.5 * x + 0.5 * x.roll(1, dims=0)
    else:
        raise ValueError(f"condition: expected close, blurry or mixed, got {condition!r}")
    return x.clamp(0, 1)


def png_round_trip(x: torch.Tensor) -> torch.Tensor:
    """What saving as 8-bit PNG and reading back does to a float image in [0, 1]."""
    return (x * 255).round() / 255


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", default="random_weights", help="metrics config (braindecode_fw/conf/metrics/)")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. metrics.device=cuda")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"metrics={args.metrics}", *args.overrides])
    suite = ImageMetricSuite(cfg.metrics)
    size, aa = suite.eval_size, suite.antialias
    gts_u8 = ground_truths(args.images, args.seed)
    gts = resize(as_float_images(gts_u8), size, antialias=aa)  # stimuli are 8-bit already
    results = {}
    for k, condition in enumerate(("close", "blurry", "mixed")):
        recon = reconstructions(as_float_images(gts_u8), condition, args.seed + k)
        as_float = suite(resize(recon, size, antialias=aa), gts)
        as_png = suite(resize(png_round_trip(recon), size, antialias=aa), gts)
        results[condition] = {
            key: {"float": float(np.mean(as_float[key])), "png": float(np.mean(as_png[key])),
                  "mean_change": float(np.mean(as_png[key]) - np.mean(as_float[key])),
                  "max_image_change": float(np.max(np.abs(np.asarray(as_png[key]) - np.asarray(as_float[key]))))}
            for key in suite.metric_keys}
    print(json.dumps({"metrics": args.metrics, "images": args.images,
                      "random_weight_metrics": suite.random_weight_metrics, "results": results}, indent=1))
    print("\n| condition | column | float | 8-bit PNG | change of mean | largest change of one image |")
    print("|---|---|---|---|---|---|")
    for condition, cols in results.items():
        for key, r in cols.items():
            print(f"| {condition} | {suite.info(key).label} | {r['float']:.6f} | {r['png']:.6f} | "
                  f"{r['mean_change']:+.2e} | {r['max_image_change']:.2e} |")


if __name__ == "__main__":
    main()
