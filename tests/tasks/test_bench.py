"""bdf-bench on a tiny world: JSON + markdown section written, numbers present (never timed)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_MODEL, TINY_WORLD
from tests.tasks.test_cli import _run
from tests.tasks.test_evaluate import FAST_METRICS


@pytest.mark.slow
def test_bench_writes_results(tmp_path):
    overrides = [o for o in TINY_WORLD + TINY_MODEL if not o.startswith(("trainer.", "data.batch_size"))]
    args = [
        f"output_dir={tmp_path}/docs",
        "worlds.synthetic_nsd_scale=null",
        "worlds.synthetic.batch_size=16",
        "worlds.synthetic.loader_batches=3",
        "worlds.synthetic.train_steps=2",
        "worlds.synthetic.warmup_steps=1",
        "worlds.synthetic.overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]",
        "evaluation.n_images=4",
        "evaluation.image_size=64",
        "evaluation.identification_dim=1000",
        "evaluation.retrieval_dim=2000",
        "evaluation.metrics=synthetic",
        "evaluation.overrides=[" + ",".join(f"'{o}'" for o in FAST_METRICS if o.startswith("metrics.")) + "]",
    ]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("# Benchmarks\n\nhand-written notes stay\n")
    proc = _run("bdf-bench", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "docs" / "benchmarks_cpu.json").read_text())
    (r,) = result["results"]
    assert r["voxels"] == {"subj01": 60, "subj02": 90}
    for key in ("loader_samples_per_s", "train_samples_per_s", "train_step_samples_per_s", "eval_s", "peak_rss_mb"):
        assert r[key] > 0, key
    assert result["machine"]["cores"] >= 1
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "hand-written notes stay" in md and md.count("bdf-bench:cpu-begin") == 1
    assert "| synthetic | 2 | 60-90 |" in md
    ev = json.loads((tmp_path / "docs" / "benchmarks_evaluation_cpu.json").read_text())["result"]
    assert ev["n_images"] == 4 and ev["metrics"] == ["pixcorr", "ssim", "alexnet2", "alexnet5", "clip"]
    for key in ("pixcorr", "ssim", "features_alexnet", "two_way_identification_only", "retrieval_30x300"):
        assert ev["timings_s"][key] >= 0, key
    assert "two-way identification, 4 × 1,000-d" in md and md.count("bdf-bench:evaluation-cpu-begin") == 1
    # a second run replaces the section instead of appending
    proc = _run("bdf-bench", args, tmp_path)
    assert proc.returncode == 0
    assert (tmp_path / "docs" / "benchmarks.md").read_text().count("bdf-bench:cpu-begin") == 1
