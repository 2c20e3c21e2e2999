"""The evaluation table: per-subject and mean values with 95% CIs, in the papers' column order,
written as JSON, CSV and markdown, plus a comparison with published rows on the same test set."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.io import atomic_write_json, atomic_write_text
from braindecode_fw.metrics.published import TEST_SETS, published_rows
from braindecode_fw.metrics.retrieval import DIRECTIONS, RetrievalResult
from braindecode_fw.metrics.suite import PAPER_METRICS, MetricInfo, mean_ci95

RETRIEVAL_INFO = {
    "brain_to_image_top1": MetricInfo("brain_to_image_top1", "Ret b→i", True),
    "image_to_brain_top1": MetricInfo("image_to_brain_top1", "Ret i→b", True),
}
PERCENT = {"alexnet2", "alexnet5", "inception", "clip", *RETRIEVAL_INFO}


def build_table(
    per_image: dict[str, dict[str, np.ndarray]],
    infos: list[MetricInfo],
    *,
    retrieval: dict[str, RetrievalResult] | None = None,
    test_set: str | None = None,
    protocol: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """per_image[subject][metric] = (n,) values -> ``{"columns", "rows", "topk", "comparison", ...}``.

    Each subject row holds ``<metric>`` (mean over images) and ``<metric>_ci95`` (1.96·sd/√n);
    retrieval columns hold the mean and CI over the 30 subsets. The ``mean`` row averages the
    subject means (as the papers do) with CI ``sqrt(Σ ci_s²)/S`` (independent subjects).
    """
    retrieval = retrieval or {}
    subjects = sorted(set(per_image) | set(retrieval))
    columns = [i.key for i in infos] + ([k for k in RETRIEVAL_INFO] if retrieval else [])
    rows = []
    for s in subjects:
        row: dict[str, Any] = {"subject": s, "n_images": 0}
        for info in infos:
            vals = per_image.get(s, {}).get(info.key)
            row["n_images"] = max(row["n_images"], len(vals) if vals is not None else 0)
            row[info.key], row[f"{info.key}_ci95"] = mean_ci95(vals) if vals is not None else (math.nan, math.nan)
        if retrieval:
            res = retrieval.get(s)
            for d in DIRECTIONS:
                key = f"{d}_top1"
                row[key] = res.mean(d, 1) if res else math.nan
                row[f"{key}_ci95"] = res.ci95(d, 1) if res else math.nan
            if res:
                row["n_images"] = max(row["n_images"], res.n_items)
        rows.append(row)
    if len(rows) > 1:
        mean: dict[str, Any] = {"subject": "mean", "n_images": int(np.mean([r["n_images"] for r in rows]))}
        for c in columns:
            vals = np.array([r[c] for r in rows], dtype=np.float64)
            cis = np.array([r[f"{c}_ci95"] for r in rows], dtype=np.float64)
            mean[c] = float(np.mean(vals))
            mean[f"{c}_ci95"] = float(np.sqrt(np.sum(cis**2)) / len(cis))
        rows.append(mean)
    topk = {s: {d: {int(k): r.mean(d, k) for k in r.values[d]} for d in DIRECTIONS} for s, r in retrieval.items()}
    random_metrics = (protocol or {}).get("random_weight_metrics") or []
    # numbers from random-weight networks are never put next to published ones
    comparison = [] if random_metrics else [{"method": p.method, "source": p.source, **p.values}
                                            for p in published_rows(test_set)]
    return {"columns": columns, "labels": {c: _info(c, infos).label for c in columns},
            "higher_is_better": {c: _info(c, infos).higher_is_better for c in columns},
            "rows": rows, "topk": topk, "test_set": test_set,
            "test_set_description": TEST_SETS.get(test_set or "", test_set), "comparison": comparison,
            "protocol": protocol or {}}


def _info(key: str, infos: list[MetricInfo]) -> MetricInfo:
    for i in [*infos, *RETRIEVAL_INFO.values(), *PAPER_METRICS]:
        if i.key == key:
            return i
    return MetricInfo(key, key, True)


def _fmt(key: str, value: float, ci: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key in PERCENT:
        return f"{100 * value:.1f}%" + (f" ± {100 * ci:.1f}" if ci is not None and not math.isnan(ci) else "")
    return f"{value:.3f}" + (f" ± {ci:.3f}" if ci is not None and not math.isnan(ci) else "")


def _arrow(table: dict[str, Any], c: str) -> str:
    return "↑" if table["higher_is_better"][c] else "↓"


def markdown_table(table: dict[str, Any]) -> str:
    """Per-subject table (mean ± 95% CI), then the published rows on the same test set if any."""
    cols = table["columns"]
    head = ["Subject", "n"] + [f"{table['labels'][c]}{_arrow(table, c)}" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [f"**{r['subject']}**" if r["subject"] == "mean" else r["subject"], str(r["n_images"])]
        cells += [_fmt(c, r[c], r[f"{c}_ci95"]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    random_metrics = table["protocol"].get("random_weight_metrics") or []
    if random_metrics:
        lines += ["", "Columns from random-weight networks (plumbing checks, not comparable with publications): "
                  + ", ".join(table["labels"].get(k, k) for k in random_metrics) + "."]
    if table["comparison"]:
        ours = table["rows"][-1]
        lines += ["", f"Published results on the same test set ({table['test_set_description']}); "
                      "docs/evaluation.md lists their provenance:", "",
                  "| Method | " + " | ".join(head[2:]) + " |", "|---|" + "---|" * len(cols)]
        for p in table["comparison"]:
            lines.append(f"| {p['method']} | " + " | ".join(_fmt(c, _published(p, c)) for c in cols) + " |")
        lines.append("| **this run (mean)** | " + " | ".join(_fmt(c, ours[c]) for c in cols) + " |")
    return "\n".join(lines)


def _published(row: dict[str, Any], column: str) -> float:
    key = {"brain_to_image_top1": "brain_retrieval", "image_to_brain_top1": "image_retrieval"}.get(column, column)
    v = row.get(key)
    return math.nan if v is None else v


def write_table(table: dict[str, Any], out_dir: str | Path, stem: str = "metrics") -> list[Path]:
    """``<stem>.json``, ``<stem>.csv`` and ``<stem>.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["subject", "n_images"] + [f for c in table["columns"] for f in (c, f"{c}_ci95")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table["rows"])
    return [atomic_write_json(out / f"{stem}.json", table), atomic_write_text(out / f"{stem}.csv", buf.getvalue()),
            atomic_write_text(out / f"{stem}.md", markdown_table(table) + "\n")]


def flat_metrics(table: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{eval/<subject>/<metric>: value}`` for loggers."""
    out = {}
    for r in table["rows"]:
        for c in table["columns"]:
            v = r[c]
            if not (isinstance(v, float) and math.isnan(v)):
                out[f"{prefix}/{r['subject']}/{c}"] = float(v)
    return out
