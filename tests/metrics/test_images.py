"""Evaluation image handling: torchvision-<0.17 resize semantics and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from braindecode_fw.metrics.images import as_float_images, list_images, load_images, resize


def _bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear interpolation without antialiasing, by hand: ``(c, h, w)``."""
    c, h, w = img.shape
    def coords(n_in, n_out):
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo
    y0, y1, wy = coords(h, size)
    x0, x1, wx = coords(w, size)
    top = img[:, y0][:, :, x0] * (1 - wx) + img[:, y0][:, :, x1] * wx
    bot = img[:, y1][:, :, x0] * (1 - wx) + img[:, y1][:, :, x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


@pytest.mark.parametrize("src,dst", [(256, 425), (768, 256), (256, 224), (256, 255)])
def test_resize_is_non_antialiased_bilinear(src, dst):
    x = torch.rand(1, 3, src, src, generator=torch.Generator().manual_seed(src))
    ours = resize(x, dst).numpy()[0]
    # PyTorch computes source coordinates in float32: agreement to ~3e-5 of the pixel range
    np.testing.assert_allclose(ours, _bilinear_reference(x.numpy()[0].astype(np.float64), dst), atol=5e-5)


def test_antialias_flag_changes_downsampling_only():
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(resize(x, 224), resize(x, 224, antialias=True), atol=1e-3)
    assert torch.allclose(resize(x, 425), resize(x, 425, antialias=True), atol=1e-6)
    assert resize(x, 256) is x


def test_as_float_images_layouts_and_errors():
    u8 = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    u8[..., 0] = 255
    x = as_float_images(u8)
    assert x.shape == (2, 3, 8, 8) and x[:, 0].min() == 1.0 and x[:, 1].max() == 0.0
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        as_float_images(torch.full((1, 3, 4, 4), 2.0))
    with pytest.raises(ValueError, match=r"uint8 images must be \(n, h, w, 3\)"):
        as_float_images(np.zeros((1, 3, 8, 8), dtype=np.uint8))


def test_load_and_list_images(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    Image.fromarray(rgba).save(tmp_path / "b.png")
    Image.fromarray(np.full((10, 10), 50, dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    files = list_images(tmp_path)
    assert list(files) == ["a", "b"]
    x = load_images(list(files.values()), size=16)
    assert x.shape == (2, 3, 16, 16)
    assert torch.allclose(x[0], torch.full_like(x[0], 50 / 255))
    assert torch.allclose(x[1, 1], torch.full_like(x[1, 1], 200 / 255)) and x[1, 0].max() == 0
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        load_images([tmp_path / "bad.png"])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "missing")


def test_read_image_array_formats_layouts_and_errors(tmp_path):
    from safetensors.torch import save_file

    from braindecode_fw.metrics.images import read_image_array

    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "cf.npy", x.numpy())
    np.save(tmp_path / "cl.npy", x.permute(0, 2, 3, 1).numpy().astype(np.float64))  # channels-last, float64
    save_file({"images": x.half().float()}, tmp_path / "named.safetensors")
    torch.save(x, tmp_path / "mindeye2_style.pt")
    for name in ("cf.npy", "cl.npy", "mindeye2_style.pt"):
        got = read_image_array(tmp_path / name)
        assert got.dtype == torch.float32 and got.shape == (3, 3, 6, 6)
        assert torch.equal(got, x), name  # no 8-bit rounding: the stored floats exactly
    assert torch.equal(read_image_array(tmp_path / "named.safetensors"), x.half().float())
    u8 = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    np.save(tmp_path / "u8.npy", u8.numpy())
    assert torch.equal(read_image_array(tmp_path / "u8.npy"), u8.permute(0, 3, 1, 2).float() / 255)
    np.save(tmp_path / "one.npy", x[0].numpy())  # a single image drops the leading n
    assert read_image_array(tmp_path / "one.npy").shape == (1, 3, 6, 6)

    save_file({"a": x, "b": x.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"two.safetensors: expected one tensor or one named 'images', found \['a', 'b'\]"):
        read_image_array(tmp_path / "two.safetensors")
    torch.save({"recons": x}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match=r"dict.pt: expected a tensor saved with torch.save, found dict"):
        read_image_array(tmp_path / "dict.pt")
    np.save(tmp_path / "signed.npy", (x * 2 - 1).numpy())
    with pytest.raises(ValueError, match=r"signed.npy: float images must be in \[0, 1\].*\(x \+ 1\) / 2"):
        read_image_array(tmp_path / "signed.npy")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    np.save(tmp_path / "nan.npy", bad.numpy())
    with pytest.raises(ValueError, match="nan.npy: float images hold NaN or Inf"):
        read_image_array(tmp_path / "nan.npy")
    np.save(tmp_path / "gray.npy", x[:2, 0].numpy())  # two grayscale images
    with pytest.raises(ValueError, match=r"gray.npy: expected float \(n, 3, h, w\)"):
        read_image_array(tmp_path / "gray.npy")
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "cf.npy").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"trunc.npy: not a readable .npy array"):
        read_image_array(tmp_path / "trunc.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"obj.npy: not a readable .npy array"):  # never unpickled
        read_image_array(tmp_path / "obj.npy")


def test_folders_mix_image_files_and_one_image_arrays(tmp_path):
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "b.npy", x[0].numpy())
    Image.fromarray(np.full((8, 8, 3), 10, dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "._a.png")  # macOS resource fork
    files = list_images(tmp_path)
    assert list(files) == ["a", "b"]
    loaded = load_images(list(files.values()))
    assert torch.equal(loaded[1:], x)
    np.save(tmp_path / "a.npy", x[0].numpy())
    with pytest.raises(ValueError, match=r"two images share the name 'a' \(a.npy, a.png\)"):
        list_images(tmp_path)
    np.save(tmp_path / "many.npy", torch.rand(2, 3, 8, 8).numpy())
    with pytest.raises(ValueError, match="many.npy: an array file in an image folder holds one image, found 2"):
        load_images([tmp_path / "many.npy"])
