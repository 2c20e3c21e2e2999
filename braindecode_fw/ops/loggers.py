"""Experiment loggers (``braindecode_fw/conf/logger/``): CSV, TensorBoard, W&B and MLflow, all inside the run
directory, and one function that sends an image to every active logger.

What the stock Lightning loggers leave to the user (docs/operations.md, "Loggers and dashboards"):

- **W&B offline by default.** Without an API key (``WANDB_API_KEY`` or a ``~/.netrc`` entry for
  ``api.wandb.ai``) the run is written offline under ``<run dir>/wandb`` (``wandb sync`` uploads
  it later) instead of prompting or failing; ``WANDB_MODE`` still wins when set.
- **Resumed runs continue the same dashboard run.** The W&B and MLflow run ids are written to
  ``<run dir>/wandb_run_id.txt`` / ``mlflow_run_id.txt``; a run resumed in that directory (or from
  one of its checkpoints) logs into the same W&B / MLflow run instead of starting a new one; the
  CSV file keeps its rows and TensorBoard purges the steps after the checkpoint.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from braindecode_fw.errors import ConfigError
from braindecode_fw.io import atomic_write_text, load_tensors

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id.txt"
MLFLOW_ID_FILE = "mlflow_run_id.txt"


def _read_id(run_dir: Path, name: str, resume_from: str | Path | None) -> str | None:
    """The id recorded in ``run_dir`` or, for a run resumed from another run's checkpoint
    (``<old run>/checkpoints/x.ckpt``), in that run's directory."""
    candidates = [Path(run_dir)]
    if resume_from:
        candidates.append(Path(resume_from).resolve().parent.parent)
    for d in candidates:
        f = d / name
        if f.is_file() and f.read_text().strip():
            return f.read_text().strip()
    return None


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(save_dir: str, *, project: str = "braindecode_fw", name: str | None = None,
                 offline: bool | str = "auto", tags: list[str] | None = None, group: str | None = None,
                 resume_from: str | None = None, **kwargs: Any):
    """A :class:`~lightning.pytorch.loggers.WandbLogger` writing into ``<save_dir>/wandb``.

    ``offline``: ``"auto"`` (offline unless credentials are configured), ``true`` or ``false``.
    The run id is reused from ``save_dir`` (or the run ``resume_from`` belongs to) with
    ``resume="allow"``, so a resumed training run appends to the same W&B run."""
    from lightning.pytorch.loggers import WandbLogger

    if offline == "auto":
        offline = os.environ.get("WANDB_MODE") != "online" and not wandb_has_credentials()
        if offline:
            log.info("wandb: no API key configured; logging offline to %s/wandb (upload later with `wandb sync`)",
                     save_dir)
    elif not isinstance(offline, bool):
        raise ConfigError(f"logger.wandb.offline: true, false or 'auto', got {offline!r}")
    run_dir = Path(save_dir)
    run_id = _read_id(run_dir, WANDB_ID_FILE, resume_from) or uuid.uuid4().hex[:12]
    atomic_write_text(run_dir / WANDB_ID_FILE, run_id + "\n")
    return WandbLogger(save_dir=str(run_dir), project=project, name=name or run_dir.name, id=run_id,
                       resume="allow", offline=bool(offline), tags=list(tags or []), group=group, **kwargs)


def mlflow_logger(save_dir: str, *, experiment_name: str = "braindecode_fw", run_name: str | None = None,
                  tracking_uri: str | None = None, resume_from: str | None = None, **kwargs: Any):
    """A :class:`~lightning.pytorch.loggers.MLFlowLogger`. ``tracking_uri: null`` stores runs in a
    SQLite database inside the run directory (``<save_dir>/mlflow.db``, MLflow's default backend
    since 3.7; view with ``bdf-dashboard tool=mlflow``) and artifacts (image grids) in
    ``<save_dir>/mlflow_artifacts``; give a server URI to log remotely. The MLflow run id is kept
    in the run directory so a resumed run continues the same MLflow run."""
    from lightning.pytorch.loggers import MLFlowLogger

    run_dir = Path(save_dir).resolve()
    local = tracking_uri is None
    uri = f"sqlite:///{run_dir / 'mlflow.db'}" if local else tracking_uri
    logger = MLFlowLogger(
        experiment_name=experiment_name, run_name=run_name or run_dir.name, tracking_uri=uri,
        artifact_location=(run_dir / "mlflow_artifacts").as_uri() if local else None,
        run_id=_read_id(run_dir, MLFLOW_ID_FILE, resume_from), **kwargs,
    )
    atomic_write_text(run_dir / MLFLOW_ID_FILE, logger.run_id + "\n")
    return logger


def _resume_point(resume_from: str | None) -> tuple[int, int] | None:
    """(epoch, global_step) stored in the checkpoint being resumed from (memory-mapped: cheap)."""
    if not resume_from:
        return None
    ckpt = load_tensors(resume_from, "ckpt_path", mmap=True)
    return int(ckpt.get("epoch", 0)), int(ckpt.get("global_step", 0))


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` of a continued run keeps the
    rows logged up to the checkpoint (``resume_point``: epoch, global step) instead of being deleted."""

    def __init__(self, log_dir: str, resume_point: tuple[int, int] | None = None):
        self.resume_point = resume_point  # read by _check_log_dir_exists during the base __init__
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.resume_point is None or not path.is_file():
            return super()._check_log_dir_exists()
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = sorted(reader.fieldnames or [])
            rows = [r for r in reader if _logged_before(r, *self.resume_point)]
        self.metrics_keys = keys
        body = [",".join(keys)] + [",".join(r.get(k) or "" for k in keys) for r in rows]
        atomic_write_text(path, "\n".join(body) + "\n")


class ContinuingCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` writing through :class:`_ContinuingWriter`."""

    def __init__(self, *args: Any, resume_point: tuple[int, int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resume_point = resume_point

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self.resume_point)
        return self._experiment


def csv_logger(save_dir: str, *, name: str = "csv", resume_from: str | None = None, **kwargs: Any) -> CSVLogger:
    """``<save_dir>/<name>/metrics.csv``; a run continued in its own directory keeps its earlier rows
    (Lightning deletes the file) minus those logged after the checkpoint it resumes from (an epoch the
    kill interrupted is logged again by the resumed run)."""
    return ContinuingCSVLogger(save_dir=save_dir, name=name, version="", resume_point=_resume_point(resume_from),
                               **kwargs)


def _logged_before(row: dict[str, str], epoch: int, step: int) -> bool:
    if row.get("epoch"):
        return int(float(row["epoch"])) <= epoch
    return row.get("step", "") != "" and int(float(row["step"])) < step


def tensorboard_logger(save_dir: str, *, name: str = "tensorboard", resume_from: str | None = None,
                       **kwargs: Any):
    """Lightning's TensorBoardLogger (``<save_dir>/<name>``); a resumed run purges the events logged
    after its checkpoint (TensorBoard's ``purge_step``), so the curves have no doubled epoch."""
    from lightning.pytorch.loggers import TensorBoardLogger

    point = _resume_point(resume_from)
    if point is not None:
        kwargs["purge_step"] = point[1]
    return TensorBoardLogger(save_dir=save_dir, name=name, version="", **kwargs)


def build_loggers(logger_cfg: Any, run_dir: Path, *, resume_from: str | None = None) -> list[Any]:
    """Instantiate the ``cfg.logger`` nodes (``{name: node}``) with ``save_dir=<run dir>``; W&B and
    MLflow also get the checkpoint being resumed from (``resume_from``), to continue that run's id."""
    from hydra.utils import instantiate

    loggers = []
    for node in (logger_cfg or {}).values():
        if node is None:
            continue
        extra: dict[str, Any] = {"save_dir": str(run_dir)}
        if str(node.get("_target_", "")).startswith(__name__ + "."):  # this module's factories
            extra["resume_from"] = resume_from
        loggers.append(instantiate(node, **extra))
    return loggers


def log_image(loggers: Iterable[Any], key: str, image: np.ndarray, step: int = 0) -> None:
    """Send ``image`` (uint8 ``(H, W, 3)``) to every logger that stores images: TensorBoard
    (``add_image``), W&B (``log_image``) and MLflow (an artifact ``<key>/step_<step>.png``).
    CSV stores none; callers also write the PNG into the run directory."""
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif kind == "WandbLogger":
            logger.log_image(key=key, images=[image], step=step)
        elif kind == "MLFlowLogger":
            logger.experiment.log_image(logger.run_id, image, f"{key}/step_{step:06d}.png")


def finish_wandb() -> None:
    """Close an open W&B run (a crashed job must not wedge the next job of a multirun)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
