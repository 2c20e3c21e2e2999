"""Image grids: ground truth | low-level | final, one row per test image (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from braindecode_fw.io import atomic_write_bytes

HEADER = 14


def comparison_grid(columns: dict[str, torch.Tensor], *, cell: int = 96, pad: int = 2) -> np.ndarray:
    """``{title: (n, 3, h, w) in [0, 1]}`` -> uint8 ``(H, W, 3)``: a title row, then one column per
    entry and one row per image, every cell resized to ``cell`` px, white padding."""
    from PIL import Image, ImageDraw

    titles = list(columns)
    n = len(next(iter(columns.values())))
    out = np.full((HEADER + n * (cell + pad) + pad, len(titles) * (cell + pad) + pad, 3), 255, dtype=np.uint8)
    for c, t in enumerate(titles):
        imgs = torch.nn.functional.interpolate(columns[t].float(), size=(cell, cell), mode="bilinear",
                                               antialias=True, align_corners=False).clamp(0, 1)
        u8 = (imgs * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for r in range(n):
            y, x = HEADER + pad + r * (cell + pad), pad + c * (cell + pad)
            out[y : y + cell, x : x + cell] = u8[r]
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    for c, t in enumerate(titles):
        draw.text((pad + c * (cell + pad) + 2, 1), t, fill=(0, 0, 0))
    return np.asarray(canvas).copy()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
