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


def test_bench_generation_tiny(tmp_path):
    """The generator section: one row per configured generator with its inputs at the requested
    token lengths, parameter counts of the loaded components, and a markdown section."""
    steps = "overrides=['generator.steps=2']"
    args = [
        f"output_dir={tmp_path}/docs", f"paths.cache_dir={tmp_path}/cache", "run_worlds=false",
        "evaluation.enabled=false", "generation.enabled=true", "generation.batch_size=2",
        "generation.timed_batches=1", "generation.tiny={image_size:32,cross_attention_dim:16,embed_dim:8}",
        "generation.token_lengths.clip_text_tokens=5", "generation.token_lengths.clip_image_tokens=9",
        "generation.generators.sd21_unclip=null", "generation.generators.sd_img2img=null",
        f"generation.generators.versatile_dual.{steps}",
        "generation.generators.controlnet_modulated.overrides=['generator.steps=2','generator.controlnet=from_unet']",
    ]
    proc = _run("bdf-bench", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "docs" / "benchmarks_generation_tiny_cpu.json").read_text())["result"]
    rows = {r["generator"]: r for r in result["rows"]}
    assert sorted(rows) == ["controlnet_modulated", "versatile_dual"]
    assert rows["versatile_dual"]["inputs"] == {"clip_image_tokens": [9, 16], "clip_text_tokens": [5, 16]}
    assert rows["controlnet_modulated"]["inputs"] == {"clip_text_tokens": [5, 16], "control_map": [32, 8, 8]}
    for r in rows.values():
        assert r["s_per_image"] > 0 and r["params_m"] > 0 and r["steps"] == 2 and r["image_size"] == 32
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert md.count("bdf-bench:generation-tiny-cpu-begin") == 1 and "| versatile_dual |" in md
