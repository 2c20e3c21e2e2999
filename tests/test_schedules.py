"""Brain-IT's warm-up + plateau schedule (docs/methods/brainit.md §4) against its formula."""

from __future__ import annotations

import pytest
import torch

from braindecode_fw.schedules import WarmupPlateau


def test_cubic_warmup_then_plateau():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = WarmupPlateau(opt, warmup_epochs=15, patience=2)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(15):
        sched.step(1.0)
        lrs.append(opt.param_groups[0]["lr"])
    want = [5e-4 * (1e-3 + (1 - 1e-3) * (e / 15) ** 3) for e in range(16)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert lrs[-1] == pytest.approx(5e-4)
    # after the warm-up: improvements keep the lr, patience + 1 epochs without one divide it by 10
    sched.step(0.9)
    sched.step(0.8995)  # within the absolute threshold 1e-3: not an improvement
    sched.step(0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    sched.step(0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) and sched.monitor == "val/loss"
