"""Image batches for evaluation: conversion, resizing and loading (docs/evaluation.md).

Evaluation images are float tensors ``(n, 3, h, w)`` in ``[0, 1]``. Every metric starts from the
same evaluation resolution (256×256, as MindEye2's ``final_evaluations``) and then applies its own
resize. Resizing follows torchvision's tensor ``Resize`` of the versions the papers pinned
(0.15/0.16): bilinear with **no antialiasing**, which matters whenever a resize downsamples
(768→256 recons, 256→224 for CLIP/SwAV, 256→255 for EfficientNet). ``antialias=True`` switches to
antialiased resizing for users who prefer it over parity with the published numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from braindecode_fw.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Float (or uint8) pixel arrays, evaluated without the 8-bit rounding a PNG imposes.
ARRAY_SUFFIXES = (".npy", ".safetensors", ".pt")


def as_float_images(images: np.ndarray | torch.Tensor, *, name: str = "images") -> torch.Tensor:
    """uint8 ``(n, h, w, 3)`` / float ``(n, 3, h, w)`` in [0, 1] -> float32 ``(n, 3, h, w)``.

    uint8 arrays are channels-last (the prepared store's layout); float arrays channels-first.
    """
    x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ConfigError(f"{name}: uint8 images must be (n, h, w, 3), got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float().div_(255.0)
    if not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"{name}: expected float (n, 3, h, w) in [0, 1] or uint8 (n, h, w, 3), "
                         f"got {x.dtype} {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{name}: float images hold NaN or Inf values")
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 1.0)
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = "; images in [-1, 1] (a VAE decoder's output) need (x + 1) / 2 first" if lo >= -1 - 1e-3 and lo < -1e-3 else ""
        raise ConfigError(f"{name}: float images must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]{hint}")
    return x.float()


def resize(images: torch.Tensor, size: int, *, mode: str = "bilinear", antialias: bool = False) -> torch.Tensor:
    """``(n, c, h, w)`` -> ``(n, c, size, size)``; torchvision ``Resize`` tensor semantics
    (half-pixel centres, ``align_corners=False``). A no-op at the target size."""
    if images.shape[-2:] == (size, size):
        return images
    aa = antialias and mode in ("bilinear", "bicubic")
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False if mode != "nearest" else None,
                         antialias=aa)


def to_eval_resolution(images: torch.Tensor, size: int = 256, *, antialias: bool = False,
                       name: str = "images") -> torch.Tensor:
    """Bring a batch to the common evaluation resolution (square), as the papers do before any metric."""
    h, w = images.shape[-2:]
    if h != w:
        log.warning("%s: non-square images (%dx%d) are resized to %dx%d", name, h, w, size, size)
    return resize(images, size, antialias=antialias)


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """``(n, 3, h, w)`` -> ``(n, h, w)`` luminance with skimage's ``rgb2gray`` weights (ITU-R 709)."""
    weights = torch.tensor([0.2125, 0.7154, 0.0721], dtype=images.dtype, device=images.device)
    return torch.einsum("nchw,c->nhw", images, weights)


def read_image_array(path: str | Path) -> torch.Tensor:
    """One array file -> float ``(n, 3, h, w)`` in [0, 1], pixels as stored (no 8-bit rounding).

    ``.npy`` (read without pickle), ``.safetensors`` (one tensor, or the one named ``images``) or
    ``.pt`` (a tensor saved with ``torch.save``, read with ``weights_only=True``; MindEye2's
    evaluation saves its reconstructions this way). Accepted layouts: float ``(n, 3, h, w)`` or
    ``(n, h, w, 3)`` in [0, 1], uint8 ``(n, h, w, 3)``; a single image may drop the leading ``n``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise ConfigError(f"{path}: not an array file (expected one of {', '.join(ARRAY_SUFFIXES)})")
    try:
        if suffix == ".npy":
            loaded = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # numpy/safetensors/torch each raise their own types for damaged files
        raise ConfigError(f"{path}: not a readable {suffix} array ({type(e).__name__}: {e})") from None
    if isinstance(loaded, dict) and suffix == ".safetensors":
        if len(loaded) != 1 and "images" not in loaded:
            raise ConfigError(f"{path}: expected one tensor or one named 'images', found {sorted(loaded)}")
        loaded = loaded["images"] if "images" in loaded else next(iter(loaded.values()))
    if not isinstance(loaded, torch.Tensor):
        raise ConfigError(f"{path}: expected a tensor saved with torch.save, found {type(loaded).__name__}")
    x = loaded
    if x.ndim == 3:
        x = x[None]
    if x.is_floating_point() and x.ndim == 4 and x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.is_floating_point():
        x = x.float()
    return as_float_images(x, name=str(path))


def load_images(paths: Sequence[str | Path], size: int | None = None, *, antialias: bool = False) -> torch.Tensor:
    """Image files -> float ``(n, 3, size, size)`` in [0, 1] (RGB; alpha dropped, gray expanded).

    Files with an ``ARRAY_SUFFIXES`` suffix hold one image each, read by ``read_image_array``.
    """
    from PIL import Image

    out = []
    for p in paths:
        if Path(p).suffix.lower() in ARRAY_SUFFIXES:
            x = read_image_array(p)
            if x.shape[0] != 1:
                raise ConfigError(f"{p}: an array file in an image folder holds one image, found {x.shape[0]}")
            out.append(resize(x, size, antialias=antialias) if size else x)
            continue
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise ConfigError(f"{p}: not a readable image ({e})") from None
        x = as_float_images(arr[None], name=str(p))
        out.append(resize(x, size, antialias=antialias) if size else x)
    if not out:
        return torch.empty(0, 3, size or 0, size or 0)
    shapes = {tuple(x.shape) for x in out}
    if len(shapes) > 1:
        raise ConfigError(f"images have different sizes {sorted(shapes)}; pass size= to resize them")
    return torch.cat(out)


def list_images(folder: str | Path) -> dict[str, Path]:
    """Image (and one-image array) files directly inside ``folder`` keyed by file stem (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES)
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise ConfigError(f"{folder}: two images share the name {p.stem!r} ({stems[p.stem].name}, {p.name})")
        stems[p.stem] = p
    return stems
