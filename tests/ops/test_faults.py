"""Crash safety of every writer: a process killed with SIGKILL at a writer's dangerous moment
(braindecode_fw/ops/faults.py, ``BDF_FAULT_KILL``) leaves the previous state intact and readable,
and the next normal run succeeds and leaves no temporary of any kind.

Each writer runs in a real subprocess (``python -c`` calling it directly; bdf-bench through its
console script) so that the kill is real: no ``finally`` or ``except`` runs. bdf-train killed inside
a checkpoint save and resumed bitwise: tests/ops/test_resume.py::test_sigkill_then_resume_equals_uninterrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from braindecode_fw.data.reconstructions import ReconstructionWriter, open_reconstructions
from braindecode_fw.data.store import open_store
from braindecode_fw.io import (
    atomic_write_dir,
    atomic_write_json,
    remove_dead_temporaries,
    restore_moved_aside,
)
from braindecode_fw.ops.faults import ENV, fault_point, parse_spec
from tests.conftest import run_cli, tiny_world_config
from tests.tasks.test_cli import _run

REPO = Path(__file__).resolve().parents[2]
KILLED = -9  # subprocess returncode of a process ended by SIGKILL
TEMPORARIES = ("*.tmp-*", "*.partial-*", "*.old-*", "*.replaced-*")


def _python(code: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this tree first on the path), killed at ``kill``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop(ENV, None)
    if kill is not None:
        env[ENV] = kill
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


def _killed(code: str, kill: str) -> None:
    proc = _python(code, kill)
    assert proc.returncode == KILLED, f"{kill}: rc {proc.returncode}\n{proc.stderr[-3000:]}"


def _ok(code: str) -> subprocess.CompletedProcess:
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for pattern in TEMPORARIES for p in folder.rglob(pattern))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the hook and the clean-up ------------------------------------------------------------------


def test_parse_spec():
    assert parse_spec("checkpoint.written") == ("checkpoint.written", None, 1)
    assert parse_spec("checkpoint.written:last.ckpt@3") == ("checkpoint.written", "last.ckpt", 3)
    assert parse_spec("file.written:a@b") == ("file.written", "a@b", 1)  # not a count: part of the path
    with pytest.raises(ValueError, match="BDF_FAULT_KILL='@2'"):
        parse_spec("@2")


def test_fault_point_does_nothing_unless_named(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    fault_point("file.written", "x")
    monkeypatch.setenv(ENV, "file.written:other@1")
    fault_point("file.written", "x")  # another path
    fault_point("dir.swap", "other")  # another point
    # the n-th hit only, counted per process: the 2nd hit of @3 passes
    proc = _python("""
        from braindecode_fw.ops.faults import fault_point
        fault_point('p', 'a'); fault_point('p', 'b'); print('two passed', flush=True); fault_point('p', 'c')
        print('not reached')
    """, kill="p@3")
    assert proc.returncode == KILLED and proc.stdout == "two passed\n"


def test_remove_dead_temporaries(tmp_path):
    dead, live = _dead_pid(), os.getppid()  # the parent (pytest's shell or runner) is alive
    (tmp_path / "a.json").write_text("new")
    for name in (f"a.json.tmp-{dead}", f"a.json.tmp-{live}", f"b.npy.tmp-{dead}", f"c.partial-{dead}.npy",
                 "unrelated.tmp-x"):
        (tmp_path / name).write_text("x")
    for name in (f".folder.old-{dead}", f".folder.partial-{dead}", f"store.replaced-{dead}", f"store.partial-{live}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "content").write_text(name)
    seen = []
    removed = remove_dead_temporaries(tmp_path, "a.json", on_live=lambda p, pid: seen.append((p.name, pid)))
    assert [p.name for p in removed] == [f"a.json.tmp-{dead}"]
    assert seen == [(f"a.json.tmp-{live}", live)]
    # any name: the previous folder / store moved aside by a killed writer comes back, the rest goes
    remove_dead_temporaries(tmp_path)
    assert (tmp_path / "folder" / "content").read_text() == f".folder.old-{dead}"
    assert (tmp_path / "store" / "content").read_text() == f"store.replaced-{dead}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.json", f"a.json.tmp-{live}", "folder", "store", f"store.partial-{live}", "unrelated.tmp-x"])
    # an old copy is not restored over an existing folder: it is stale and removed
    (tmp_path / f".folder.old-{dead}").mkdir()
    remove_dead_temporaries(tmp_path, "folder")
    assert (tmp_path / "folder" / "content").exists() and not (tmp_path / f".folder.old-{dead}").exists()


# --- io.py: atomic_write_bytes/json, atomic_write_dir ----------------------------------------------


def test_killed_file_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"v": 1})
    code = f"from braindecode_fw.io import atomic_write_json; atomic_write_json({str(path)!r}, {{'v': 2}})"
    _killed(code, "file.written:result.json")
    assert json.loads(path.read_text()) == {"v": 1}
    assert len(_temporaries(tmp_path)) == 1  # the complete temporary it did not rename
    _ok(code)  # the next run, in a process of its own
    assert json.loads(path.read_text()) == {"v": 2} and _temporaries(tmp_path) == []


@pytest.mark.parametrize("point", ["dir.written", "dir.swap"])
def test_killed_folder_write_keeps_the_previous_folder(tmp_path, point):
    folder = tmp_path / "export"
    atomic_write_dir(folder, lambda d: (d / "weights.txt").write_text("old"))
    code = f"""
        from braindecode_fw.io import atomic_write_dir
        atomic_write_dir({str(folder)!r}, lambda d: (d / 'weights.txt').write_text('new'))
    """
    _killed(code, point)
    if point == "dir.swap":  # killed between moving the old one aside and renaming the new one in
        assert not folder.exists()
        assert restore_moved_aside(tmp_path, "export") == [folder]  # what the next write does first
    assert (folder / "weights.txt").read_text() == "old"
    assert [p.name for p in tmp_path.glob(".export.partial-*")]  # the new one, left by the killed writer
    _killed(code, point)
    atomic_write_dir(folder, lambda d: (d / "weights.txt").write_text("new"))  # restores, cleans, replaces
    assert (folder / "weights.txt").read_text() == "new" and _temporaries(tmp_path) == []


# --- the prepared store (StoreWriter, synthetic world) ---------------------------------------------


def test_killed_store_write_keeps_the_previous_store(store_copy):
    """Killed mid-subject, mid-world, before and during the swap: the old store opens with its old
    version each time (open_store puts a store moved aside back); the next run replaces it."""
    old_version = open_store(store_copy).version
    cfg = tiny_world_config()
    code = f"""
        import dataclasses
        from tests.conftest import run_cli, tiny_world_config
        from braindecode_fw.data.synthetic.world import generate_world
        generate_world(dataclasses.replace(tiny_world_config(), seed={cfg.seed + 1}), {str(store_copy)!r})
    """
    for point in ("store.subject:subj02", "world.subject", "store.finalize", "store.swap"):
        _killed(code, point)
        assert open_store(store_copy).version == old_version, point
    # each run first removes what the killed ones before it left: only the last one's partial store
    assert len(_temporaries(store_copy.parent)) == 1
    from braindecode_fw.data.synthetic.world import generate_world

    generate_world(dataclasses.replace(cfg, seed=cfg.seed + 1), store_copy)  # the next run
    new = open_store(store_copy)
    assert new.version != old_version and new.meta["subjects"] == ["subj01", "subj02"]
    assert _temporaries(store_copy.parent) == []


# --- the target cache ---------------------------------------------------------------------------


def test_killed_target_encoding_leaves_no_entry_and_keeps_the_others(tiny_store, tmp_path):
    from braindecode_fw.targets.cache import load_or_compute_targets, target_cache_path
    from braindecode_fw.targets.encoders import OpenClipImageEncoder
    from tests.targets.test_encoders import PRE, TINY

    store = open_store(tiny_store)
    cache = tmp_path / "cache"
    enc0 = OpenClipImageEncoder("ViT-B-32", None, output="pooled", seed=0, model_overrides=TINY, preprocess=PRE)
    kept = np.array(load_or_compute_targets(store, enc0, cache, chunk=50))
    code = f"""
        from braindecode_fw.data.store import open_store
        from braindecode_fw.targets.cache import load_or_compute_targets
        from braindecode_fw.targets.encoders import OpenClipImageEncoder
        from tests.targets.test_encoders import PRE, TINY
        enc = OpenClipImageEncoder("ViT-B-32", None, output="pooled", seed=1, model_overrides=TINY, preprocess=PRE)
        load_or_compute_targets(open_store({str(tiny_store)!r}), enc, {str(cache)!r}, chunk=50)
    """
    enc1 = OpenClipImageEncoder("ViT-B-32", None, output="pooled", seed=1, model_overrides=TINY, preprocess=PRE)
    new_entry = target_cache_path(cache, store, enc1)
    for point in ("targets.chunk@2", "targets.written"):
        _killed(code, point)
        assert not new_entry.exists(), point  # no entry: the next run encodes it
        np.testing.assert_array_equal(np.load(target_cache_path(cache, store, enc0)), kept)
    assert len(_temporaries(cache)) == 1  # the last killed run's; each run removes the earlier ones
    fresh = np.array(load_or_compute_targets(store, enc1, cache, chunk=50))  # the next run
    np.testing.assert_array_equal(np.load(new_entry), fresh)
    assert fresh.shape == kept.shape and new_entry.with_suffix(".json").is_file()
    assert _temporaries(cache) == []
    np.testing.assert_array_equal(load_or_compute_targets(store, enc0, cache), kept)


# --- checkpoints ---------------------------------------------------------------------------------


def test_killed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    from braindecode_fw.ops.resume import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    code = f"""
        import torch
        from braindecode_fw.ops.resume import AtomicCheckpointIO
        AtomicCheckpointIO().save_checkpoint({{"epoch": 2, "w": torch.zeros(3)}}, {str(path)!r})
    """
    _killed(code, "checkpoint.written:last.ckpt")
    previous = torch.load(path, weights_only=True)
    assert previous["epoch"] == 1 and torch.equal(previous["w"], torch.ones(3))
    assert len(_temporaries(tmp_path)) == 1
    AtomicCheckpointIO().save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)  # the next save
    assert torch.load(path, weights_only=True)["epoch"] == 2 and _temporaries(tmp_path) == []


# --- the reconstruction folder -------------------------------------------------------------------

def add_four_reconstructions(root: str | Path) -> None:
    """What bdf-reconstruct does for a batch: embeddings, the images (final + low-level), the manifest."""
    w = ReconstructionWriter(root, store="s", dataset_version="v1", test_set="test", generator={})
    w.add_embeddings("subj01", torch.full((4, 8), 2.0), torch.ones(4, 8))
    for i in range(4):
        if not w.has("subj01", i):
            w.add("subj01", i, f"img{i}", np.full((8, 8, 3), 10 * i, np.uint8), lowlevel=np.zeros((8, 8, 3), np.uint8))
    w.flush()


def test_killed_reconstruction_keeps_a_manifest_of_complete_files(tmp_path):
    root = tmp_path / "recon"
    w = ReconstructionWriter(root, store="s", dataset_version="v1", test_set="test", generator={})
    w.add_embeddings("subj01", torch.zeros(2, 8), torch.ones(2, 8))
    for i in range(2):
        w.add("subj01", i, f"img{i}", np.full((8, 8, 3), 10 * i, np.uint8), lowlevel=np.zeros((8, 8, 3), np.uint8))
    w.flush()
    code = f"from tests.ops.test_faults import add_four_reconstructions; add_four_reconstructions({str(root)!r})"
    # a half-written image, a complete image not yet listed, new embeddings, a half-written manifest
    for point in ("file.written:final/img2", "recon.image@1", "recon.embeddings", "file.written:manifest.json"):
        _killed(code, point)
        previous = open_reconstructions(root)  # every listed file exists and is complete
        assert [(i.image_index, i.path) for i in previous.items] == [(0, "subj01/final/img0_s0.png"),
                                                                     (1, "subj01/final/img1_s0.png")], point
        emb = previous.embeddings("subj01")
        assert emb["pred"].shape[1] == 8 and torch.equal(emb["target"], torch.ones(len(emb["target"]), 8))
    assert _temporaries(root)  # the half-written manifest
    add_four_reconstructions(root)  # the next run
    done = open_reconstructions(root)
    assert [i.image_index for i in done.items] == [0, 1, 2, 3]
    assert torch.equal(done.embeddings("subj01")["pred"], torch.full((4, 8), 2.0))
    from PIL import Image

    assert np.asarray(Image.open(root / "subj01" / "final" / "img3_s0.png")).max() == 30
    assert _temporaries(root) == []


# --- the tiny generator cache --------------------------------------------------------------------


def test_killed_tiny_pipeline_build_publishes_nothing(tmp_path):
    folder = tmp_path / "cache" / "tiny-embeds"
    code = f"""
        from braindecode_fw.generation.tiny import build_tiny_pipeline
        build_tiny_pipeline("embeds", {str(folder)!r}, image_size=32, cross_attention_dim=32)
    """
    _killed(code, "tiny.written")
    assert not folder.exists() and len(_temporaries(folder.parent)) == 1
    from braindecode_fw.generation.tiny import build_tiny_pipeline

    build_tiny_pipeline("embeds", folder, image_size=32, cross_attention_dim=32)  # the next run
    assert (folder / "model_index.json").is_file() and _temporaries(folder.parent) == []


# --- bdf-bench --------------------------------------------------------------------------------

BENCH = ["run_worlds=false", "evaluation.n_images=4", "evaluation.image_size=64", "evaluation.identification_dim=1000",
         "evaluation.retrieval_dim=2000", "evaluation.metrics=synthetic",
         "evaluation.overrides=['metrics.feature_metrics.inception=null','metrics.feature_metrics.effnet=null',"
         "'metrics.feature_metrics.swav=null']"]


@pytest.mark.slow
def test_killed_bench_keeps_the_previous_json(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    old = {"machine": {}, "result": {"n_images": 1}}
    (docs / "benchmarks_evaluation_cpu.json").write_text(json.dumps(old))
    args = [f"output_dir={docs}", "device=cpu", *BENCH]
    killed = _run("bdf-bench", args, tmp_path, env={ENV: "file.written:benchmarks_evaluation_cpu.json"})
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert json.loads((docs / "benchmarks_evaluation_cpu.json").read_text()) == old
    assert len(_temporaries(docs)) == 1
    again = run_cli("bdf-bench", args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((docs / "benchmarks_evaluation_cpu.json").read_text())["result"]["n_images"] == 4
    assert _temporaries(docs) == []

