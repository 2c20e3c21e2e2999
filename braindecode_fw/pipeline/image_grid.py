"""A Lightning callback that shows what the decoder sees, every few epochs (docs/operations.md).

For a fixed set of validation trials (the same every epoch and every run: evenly spaced over one
subject's validation items), one row per trial: the ground-truth image | the reconstruction from the
decoded embedding (the run's ``generator``, when it fits the target) | the ``n_neighbours``
validation images whose target embeddings are nearest (cosine) to the decoded one. The grid goes to
every active logger (TensorBoard, W&B, MLflow) and to ``<run dir>/images/val_grid_epoch<NNN>.png``.
Only rank zero draws it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from braindecode_fw.contracts import GENERATED_FINAL
from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.images import as_float_images
from braindecode_fw.ops.loggers import log_image
from braindecode_fw.viz.grids import comparison_grid, save_png


class ImageGridCallback(L.Callback):
    """``every_n_epochs``: draw after every N-th validation epoch and after the last one.
    ``n_images``: rows (fixed validation items of ``subject``, default the first subject).
    ``n_neighbours``: nearest validation images by decoded-vs-target cosine similarity.
    ``generator``: a ``braindecode_fw/conf/generator`` node (train.py passes the run's); ``reconstruct: false``
    leaves the reconstruction column out (e.g. a real Stable Diffusion pipeline is too slow to run
    during training)."""

    def __init__(self, every_n_epochs: int = 4, n_images: int = 4, n_neighbours: int = 3,
                 subject: str | None = None, reconstruct: bool = True, generator: Any = None, seed: int = 0,
                 key: str = "val/image_grid", cell: int = 96):
        if every_n_epochs < 1 or n_images < 1 or n_neighbours < 0:
            raise ConfigError("callbacks.image_grid: every_n_epochs and n_images must be >= 1, n_neighbours >= 0; "
                             f"got {every_n_epochs}, {n_images}, {n_neighbours}")
        self.every_n_epochs, self.n_images, self.n_neighbours = every_n_epochs, n_images, n_neighbours
        self.subject, self.reconstruct, self.generator_cfg = subject, reconstruct, generator
        self.seed, self.key, self.cell = seed, key, cell
        self._generator: Any = None
        self.written: list[Path] = []

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._due(trainer):
            return
        grid = self.draw(trainer, pl_module)
        if grid is None:
            return
        path = Path(trainer.default_root_dir) / "images" / f"val_grid_epoch{trainer.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(save_png(grid, path))
        log_image(trainer.loggers, self.key, grid, step=trainer.global_step)

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> np.ndarray | None:
        """The grid as uint8 ``(H, W, 3)``, or None when there is nothing to show."""
        dm = trainer.datamodule
        loader = trainer.val_dataloaders
        dataset = getattr(loader, "dataset", None)
        if dm is None or dataset is None or getattr(dm, "store", None) is None:
            return None
        if len(dataset) == 0:
            return None
        subject = self.subject or dataset.subjects[int(dataset.subject_pos[0])]
        if subject not in dataset.subjects:
            raise ConfigError(f"callbacks.image_grid.subject: {subject!r} has no validation items; "
                             f"available: {dataset.subjects}")
        items = np.flatnonzero(dataset.subject_pos == dataset.subjects.index(subject))
        if len(items) == 0:
            return None
        rows = items[np.unique(np.linspace(0, len(items) - 1, min(self.n_images, len(items))).round().astype(int))]
        batch = dataset.__getitems__(rows.tolist())
        target = pl_module.target
        device = pl_module.device
        mask = batch.repeat_mask.to(device) if batch.repeat_mask is not None else None
        out = pl_module.decoder(batch.responses.to(device), batch.subject, mask)
        pred = out[target].float().cpu()

        columns = {"ground truth": as_float_images(dm.store.images[batch.image_index.numpy()])}
        recon = self._reconstruct(dm, pl_module.decoder, out, batch.image_index.tolist())
        if recon is not None:
            columns["reconstruction"] = recon
        if self.n_neighbours:
            pool = np.unique(dataset.image_index[items])
            cand = torch.as_tensor(np.asarray(dm.targets[target][pool]), dtype=torch.float32)
            sim = F.normalize(pred.flatten(1), dim=1) @ F.normalize(cand.flatten(1), dim=1).T
            nearest = pool[sim.topk(min(self.n_neighbours, len(pool)), dim=1).indices.numpy()]
            for k in range(nearest.shape[1]):
                columns[f"retrieved {k + 1}"] = as_float_images(dm.store.images[nearest[:, k]])
        return comparison_grid(columns, cell=self.cell)

    def _reconstruct(self, dm: Any, decoder: Any, out: dict[str, torch.Tensor],
                     images: list[int]) -> torch.Tensor | None:
        if not self.reconstruct or self.generator_cfg is None:
            return None
        from braindecode_fw.pipeline.generation import (
            conditioning_sources,
            fitting_generator,
            generator_inputs,
            image_seed,
        )

        if self._generator is None:
            provides = {**dm.target_shapes, **decoder.auxiliary_output_shapes()}  # e.g. a control map
            self._generator = fitting_generator(self.generator_cfg, provides, "image grid without reconstructions")
            if self._generator is None:
                self.reconstruct = False
                return None
        # a regression head's output where the decoder has one (MEG); uncalibrated here: a handful of
        # trials gives no feature statistics (bdf-reconstruct and the final grid calibrate)
        sources = conditioning_sources(decoder, generator_inputs(self._generator, out))
        inputs = {n: out[src].float().cpu() for n, src in sources.items()}
        return self._generator.reconstruct(inputs, [image_seed(self.seed, i, 0) for i in images])[GENERATED_FINAL]
