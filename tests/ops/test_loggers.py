"""Every logger writes offline inside the run directory, including the image grids (continuing the
same runs after a kill: tests/ops/test_resume.py)."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, TINY_WORLD
from tests.tasks.test_cli import _run

ARGS = [*TINY_WORLD, *TINY_MODEL, "logger=many", "callbacks.image_grid.every_n_epochs=2"]
OFFLINE = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_SILENT": "true"}


def _scalars(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return sorted(e.step for e in acc.Scalars(tag))


def _tb_images(run_dir: Path, tag: str) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return len(acc.Images(tag))


def _csv_epochs(run_dir: Path, column: str) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f) if r.get(column)]


@pytest.mark.slow
def test_all_loggers_offline_with_images(tmp_path):
    proc = _run("bdf-train", [*ARGS, "trainer.max_epochs=4"], tmp_path, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = Path(proc.stdout.split("run directory :")[1].split()[0])

    # PNG grids in the run directory: ground truth | reconstruction | 3 retrieved, 4 fixed rows
    from PIL import Image

    pngs = sorted(p.name for p in (run_dir / "images").glob("*.png"))
    assert pngs == ["val_grid_epoch001.png", "val_grid_epoch003.png"]
    assert Image.open(run_dir / "images" / pngs[0]).size == (5 * 98 + 2, 14 + 4 * 98 + 2)

    # CSV: namespaced metrics, one validation row per epoch, parameter counts with the hyper-parameters
    assert _csv_epochs(run_dir, "val/brain_to_image_top1") == [0, 1, 2, 3]
    assert _csv_epochs(run_dir, "train/negatives")
    hparams = (run_dir / "csv" / "hparams.yaml").read_text()
    assert "params/total" in hparams and "model/hidden" in hparams

    # TensorBoard: the retrieval curve and the image grids
    assert len(_scalars(run_dir, "val/brain_to_image_top1")) == 4
    assert _tb_images(run_dir, "val/image_grid") == 2

    # W&B offline files under the run directory, with the grids as media
    wandb_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(offline) == 1 and (offline[0] / f"run-{wandb_id}.wandb").is_file()
    assert len(list(offline[0].glob("files/media/images/val/image_grid_*.png"))) == 2

    # MLflow: SQLite rows and the grids as artifacts
    db = sqlite3.connect(run_dir / "mlflow.db")
    mlflow_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    steps = db.execute("select step from metrics where key='val/brain_to_image_top1' and run_uuid=?",
                       (mlflow_id,)).fetchall()
    assert len(steps) == 4
    params = dict(db.execute("select key, value from params where run_uuid=?", (mlflow_id,)).fetchall())
    assert int(params["params/total"]) > 0
    test_top1 = db.execute("select value from metrics where key='test/brain_to_image_top1'").fetchall()
    result = json.loads((run_dir / "result.json").read_text())
    assert test_top1 == [(pytest.approx(result["value"]),)]
    assert len(list((run_dir / "mlflow_artifacts").glob("*/artifacts/val/image_grid/step_*.png"))) == 2
    db.close()


def test_wandb_offline_setting_is_checked(tmp_path):
    from braindecode_fw.ops.loggers import wandb_logger

    with pytest.raises(ValueError, match="logger.wandb.offline: true, false or 'auto', got 'sometimes'"):
        wandb_logger(str(tmp_path), offline="sometimes")
    assert not (tmp_path / "wandb_run_id.txt").exists()  # nothing written for a rejected setting
