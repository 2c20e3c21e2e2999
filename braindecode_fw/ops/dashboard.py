"""``bdf-dashboard``: open TensorBoard or the MLflow UI on a run, a sweep or the whole log folder.

TensorBoard reads every event file below the folder it is given, so pointing it at a sweep (or at
``logs/train``) overlays all its runs. The MLflow UI reads one tracking store: the SQLite file a run
writes by default (``<run dir>/mlflow.db``), or the server/database configured in
``logger.mlflow.tracking_uri``.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from braindecode_fw.errors import ConfigError, MissingFileError

TOOLS = ("tensorboard", "mlflow")


def dashboard_command(tool: str, target: Path, *, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line that serves ``target`` (a run, sweep or log folder) with ``tool``."""
    if tool not in TOOLS:
        raise ConfigError(f"tool: one of {TOOLS}, got {tool!r}")
    if not target.exists():
        raise MissingFileError(f"run: {target} does not exist (give a run directory, a sweep directory or the "
                                f"log folder, e.g. logs/train/runs/<run>)")
    if tool == "tensorboard":
        logdir = target / "tensorboard" if (target / "tensorboard").is_dir() else target
        if not any(logdir.rglob("events.out.tfevents.*")):
            raise MissingFileError(f"run: no TensorBoard event files under {logdir} (was the run trained with "
                                    f"logger=tensorboard, the default, or logger=many?)")
        exe = shutil.which("tensorboard")
        return [*([exe] if exe else [sys.executable, "-m", "tensorboard.main"]), "--logdir", str(logdir), "--port", str(port), "--host", host]
    db = target / "mlflow.db"
    if not db.is_file():
        raise MissingFileError(f"run: no MLflow store {db} (train with logger=mlflow or logger=many; runs logged "
                                f"to a server are viewed in that server's UI)")
    if importlib.util.find_spec("flask") is None:
        raise MissingFileError("tool=mlflow: the MLflow UI server is not installed (the project depends on "
                                "mlflow-skinny for logging); pip install mlflow")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db.resolve()}",
            "--port", str(port), "--host", host]


def dashboard(tool: str, target: str | Path, *, port: int | None = None, host: str = "127.0.0.1",
              print_only: bool = False) -> list[str]:
    """Serve ``target`` until interrupted (or only print the command); returns the command."""
    port = port or (6006 if tool == "tensorboard" else 5000)
    cmd = dashboard_command(tool, Path(target), port=port, host=host)
    print(" ".join(cmd))
    if not print_only:
        print(f"open http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
        try:
            subprocess.run(cmd, check=False)
        except KeyboardInterrupt:
            pass
    return cmd
