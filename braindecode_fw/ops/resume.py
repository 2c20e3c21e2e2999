"""Resuming training: which checkpoint, which run directory, and crash-safe checkpoint files.

``ckpt_path`` (braindecode_fw/conf/train.yaml) chooses:

- ``null`` with ``resume: auto`` (default): start fresh, unless this job's own run directory
  already holds ``checkpoints/last.ckpt`` — a SLURM job requeued after preemption or timeout runs
  again in the same directory and continues where it stopped;
- ``last``: continue the most recent run of this task (newest ``checkpoints/last.ckpt`` under
  ``<log_dir>/<task>/runs`` and ``multiruns``), in *that* run directory, so metrics, checkpoints and
  the W&B / MLflow run continue there;
- a path: start from that checkpoint in the new run directory.

A resumed run continues bitwise like an uninterrupted one (sampler seeded by ``(seed, epoch)``,
RNG states in the checkpoint; tests/ops/test_resume.py kills a run with SIGKILL to show it).
Checkpoints are written to a temporary name and renamed (:class:`AtomicCheckpointIO`), so a kill
during the write leaves the previous ``last.ckpt`` intact instead of a truncated file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from braindecode_fw.io import load_tensors

log = logging.getLogger(__name__)

LAST = "last.ckpt"
RESUME_MODES = ("auto", "never")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<name>.tmp-<pid>`` next to the target, then ``os.replace``; loading
    (Lightning's resume) always with ``weights_only=True``, whatever torch's default: a checkpoint
    that would run code when unpickled is refused, naming the file."""

    def load_checkpoint(self, path: str | Path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_tensors(path, "ckpt_path", map_location=map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def latest_checkpoint(task_dir: Path) -> Path | None:
    """The newest ``checkpoints/last.ckpt`` (by modification time) of any run under ``task_dir``
    (``runs/<run>/`` and ``multiruns/<sweep>/<job>/``)."""
    found = [*task_dir.glob(f"runs/*/checkpoints/{LAST}"), *task_dir.glob(f"multiruns/*/*/checkpoints/{LAST}")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_resume(ckpt_path: str | None, resume: str, run_dir: Path, task_dir: Path) -> tuple[str | None, Path]:
    """-> (the checkpoint to resume from or None, the run directory to write into)."""
    if resume not in RESUME_MODES:
        raise ValueError(f"resume: one of {RESUME_MODES}, got {resume!r}")
    own = run_dir / "checkpoints" / LAST
    if ckpt_path in (None, ""):
        if resume == "auto" and own.is_file():
            log.info("resuming this run's own checkpoint %s (requeued job)", own)
            return str(own), run_dir
        return None, run_dir
    if ckpt_path == "last":
        latest = latest_checkpoint(task_dir)
        if latest is None:
            raise FileNotFoundError(f"ckpt_path=last: no run under {task_dir} has checkpoints/{LAST} to resume")
        previous = latest.parent.parent
        log.info("ckpt_path=last: continuing run %s from %s", previous, latest)
        return str(latest), previous
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: checkpoint not found at {path} (give a .ckpt file, 'last' for the "
                                f"latest run, or null)")
    return str(path), run_dir


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                       ignore: tuple[str, ...] = ("paths", "ckpt_path", "resume", "hydra")) -> list[str]:
    """Dotted keys whose values differ between two resolved config trees (for a warning when a run
    is continued with other settings than it was started with)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.", ignore)
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
