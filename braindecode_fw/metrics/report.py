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
    seed: int = 42,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, Any]:
    """predictions[subject] = {"pred": (n, ...), "target": (n, ...)} for the averaged test items.

    Returns ``{"rows": [per-subject dicts..., mean row], "topk": {subject: {direction: [acc@k]}},
    "protocol": {...}}``. Oracle values are looked up per subject in ``oracle["subjects"]``.
    """
    rows, topk = [], {}
    for subject in sorted(predictions):
        p = predictions[subject]
        res = retrieval_accuracy(p["pred"], p["target"], subset_size=subset_size, n_subsets=n_subsets,
                                 seed=seed, ks=tuple(sorted(set(ks) | {1})))
        o = (oracle or {}).get("subjects", {}).get(subject, {})
        rows.append({
            "subject": subject,
            "n_test_images": len(p["pred"]),
            **{f"{d}_top1": res.mean(d) for d in DIRECTIONS},
            **{f"{d}_top1_ci95": res.ci95(d) for d in DIRECTIONS},
            **{f"oracle_{d}_top1": o.get(f"{d}_top1", float("nan")) for d in DIRECTIONS},
            "chance_top1": 1.0 / res.subset_size,
        })
        topk[subject] = {d: {int(k): res.mean(d, k) for k in res.values[d]} for d in DIRECTIONS}
    if rows:
        mean = {"subject": "mean", "n_test_images": int(np.mean([r["n_test_images"] for r in rows]))}
        for c in COLUMNS[2:]:
            vals = [r[c] for r in rows]
            mean[c] = float(np.mean(vals))
        rows.append(mean)
    return {"rows": rows, "topk": topk,
            "protocol": {"similarity": "cosine", "subset_size": subset_size, "n_subsets": n_subsets, "seed": seed,
                         "brain_to_image": "query = brain prediction, candidates = images (MindEye2 BwdRetrieval)",
                         "image_to_brain": "query = image, candidates = brain predictions (MindEye2 FwdRetrieval)"}}


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

    writer = csv.DictWriter(_Sink(), fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r[c] for c in COLUMNS} for r in report["rows"])
    atomic_write_text(csv_path, "".join(lines))
    return [json_path, csv_path]


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table (works in logs and terminals alike)."""
    head = ("subject", "brain→image top-1", "image→brain top-1", "oracle b→i", "oracle i→b", "chance")
    body = []
    for r in report["rows"]:
        body.append((
            r["subject"],
            f"{r['brain_to_image_top1']:.3f} ± {r['brain_to_image_top1_ci95']:.3f}",
            f"{r['image_to_brain_top1']:.3f} ± {r['image_to_brain_top1_ci95']:.3f}",
            f"{r['oracle_brain_to_image_top1']:.3f}",
            f"{r['oracle_image_to_brain_top1']:.3f}",
            f"{r['chance_top1']:.4f}",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    p = report["protocol"]
    title = f"Retrieval on held-out test images ({p['subset_size']}-way, {p['similarity']} similarity, " \
            f"{p['n_subsets']} subsets when more images are available)"
    return "\n".join([title, fmt(head), sep, *[fmt(b) for b in body]])
