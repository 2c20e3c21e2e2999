"""One table per multirun: which job ran which overrides, what it scored, which failed, which won.

:class:`SweepSummary` is a Hydra callback (``hydra.callbacks.sweep_summary``); when a multirun ends
it reads every job folder ``<sweep dir>/<job num>/result.json`` (written by ``bdf-train`` at the end
of a successful run) and writes ``<sweep dir>/sweep_summary.csv`` and ``sweep_summary.md``: one
row per job with its overrides, the optimised metric's value, ``ok`` or ``failed`` (no
``result.json``) and its run directory; the best row is marked. Works with every sweeper (basic
grid, ``bdf_optuna``) and launcher; for SLURM sweeps whose submitting process is gone, run
``python -m braindecode_fw.ops.sweep_summary <sweep dir>``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from braindecode_fw.errors import ConfigError
from braindecode_fw.io import atomic_write_text

log = logging.getLogger(__name__)

CSV_NAME = "sweep_summary.csv"
MD_NAME = "sweep_summary.md"
COLUMNS = ["job", "status", "best", "optimized_metric", "value", "overrides", "run_dir"]


def _job_dirs(sweep_dir: Path) -> list[tuple[int, Path]]:
    jobs = [(int(p.name), p) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(jobs)


def _overrides_from_hydra(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # noqa: BLE001 - a damaged file leaves the column empty
        return []


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def collect_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per numeric job folder of ``sweep_dir``, sorted by job number (``best`` unset)."""
    rows = []
    for num, job_dir in _job_dirs(Path(sweep_dir)):
        result_path = job_dir / "result.json"
        result: dict[str, Any] | None = None
        if result_path.is_file():
            try:
                result = json.loads(result_path.read_text())
            except (OSError, ValueError):
                log.warning("sweep summary: %s cannot be read; counted as failed", result_path)
        if result is None:
            rows.append({"job": num, "status": "failed", "best": False, "optimized_metric": None,
                         "value": None, "overrides": _overrides_from_hydra(job_dir), "run_dir": str(job_dir)})
            continue
        rows.append({
            "job": num, "status": "ok", "best": False,
            "optimized_metric": result.get("optimized_metric"),
            "value": _finite(result.get("value")),
            "overrides": [str(o) for o in result.get("overrides") or _overrides_from_hydra(job_dir)],
            "run_dir": str(result.get("run_dir") or job_dir),
        })
    return rows


def mark_best(rows: list[dict[str, Any]], direction: str = "maximize") -> dict[str, Any] | None:
    """Mark (``best=True``) and return the ok row with the highest (``maximize``) or lowest value."""
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"direction: {direction!r}; use maximize or minimize")
    scored = [r for r in rows if r["status"] == "ok" and r["value"] is not None]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    best = pick(scored, key=lambda r: r["value"])  # ties: the lowest job number
    best["best"] = True
    return best


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "best": "*" if r["best"] else "", "value": "" if r["value"] is None else repr(r["value"]),
                         "optimized_metric": r["optimized_metric"] or "", "overrides": " ".join(r["overrides"])})
    return buf.getvalue()


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_text(rows: list[dict[str, Any]], sweep_dir: Path, direction: str) -> str:
    metric = next((r["optimized_metric"] for r in rows if r["optimized_metric"]), None) or "value"
    # overrides shared by every job are listed once; the table shows what differs
    common = set(rows[0]["overrides"]).intersection(*(r["overrides"] for r in rows[1:])) if rows else set()
    n_ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(rows)} job{'s' if len(rows) != 1 else ''}: {n_ok} ok, {len(rows) - n_ok} failed; best = {direction[:3]} `{metric}` (marked **best**).", ""]
    if common:
        lines += ["Overrides of every job: " + " ".join(f"`{o}`" for o in rows[0]["overrides"] if o in common), ""]
    lines += [f"| job | status | {_md_cell(metric)} | overrides | run dir |", "|---:|---|---:|---|---|"]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4g}"
        status = f"{r['status']} **best**" if r["best"] else r["status"]
        varying = " ".join(f"`{o}`" for o in r["overrides"] if o not in common)
        lines.append(f"| {r['job']} | {status} | {value} | {_md_cell(varying)} | {_md_cell(r['run_dir'])} |")
    return "\n".join(lines) + "\n"


def write_sweep_summary(sweep_dir: str | Path, direction: str = "maximize") -> list[dict[str, Any]]:
    """Write ``sweep_summary.csv`` and ``sweep_summary.md`` into ``sweep_dir`` (atomically); return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir)
    mark_best(rows, direction)
    atomic_write_text(sweep_dir / CSV_NAME, _csv_text(rows))
    atomic_write_text(sweep_dir / MD_NAME, _md_text(rows, sweep_dir, direction))
    return rows


def _direction_of(config: DictConfig) -> str:
    """The sweeper's direction when it has one (``bdf_optuna``), else ``maximize``."""
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    name = getattr(direction, "name", direction)
    return str(name) if name in ("maximize", "minimize") else "maximize"


class SweepSummary(Callback):
    """Hydra callback: write the sweep summary when a multirun ends.

    ``direction``: ``maximize`` / ``minimize`` for the best row; ``null`` (default) takes
    ``hydra.sweeper.direction`` when the sweeper has one, else ``maximize`` (the default
    ``optimized_metric`` is a top-1 accuracy).
    """

    def __init__(self, direction: str | None = None) -> None:
        self.direction = direction

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        try:
            rows = write_sweep_summary(sweep_dir, self.direction or _direction_of(config))
        except Exception:  # noqa: BLE001 - a summary problem must not turn a finished sweep into a failure
            log.exception("sweep summary: could not write %s", sweep_dir / CSV_NAME)
            return
        best = next((r for r in rows if r["best"]), None)
        n_failed = sum(r["status"] == "failed" for r in rows)
        log.info("sweep summary: %d jobs (%d failed) -> %s", len(rows), n_failed, sweep_dir / MD_NAME)
        if best is not None:
            log.info("sweep summary: best job %d, %s = %.4g: %s", best["job"], best["optimized_metric"],
                     best["value"], " ".join(best["overrides"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m braindecode_fw.ops.sweep_summary",
                                     description="Write sweep_summary.{csv,md} for a multirun folder.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--direction", choices=["maximize", "minimize"], default="maximize")
    args = parser.parse_args(argv)
    rows = write_sweep_summary(args.sweep_dir, args.direction)
    print((args.sweep_dir / MD_NAME).read_text() if rows else f"no job folders in {args.sweep_dir}")


if __name__ == "__main__":
    main()
