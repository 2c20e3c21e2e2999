"""bdf-bench on a tiny world: JSON + markdown section written, numbers present (never timed)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_MODEL, TINY_WORLD, run_cli
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
    proc = run_cli("bdf-bench", args, tmp_path)
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
    proc = run_cli("bdf-bench", args, tmp_path)
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
    proc = run_cli("bdf-bench", args, tmp_path)
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


def test_bench_models_section(tmp_path):
    """The method-decoder section on small shapes: one row per case with its parameter count
    (checked against building the same decoder directly), samples/s and memory."""
    mb = ("{model:mindbridge,loss:mindbridge,overrides:['model.hidden=16','model.adapter.pool_size=32',"
          "'model.adapter.bottleneck=4','model.builder.bottleneck=4'],"
          "targets:{clip_image_tokens:[5,8],clip_text_tokens:[3,8]},batch_sizes:null}")
    me2 = ("{model:mindeye2,loss:mindeye2,overrides:['model.hidden=16','model.lowlevel=null','loss.terms.blur=null',"
           "'loss.terms.blur_cont=null',"
           "'model.prior.depth=1','model.prior.heads=2','model.prior.dim_head=8'],targets:{clip_image_tokens:[5,8]},"
           "batch_sizes:[{size:2,steps:3},4]}")
    sttm = ("{model:sttm,loss:sttm,overrides:['model.hidden=16','model.token_head.token_dim=4',"
            "'model.token_head.attention_dim=8','model.token_head.heads=2','model.token_head.mlp_dim=8',"
            "'model.projector.inner=8','model.prior.network.depth=1','model.prior.network.heads=2',"
            "'model.prior.network.ff_dim=8'],targets:{clip_image_tokens:[5,8],clip_text:[8]}}")
    bit = ("{model:brainit,loss:brainit,overrides:['model.universal_encoder=null','model.dim=8','model.heads=2',"
           "'model.depth=1','model.n_clusters=3','model.voxels_per_step=20',"
           "'model.branches.lowlevel.token_sampling.scale_sizes=[4,3,2,1,1]',"
           "'model.branches.lowlevel.token_sampling.per_scale=[2,2,1,1,1]'],"
           "targets:{clip_image_tokens:[5,8],vgg_tokens:[11,8]},batch_sizes:null}")
    npic = ("{model:neuropictor,loss:neuropictor,overrides:['model.diffusion=null','loss.terms.diffusion=null',"
            "'model.map_size=16','model.patch=4','model.dim=16','model.depth=1','model.heads=2','model.text_tokens=5',"
            "'model.control_channels=4','model.control_size=4'],targets:{clip_text_tokens:[5,8]},batch_sizes:null}")
    args = [f"output_dir={tmp_path}/docs", "run_worlds=false", "evaluation.enabled=false", "models.enabled=true",
            "models.steps=2", "models.batch_size=4", "~models.n_features", "+models.n_features={a:40,b:30}",
            f"models.cases.mindeye2_h1024={me2}", f"models.cases.mindbridge={mb}", f"models.cases.sttm={sttm}",
            f"models.cases.brainit={bit}", f"models.cases.neuropictor={npic}", "models.cases.mindeye2_h1024_prior=null"]
    proc = run_cli("bdf-bench", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    all_rows = json.loads((tmp_path / "docs" / "benchmarks_models_cpu.json").read_text())["result"]["rows"]
    # one row per batch size: MindEye2 at 2 (3 steps) and 4 (the default 2 steps)
    assert [(r["batch_size"], r["steps"]) for r in all_rows if r["case"] == "mindeye2_h1024"] == [(2, 3), (4, 2)]
    rows = {r["case"]: r for r in all_rows}
    assert sorted(rows) == ["brainit", "mindbridge", "mindeye2_h1024", "neuropictor", "sttm"]
    import functools

    from braindecode_fw.models.adapters import PooledSubjectEmbedder, SubjectBuilder
    from braindecode_fw.models.decoder import build_bridge_decoder
    from braindecode_fw.models.encoders import PostNormResidualMLP
    from braindecode_fw.models.heads import ProjectionHead

    ref = build_bridge_decoder({"a": 40, "b": 30}, {"clip_image_tokens": (5, 8), "clip_text_tokens": (3, 8)},
                               adapter=functools.partial(PooledSubjectEmbedder, pool_size=32, bottleneck=4),
                               encoder=PostNormResidualMLP, head=ProjectionHead,
                               builder=functools.partial(SubjectBuilder, bottleneck=4), hidden=16)
    assert rows["mindbridge"]["params_m"] == round(sum(p.numel() for p in ref.parameters()) / 1e6, 1)
    assert rows["brainit"]["targets"] == {"clip_image_tokens": [5, 8], "vgg_tokens": [11, 8]}
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["eager_samples_per_s"] > 0 and r["peak_mb"] > 0 and r["batch_size"] == 4
        assert r["speedup"] == pytest.approx(r["samples_per_s"] / r["eager_samples_per_s"], abs=0.02)
        # every method's optimiser is AdamW: the fast path fuses it; from the same start the losses
        # agree to float32 rounding (eager and fast draw the same dropout masks)
        assert r["fast_path"] == {"fused_optimizer": True, "bf16": False, "compile": False}
        assert r["loss_abs_diff"] <= 1e-4 * max(1.0, abs(r["loss_eager"])), r
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert md.count("bdf-bench:models-cpu-begin") == 1 and "| mindbridge | mindbridge |" in md
    assert "fused Adam/AdamW" in md


def test_bench_demo_training_section(tmp_path):
    """The tiny generator's UNet training step per precision: one row each, the parameter count of
    the configured UNet (checked against building it directly), the projection from s/step."""
    args = [f"output_dir={tmp_path}/docs", "run_worlds=false", "evaluation.enabled=false",
            "demo_training.enabled=true", "demo_training.steps=2", "demo_training.n_scenes=16",
            "demo_training.projected_steps=600",
            "demo_training.config={image_size:32,unet_channels:[32,32],unet_batch_size:4}"]
    proc = run_cli("bdf-bench", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "docs" / "benchmarks_demo_training_cpu.json").read_text())["result"]
    assert result["latent"] == [4, 8, 8] and result["channels"] == [32, 32]
    from braindecode_fw.demo.tiny_generator import EMBED_DIM, build_unet

    params = round(sum(p.numel() for p in build_unet(32, (32, 32), EMBED_DIM).parameters()) / 1e6, 2)
    assert [r["precision"] for r in result["rows"]] == ["32-true", "bf16-mixed"]
    for r in result["rows"]:
        assert r["params_m"] == params and r["batch_size"] == 4 and r["seconds_per_step"] > 0
        assert r["projected_minutes"] == pytest.approx(r["seconds_per_step"] * 10, abs=0.051)
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert md.count("bdf-bench:demo-training-cpu-begin") == 1 and "| bf16-mixed |" in md and "600 steps (min)" in md
    bad = run_cli("bdf-bench", [*args[:4], "demo_training.precisions=[32-true,bf16]"], tmp_path)
    assert bad.returncode != 0
    assert "demo_training.precisions: each one of ['32-true', 'bf16-mixed'], got ['bf16']" in bad.stderr


def test_bench_models_refuses_an_empty_batch(tmp_path):
    args = [f"output_dir={tmp_path}/docs", "run_worlds=false", "evaluation.enabled=false", "models.enabled=true",
            "models.cases.mindeye2_h1024.batch_sizes=[0]"]
    proc = run_cli("bdf-bench", args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bdf-bench")]
    assert lines == ["bdf-bench: error: models.cases.mindeye2_h1024.batch_sizes: sizes and steps must be >= 1, got 0"]
    assert not (tmp_path / "docs" / "benchmarks_models_cpu.json").exists()
