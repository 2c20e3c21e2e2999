"""Learning-rate schedules that torch does not ship.

:class:`WarmupPlateau`: Brain-IT's decoder schedule (docs/methods/brainit.md §4): for the first
``warmup_epochs`` epochs the learning rate is ``lr · (floor + (1 − floor)·(e / warmup_epochs)³)``,
then ``ReduceLROnPlateau`` on the monitored validation metric (factor 0.1, patience 5, absolute
threshold 1e-3). It is a ``ReduceLROnPlateau`` so Lightning steps it once per epoch with the
monitored value (``DecoderModule`` passes ``monitor``).

``warmup_from``: the warm-up step the first epoch trains at. 0: epoch ``e`` (from 0) trains at step
``e`` and the plateau logic starts after ``warmup_epochs`` epochs. 1 is Brain-IT's released loop
(``train/train_decoder.py``), which steps its ``LambdaLR`` *before* each epoch: its first epoch
trains at step 1, its 15th already at the full lr, and ``ReduceLROnPlateau`` first sees the 15th
epoch's validation metric.
"""

from __future__ import annotations

import torch

from braindecode_fw.errors import ConfigError


class WarmupPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """Cubic warm-up over epochs, then reduce-on-plateau. ``step(metric)`` once per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_epochs: int = 15, floor: float = 1e-3,
                 mode: str = "min", factor: float = 0.1, patience: int = 5, threshold: float = 1e-3,
                 threshold_mode: str = "abs", min_lr: float = 0.0, monitor: str = "val/loss",
                 warmup_from: int = 0):
        super().__init__(optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                         threshold_mode=threshold_mode, min_lr=min_lr)
        if warmup_from not in (0, 1):
            raise ConfigError(f"optim.scheduler.warmup_from: 0 or 1 (Brain-IT's loop), got {warmup_from!r}")
        self.warmup_epochs, self.floor, self.monitor = int(warmup_epochs), float(floor), monitor
        self.warmup_from = int(warmup_from) if self.warmup_epochs else 0
        self.target_lrs = [g["lr"] for g in optimizer.param_groups]
        self.epochs_done = 0
        self._set_warmup(self.warmup_from)

    def _set_warmup(self, epoch: int) -> None:
        scale = self.floor + (1 - self.floor) * (epoch / self.warmup_epochs) ** 3 if self.warmup_epochs else 1.0
        for group, lr in zip(self.optimizer.param_groups, self.target_lrs, strict=True):
            group["lr"] = lr * scale

    def step(self, metrics, epoch=None) -> None:  # noqa: D102 - torch's signature
        self.epochs_done += 1
        if self.epochs_done + self.warmup_from <= self.warmup_epochs:
            # the plateau logic starts after the warm-up
            self._set_warmup(self.epochs_done + self.warmup_from)
            return
        super().step(metrics)
