"""A stand-in for ``bdf-train`` for the sweep tests: the real CLI wrapper, ``braindecode_fw/conf/train.yaml``,
the Hydra run/sweep directories and the ``result.json`` contract, but no training (milliseconds).

The value it reports peaks at lr=1e-3, model.hidden=512, loss.temperature=0.05. Environment knobs:
``FAKE_FAIL_JOBS`` (comma-separated job numbers that raise), ``FAKE_USER_ERROR_JOBS`` (job numbers
that fail with a one-line CLI error, i.e. ``sys.exit(2)``), ``FAKE_RETURN_NONE=1`` (act as if
``optimized_metric`` were null), ``FAKE_WAIT_DIR`` (first attempt of each job writes
``<dir>/<job>.pid`` and waits there until it is signalled, for the requeue test).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from braindecode_fw.cli import run_app
from braindecode_fw.errors import ConfigError


def fake_value(cfg: DictConfig) -> float:
    lr = float(cfg.optim.optimizer.lr)
    temp = float(cfg.loss.temperature)
    return 1.0 - (math.log10(lr) + 3) ** 2 - (0.0 if int(cfg.model.hidden) == 512 else 0.1) \
        - (math.log10(temp) - math.log10(0.05)) ** 2


def fake_train(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    job = int(hc.job.num) if hc.job.get("num") is not None else 0
    attempts = run_dir / "attempts.txt"
    with attempts.open("a") as f:  # one line per attempt: the run dir it was given
        f.write(f"{os.getpid()} {run_dir}\n")
    wait_dir = os.environ.get("FAKE_WAIT_DIR")
    if wait_dir and len(attempts.read_text().splitlines()) == 1:
        (Path(wait_dir) / f"{job}.pid").write_text(str(os.getpid()))
        for _ in range(600):  # the test signals this process (requeue) within a minute
            time.sleep(0.1)
        raise RuntimeError("never signalled")
    if str(job) in os.environ.get("FAKE_FAIL_JOBS", "").split(","):
        raise RuntimeError(f"fake failure of job {job}")
    if str(job) in os.environ.get("FAKE_USER_ERROR_JOBS", "").split(","):
        raise ConfigError(f"fake.key: fake user error in job {job}")
    metrics = {"test/brain_to_image_top1": fake_value(cfg), "test/image_to_brain_top1": 0.5}
    name = cfg.get("optimized_metric")
    if os.environ.get("FAKE_RETURN_NONE"):
        name = None
    value = metrics[name] if name else None
    result: dict[str, Any] = {"task": "train", "optimized_metric": name, "value": value, "metrics": metrics,
                              "overrides": list(hc.overrides.task), "run_dir": str(run_dir)}
    (run_dir / "result.json").write_text(json.dumps(result))
    return value


if __name__ == "__main__":
    sys.exit(run_app("train", fake_train, "bdf-train"))
