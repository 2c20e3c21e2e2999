"""The image-grid callback: fixed rows, nearest retrievals by decoded-vs-target cosine similarity,
the due epochs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from braindecode_fw.data.datamodule import Batch
from braindecode_fw.pipeline.image_grid import ImageGridCallback
from braindecode_fw.viz.grids import HEADER

N_IMAGES, CELL, PAD = 12, 16, 2


class _Dataset:
    """Validation items of two subjects; a response *is* its image's target (an oracle decoder)."""

    subjects = ["subj01", "subj02"]

    def __init__(self, targets: np.ndarray):
        self.image_index = np.concatenate([np.arange(N_IMAGES), np.arange(N_IMAGES)])
        self.subject_pos = np.repeat([0, 1], N_IMAGES)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitems__(self, rows):
        images = self.image_index[rows]
        return Batch(subject=[self.subjects[p] for p in self.subject_pos[rows]],
                     responses=torch.from_numpy(self.targets[images] * 3.0), image_index=torch.from_numpy(images))


def _setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.standard_normal((N_IMAGES, 6)).astype(np.float32)
    colours = rng.choice(256, size=(N_IMAGES, 3), replace=False).astype(np.uint8)  # one flat colour per image
    images = np.broadcast_to(colours[:, None, None, :], (N_IMAGES, 8, 8, 3)).copy()
    dm = SimpleNamespace(store=SimpleNamespace(images=images), targets={"clip": targets},
                         target_shapes={"clip": (6,)})
    trainer = SimpleNamespace(datamodule=dm, val_dataloaders=SimpleNamespace(dataset=_Dataset(targets)))
    module = SimpleNamespace(target="clip", device=torch.device("cpu"),
                             decoder=lambda responses, subject, mask: {"clip": responses})
    return trainer, module, colours


def _cell(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    y, x = HEADER + PAD + row * (CELL + PAD), PAD + col * (CELL + PAD)
    return grid[y + 4, x + 4]


def test_rows_are_fixed_and_the_nearest_image_is_the_true_one():
    trainer, module, colours = _setup()
    callback = ImageGridCallback(n_images=4, n_neighbours=2, reconstruct=False, cell=CELL)
    grid = callback.draw(trainer, module)
    assert grid.shape == (HEADER + 4 * (CELL + PAD) + PAD, 3 * (CELL + PAD) + PAD, 3)
    shown = [0, 4, 7, 11]  # evenly spaced over subj01's 12 items, the same every epoch
    for r, image in enumerate(shown):
        np.testing.assert_array_equal(_cell(grid, r, 0), colours[image])  # ground truth
        np.testing.assert_array_equal(_cell(grid, r, 1), colours[image])  # oracle decoding: itself first
        assert not np.array_equal(_cell(grid, r, 2), colours[image])  # then another image
    np.testing.assert_array_equal(grid, callback.draw(trainer, module))

    other = ImageGridCallback(n_images=2, n_neighbours=0, subject="subj02", reconstruct=False, cell=CELL)
    assert other.draw(trainer, module).shape[1] == CELL + 2 * PAD  # ground truth only
    with pytest.raises(ValueError, match="callbacks.image_grid.subject: 'subj09' has no validation items"):
        ImageGridCallback(subject="subj09", reconstruct=False).draw(trainer, module)


@pytest.mark.parametrize(("epoch", "due"), [(0, False), (3, True), (4, False), (7, True), (9, True)])
def test_due_every_n_epochs_and_after_the_last(epoch, due):
    trainer = SimpleNamespace(current_epoch=epoch, max_epochs=10)
    assert ImageGridCallback(every_n_epochs=4)._due(trainer) is due


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="callbacks.image_grid: every_n_epochs and n_images must be >= 1"):
        ImageGridCallback(every_n_epochs=0)
