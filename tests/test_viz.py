"""Image grids: layout and pixel placement."""

from __future__ import annotations

import torch

from braindecode_fw.viz.grids import HEADER, comparison_grid


def test_comparison_grid_layout():
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1
    blue = torch.zeros(2, 3, 8, 8)
    blue[:, 2] = 1
    grid = comparison_grid({"ground truth": red, "final": blue}, cell=10, pad=2)
    assert grid.shape == (HEADER + 2 * 12 + 2, 2 * 12 + 2, 3) and grid.dtype.name == "uint8"
    y = HEADER + 2 + 12 + 5  # centre of the second row
    assert grid[y, 2 + 5].tolist() == [255, 0, 0] and grid[y, 14 + 5].tolist() == [0, 0, 255]
    assert (grid[:HEADER] < 255).any()  # titles drawn
