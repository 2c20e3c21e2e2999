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

from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.io import load_tensors, remove_dead_temporaries
from braindecode_fw.ops.faults import fault_point

log = logging.getLogger(__name__)

LAST = "last.ckpt"
RESUME_MODES = ("auto", "never")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<name>.tmp-<pid>`` next to the target, then ``os.replace`` (a killed
    run's leftover temporaries in the folder are removed by the next save); loading
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
        remove_dead_temporaries(path.parent)  # half-written checkpoints of a killed run (last, best-...)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            fault_point("checkpoint.written", path)
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
        raise ConfigError(f"resume: one of {RESUME_MODES}, got {resume!r}")
    own = run_dir / "checkpoints" / LAST
    if ckpt_path in (None, ""):
        if resume == "auto" and own.is_file():
            log.info("resuming this run's own checkpoint %s (requeued job)", own)
            return str(own), run_dir
        return None, run_dir
    if ckpt_path == "last":
        latest = latest_checkpoint(task_dir)
        if latest is None:
            raise MissingFileError(f"ckpt_path=last: no run under {task_dir} has checkpoints/{LAST} to resume")
        previous = latest.parent.parent
        log.info("ckpt_path=last: continuing run %s from %s", previous, latest)
        return str(latest), previous
    path = Path(ckpt_path)
    if not path.is_file():
        raise MissingFileError(f"ckpt_path: checkpoint not found at {path} (give a .ckpt file, 'last' for the "
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


# what may differ when a run is continued in its own folder (ckpt_path=last, a requeued job): other
# hardware, other loggers; everything else would make the continued run a different experiment under
# the first one's name. Not even the epoch count: the learning-rate schedule's length was fixed
# from it when the run started (a OneCycle schedule then refuses to step past its end).
CONTINUE_MAY_CHANGE = ("trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy",
                       "data.num_workers", "logger", "callbacks", "resume_with_changes")
# what the weights and optimiser state of a checkpoint depend on (ckpt_path=<file> into a new run)
WEIGHTS_DEPEND_ON = ("model", "target", "extra_targets", "data.subjects", "optim.optimizer._target_",
                     "optim.weight_decay_groups")


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _value(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "(absent)"
        tree = tree[part]
    return tree


def _describe_changes(keys: list[str], old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    shown = [f"{k} ({_value(old, k)!r} -> {_value(new, k)!r})" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def check_resume_config(checkpoint_config: dict[str, Any], config: dict[str, Any], *, resume_from: str,
                        continued_run: Path | None, allow_changes: bool = False) -> list[str]:
    """Compare the resolved config a checkpoint was trained with to this run's; returns the keys that
    differ (for a warning). Continuing a run in its own folder (``continued_run``: ckpt_path=last)
    refuses any difference outside :data:`CONTINUE_MAY_CHANGE` unless ``allow_changes``
    (``resume_with_changes=true``), before anything is written into that run. Starting a new run
    from a checkpoint file refuses differences in :data:`WEIGHTS_DEPEND_ON` (the weights and
    optimiser state would not fit; ``init_from=`` copies what fits instead)."""
    changed = config_differences(checkpoint_config, config)
    if continued_run is not None:
        blocking = [k for k in changed if not _under(k, CONTINUE_MAY_CHANGE)]
        if blocking and not allow_changes:
            raise ConfigError(
                f"ckpt_path=last: the latest run {continued_run} was started with another config: "
                f"{_describe_changes(blocking, checkpoint_config, config)}. Continue it with its own settings "
                f"(only {', '.join(CONTINUE_MAY_CHANGE[:-1])} may change), start a new run from its checkpoint "
                f"with ckpt_path={resume_from}, or set resume_with_changes=true")
    else:
        blocking = [k for k in changed if _under(k, WEIGHTS_DEPEND_ON)]
        if blocking:
            raise ConfigError(
                f"ckpt_path: {resume_from} was trained with another {_describe_changes(blocking, checkpoint_config, config)}; "
                f"its weights and optimiser state do not fit this run (init_from={resume_from} copies the "
                f"weights that fit and starts training afresh)")
    return changed
