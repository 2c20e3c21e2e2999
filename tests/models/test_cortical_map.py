"""Cortical maps (NeuroPictor's input, docs/methods/neuropictor.md §1): scatter mean, mask, hemisphere layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.models.cortical_map import (
    CorticalProjection,
    coordinates_from_geometry,
    flatten_volume,
)


def _reference(x: np.ndarray, pixels: np.ndarray, size: int) -> np.ndarray:
    total, count = np.zeros((size, size)), np.zeros((size, size))
    for v, (r, c) in zip(x, pixels, strict=True):
        total[r, c] += v
        count[r, c] += 1
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def test_scatter_mean_matches_numpy_and_routes_by_subject():
    rng = np.random.default_rng(0)
    size, n = 6, {"a": 40, "b": 25}
    proj = CorticalProjection(n, size)
    pixels = {s: rng.integers(0, size, (k, 2)) for s, k in n.items()}  # many collisions on a 6×6 map
    for s in n:
        proj.set_pixels(s, pixels[s])
    subjects = ["b", "a", "b"]
    x = torch.randn(3, 40, dtype=torch.float64)
    maps = proj(x, subjects)
    assert maps.shape == (3, 1, size, size)
    for row, s in enumerate(subjects):
        # b's responses beyond its 25 voxels (padding, here non-zero) must not leak into its map
        ref = _reference(x[row, : n[s]].numpy(), pixels[s], size)
        np.testing.assert_allclose(maps[row, 0].numpy(), ref, atol=1e-12)
        occupied = np.zeros((size, size), bool)
        occupied[tuple(pixels[s].T)] = True
        np.testing.assert_array_equal(proj.mask[proj.subject_index([s])[0]].numpy(), occupied)


def test_round_trip_and_zeros_outside_mask():
    size = 16
    proj = CorticalProjection({"a": 30}, size)
    flat = np.random.default_rng(1).choice(size * size, 30, replace=False)  # distinct pixels
    proj.set_pixels("a", np.stack([flat // size, flat % size], 1))
    x = torch.randn(2, 30) + 5.0  # far from zero, so a leak would show
    maps = proj(x, ["a", "a"])
    torch.testing.assert_close(proj.sample(maps, ["a", "a"]), x)
    outside = ~proj.mask[0]
    assert int(outside.sum()) == size * size - 30
    assert torch.all(maps[:, 0][:, outside] == 0)


def test_fill_radius_fills_holes_near_voxels_only():
    proj = CorticalProjection({"a": 2}, 9, fill_radius=1.0)
    proj.set_pixels("a", np.array([[2, 2], [6, 6]]))
    maps = proj(torch.tensor([[1.0, -3.0]]), ["a"])[0, 0]
    assert maps[2, 3] == 1.0 and maps[1, 2] == 1.0 and maps[6, 5] == -3.0  # neighbours copy the nearest voxel
    assert maps[3, 3] == 0.0 and maps[0, 0] == 0.0 and maps[4, 4] == 0.0  # diagonal (√2 > 1) and far: outside
    assert bool(proj.mask[0, 2, 3]) and not bool(proj.mask[0, 4, 4])
    assert int(proj.mask[0].sum()) == 10  # two plus-shaped neighbourhoods of 5 pixels


def test_hemispheres_land_on_their_halves_with_posterior_in_the_middle():
    # i: left-right, j: posterior-anterior, k: inferior-superior (the synthetic world's axes)
    ijk = np.array([[1, 0, 0], [2, 9, 5], [7, 0, 0], [8, 9, 5], [1, 4, 9], [8, 4, 9]])
    px = coordinates_from_geometry(ijk, 256)
    left, right = px[[0, 1, 4]], px[[2, 3, 5]]
    assert np.all(left[:, 1] < 128) and np.all(right[:, 1] > 128)
    assert px[0, 1] > px[1, 1] and px[2, 1] < px[3, 1]  # posterior (j=0) nearer the midline than anterior
    assert px[4, 0] < px[1, 0] < px[0, 0]  # superior at the top (row 0)
    assert px.min() >= 8 and px.max() <= 247  # default margin 256 // 32
    # an affine that flips the left-right axis swaps the hemispheres
    flipped = coordinates_from_geometry(ijk, 256, affine=np.diag([-1.8, 1.8, 1.8, 1.0]))
    assert np.all(flipped[[0, 1, 4], 1] > 128) and np.all(flipped[[2, 3, 5], 1] < 128)
    xy = flatten_volume(ijk)
    assert np.all((xy >= 0) & (xy <= 1))


def test_flat_map_coordinates_are_accepted():
    xy = np.array([[-10.0, 0.0], [10.0, 5.0], [0.0, 2.5]])  # e.g. a surface flatmap in mm
    px = coordinates_from_geometry(xy, (32, 64), margin=0)
    np.testing.assert_array_equal(px, [[31, 0], [0, 63], [16, 32]])


def test_state_dict_carries_the_layout():
    a = CorticalProjection({"a": 5, "b": 3}, 8, fill_radius=1.5)
    a.set_coordinates("a", np.random.default_rng(0).integers(0, 6, (5, 3)))
    b = CorticalProjection({"a": 5, "b": 3}, 8, fill_radius=1.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 5)
    torch.testing.assert_close(a(x, ["a"]), b(x, ["a"]))
    assert b.is_configured("a") and not b.is_configured("b")


def test_errors():
    proj = CorticalProjection({"a": 4, "b": 3}, 8)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        proj.set_pixels("a", np.zeros((3, 2)))
    with pytest.raises(ValueError, match="outside the 8×8 map"):
        proj.set_pixels("a", np.full((4, 2), 8))
    with pytest.raises(KeyError, match="unknown subject 'c'"):
        proj.set_pixels("c", np.zeros((4, 2)))
    proj.set_pixels("a", np.zeros((4, 2)))
    with pytest.raises(RuntimeError, match=r"no voxel layout for \['b'\]"):
        proj(torch.zeros(2, 4), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(V, 3\) voxel indices or \(V, 2\)"):
        coordinates_from_geometry(np.zeros((5, 4)))
    with pytest.raises(ValueError, match="margin"):
        coordinates_from_geometry(np.zeros((5, 3)), 8, margin=4)
