"""The evaluation table: means and CIs, the papers' column order, published comparison rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from braindecode_fw.metrics.retrieval import retrieval_accuracy
from braindecode_fw.metrics.suite import PAPER_METRICS
from braindecode_fw.metrics.table import build_table, flat_metrics, markdown_table, write_table


def _per_image():
    rng = np.random.default_rng(0)
    return {s: {m.key: rng.random(20) for m in PAPER_METRICS} for s in ("subj01", "subj02")}


def test_rows_means_and_confidence_intervals():
    per_image = _per_image()
    table = build_table(per_image, list(PAPER_METRICS))
    rows = {r["subject"]: r for r in table["rows"]}
    v = per_image["subj01"]["ssim"]
    assert rows["subj01"]["ssim"] == pytest.approx(v.mean())
    assert rows["subj01"]["ssim_ci95"] == pytest.approx(1.96 * v.std(ddof=1) / np.sqrt(20))
    assert rows["mean"]["ssim"] == pytest.approx((v.mean() + per_image["subj02"]["ssim"].mean()) / 2)
    ci = [rows[s]["ssim_ci95"] for s in ("subj01", "subj02")]
    assert rows["mean"]["ssim_ci95"] == pytest.approx(np.sqrt(ci[0] ** 2 + ci[1] ** 2) / 2)
    assert table["comparison"] == []  # no test set declared: nothing to compare against


def test_markdown_is_in_paper_column_order_with_published_rows():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 8))
    retrieval = {"subj01": retrieval_accuracy(emb + 0.1 * rng.normal(size=emb.shape), emb, subset_size=30,
                                              n_subsets=5, ks=(1, 5))}
    table = build_table(_per_image(), list(PAPER_METRICS), retrieval=retrieval, test_set="nsd_new_1000")
    md = markdown_table(table)
    header = md.splitlines()[0]
    order = ["PixCorr↑", "SSIM↑", "Alex(2)↑", "Alex(5)↑", "Incep↑", "CLIP↑", "EffNet↓", "SwAV↓", "Ret b→i↑", "Ret i→b↑"]
    positions = [header.index(c) for c in order]
    assert positions == sorted(positions)
    assert "| MindEye2, 40 sessions | 0.322 | 0.431 | 96.1% | 98.6% | 95.4% | 93.0% | 0.619 | 0.344 | 98.3% | 98.8% |" in md
    assert "MindBridge" not in md  # the 982-image test set is a different convention
    assert "this run (mean)" in md
    # subj02 has no retrieval: shown as a dash, not 'nan'
    assert "nan |" not in md and "| nan" not in md


def test_write_table_files(tmp_path):
    table = build_table(_per_image(), list(PAPER_METRICS))
    paths = write_table(table, tmp_path)
    assert sorted(p.name for p in paths) == ["metrics.csv", "metrics.json", "metrics.md"]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("subject,n_images,pixcorr,pixcorr_ci95,ssim,ssim_ci95,alexnet2")
    assert len(csv_lines) == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["columns"][0] == "pixcorr"
    flat = flat_metrics(table)
    assert flat["eval/mean/swav"] == pytest.approx(table["rows"][-1]["swav"])
