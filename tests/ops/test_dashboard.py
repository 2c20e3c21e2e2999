"""bdf-dashboard: the command for each tool, clear errors, and a real TensorBoard serving a run's
retrieval curve over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from braindecode_fw.ops.dashboard import dashboard_command


def _events(run_dir: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for epoch, value in enumerate([0.1, 0.3, 0.45]):
        writer.add_scalar("val/brain_to_image_top1", value, epoch)
    writer.close()
    return run_dir


def test_commands_and_errors(tmp_path):
    run = _events(tmp_path / "run")
    cmd = dashboard_command("tensorboard", run, port=6123)
    assert cmd[-6:] == ["--logdir", str(run / "tensorboard"), "--port", "6123", "--host", "127.0.0.1"]
    sweep = dashboard_command("tensorboard", tmp_path, port=6006)  # a folder of runs: all of them overlaid
    assert sweep[-6:-4] == ["--logdir", str(tmp_path)]
    with pytest.raises(FileNotFoundError, match="run: .*nowhere does not exist"):
        dashboard_command("tensorboard", tmp_path / "nowhere", port=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files under .*empty"):
        dashboard_command("tensorboard", tmp_path / "empty", port=1)
    with pytest.raises(FileNotFoundError, match="no MLflow store .*mlflow.db"):
        dashboard_command("mlflow", run, port=1)
    with pytest.raises(ValueError, match="tool: one of"):
        dashboard_command("visdom", run, port=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_retrieval_curve(tmp_path):
    run = _events(tmp_path / "run")
    port = _free_port()
    proc = subprocess.Popen(dashboard_command("tensorboard", run, port=port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag=val/brain_to_image_top1"
        deadline, points = time.time() + 60, None
        while time.time() < deadline and points is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    points = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert points is not None, "TensorBoard did not answer"
        assert [p[1] for p in points] == [0, 1, 2]
        assert [round(p[2], 3) for p in points] == [0.1, 0.3, 0.45]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
