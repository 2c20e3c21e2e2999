"""Per-subject retrieval tables (JSON, CSV, printed) with the oracle ceiling and chance."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.io import atomic_write_json, atomic_write_text
from braindecode_fw.metrics.retrieval import DIRECTIONS, retrieval_accuracy

COLUMNS = (
    "subject", "n_test_images",
    "brain_to_image_top1", "brain_to_image_top1_ci95",
    "image_to_brain_top1", "image_to_brain_top1_ci95",
    "oracle_brain_to_image_top1", "oracle_image_to_brain_top1", "chance_top1",
)


def retrieval_report(
    predictions: dict[str, dict[str, np.ndarray]],
    *,
    oracle: dict[str, Any] | None = None,
    subset_size: int = 300,
    n_subsets: int = 30,
    ci_method: str = "population_sd_norm_ppf",
    seed: int = 42,
    ks: tuple[int, ...] = (1, 5, 10),
    table_topk: tuple[int, ...] = (1,),
    baseline: dict[str, dict[str, np.ndarray]] | None = None,
    baseline_name: str = "linear",
) -> dict[str, Any]:
    """predictions[subject] = {"pred": (n, ...), "target": (n, ...)} for the averaged test items.

    Returns ``{"rows": [per-subject dicts..., mean row], "topk": {subject: {direction: [acc@k]}},
    "protocol": {...}}``. Every row has top-1 (with its 95 % interval) and ``<direction>_top<k>`` for
    the other ``table_topk``; oracle values are looked up per subject in ``oracle["subjects"]`` (top-k where
    the oracle has it; top-k for the whole ``ks`` is in ``topk``). ``baseline`` (same format, e.g. the ridge decoder's predictions) adds
    ``<baseline_name>_<direction>_top<k>`` columns scored identically. ``table_topk``: the k shown by
    :func:`format_table` (MEG papers report top-5).
    """
    ks = tuple(sorted(set(ks) | {1} | set(table_topk)))
    rows, topk = [], {}
    for subject in sorted(predictions):
        p = predictions[subject]
        res = retrieval_accuracy(p["pred"], p["target"], subset_size=subset_size, n_subsets=n_subsets,
                                 seed=seed, ks=ks, ci_method=ci_method)
        o = (oracle or {}).get("subjects", {}).get(subject, {})
        row = {
            "subject": subject,
            "n_test_images": len(p["pred"]),
            **{f"{d}_top1": res.mean(d) for d in DIRECTIONS},
            **{f"{d}_top1_ci95": res.ci95(d) for d in DIRECTIONS},
            **{f"oracle_{d}_top1": o.get(f"{d}_top1", float("nan")) for d in DIRECTIONS},
            "chance_top1": 1.0 / res.subset_size,
        }
        for k in sorted(set(table_topk) - {1}):
            row.update({f"{d}_top{k}": res.mean(d, k) for d in DIRECTIONS})
            row.update({f"oracle_{d}_top{k}": o.get(f"{d}_top{k}", float("nan")) for d in DIRECTIONS})
            row[f"chance_top{k}"] = min(1.0, k / res.subset_size)
        if baseline is not None and subject in baseline:
            b = baseline[subject]
            bres = retrieval_accuracy(b["pred"], b["target"], subset_size=subset_size, n_subsets=n_subsets,
                                      seed=seed, ks=ks)
            for k in sorted(set(table_topk) | {1}):
                row.update({f"{baseline_name}_{d}_top{k}": bres.mean(d, k) for d in DIRECTIONS})
        rows.append(row)
        topk[subject] = {d: {int(k): res.mean(d, k) for k in res.values[d]} for d in DIRECTIONS}
    if rows:
        mean = {"subject": "mean", "n_test_images": int(np.mean([r["n_test_images"] for r in rows]))}
        for c in rows[0]:
            if c in mean or not all(c in r for r in rows):
                continue
            mean[c] = float(np.mean([r[c] for r in rows]))
        rows.append(mean)
    protocol = {"similarity": "cosine", "subset_size": subset_size, "n_subsets": n_subsets, "seed": seed,
                "ci_method": ci_method,
                "topk": list(ks), "table_topk": list(table_topk),
                "brain_to_image": "query = brain prediction, candidates = images (MindEye2 BwdRetrieval)",
                "image_to_brain": "query = image, candidates = brain predictions (MindEye2 FwdRetrieval)"}
    if baseline is not None:
        protocol["baseline"] = f"{baseline_name}: ridge regression per subject from the flattened responses " \
                               "(leave-one-out penalty), same test items and protocol"
    return {"rows": rows, "topk": topk, "protocol": protocol}


def retrieval_protocol_line(report: dict[str, Any]) -> str:
    """The candidate count actually used, e.g. ``300-way, cosine similarity, 30 random subsets``, or
    ``150-way (all 150 test images; evaluation.subset_size is 300), cosine similarity``: a test set
    smaller than the configured subset size is scored as one subset of all its images."""
    p = report["protocol"]
    requested = int(p["subset_size"])
    sizes = sorted({min(requested, int(r["n_test_images"])) for r in report["rows"] if r["subject"] != "mean"})
    if not sizes or sizes == [requested]:
        ways = f"{requested}-way"
    else:
        span = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
        ways = f"{span}-way (all test images where fewer than subset_size={requested})"
    subsets = (f", {p['n_subsets']} random subsets" if any(
        int(r["n_test_images"]) > requested for r in report["rows"] if r["subject"] != "mean") else ", one subset")
    return f"{ways}, {p['similarity']} similarity{subsets}"


def write_report(report: dict[str, Any], out_dir: str | Path, stem: str = "retrieval") -> list[Path]:
    """Writes ``<stem>.json`` and ``<stem>.csv``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    atomic_write_json(json_path, report)
    lines: list[str] = []

    class _Sink:
        def write(self, s: str) -> None:
            lines.append(s)

    extra = [c for c in report["rows"][0] if c not in COLUMNS] if report["rows"] else []
    columns = [*COLUMNS, *extra]
    writer = csv.DictWriter(_Sink(), fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c, "") for c in columns} for r in report["rows"])
    atomic_write_text(csv_path, "".join(lines))
    return [json_path, csv_path]


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table (works in logs and terminals alike): per ``k`` of the protocol's
    ``table_topk``, decoder accuracy both ways, the linear baseline's brain→image (if computed),
    the oracle's and chance."""
    p = report["protocol"]
    head: list[str] = ["subject"]
    cells: list[list[str]] = [[r["subject"]] for r in report["rows"]]
    for k in p.get("table_topk", [1]):
        cols = [(f"brain→image top-{k}", f"brain_to_image_top{k}"), (f"image→brain top-{k}", f"image_to_brain_top{k}")]
        if any("linear_brain_to_image_top1" in r for r in report["rows"]):
            cols.append((f"linear b→i top-{k}", f"linear_brain_to_image_top{k}"))
        cols += [(f"oracle b→i top-{k}" if k > 1 else "oracle b→i", f"oracle_brain_to_image_top{k}"),
                 (f"oracle i→b top-{k}" if k > 1 else "oracle i→b", f"oracle_image_to_brain_top{k}"),
                 (f"chance top-{k}" if k > 1 else "chance", f"chance_top{k}")]
        for title, key in cols:
            head.append(title)
            for cell, r in zip(cells, report["rows"], strict=True):
                value = r.get(key, float("nan"))
                ci = r.get(f"{key}_ci95")
                digits = 4 if key.startswith("chance") else 3
                cell.append(f"{value:.{digits}f}" + (f" ± {ci:.3f}" if ci is not None else ""))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells, strict=True)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    title = f"Retrieval on held-out test images ({retrieval_protocol_line(report)})"
    return "\n".join([title, fmt(head), sep, *[fmt(c) for c in cells]])
