"""bdf-evaluate on reconstruction folders and folder pairs: values, files, plots, loggers, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from braindecode_fw.data.reconstructions import ReconstructionWriter
from braindecode_fw.data.store import open_store
from braindecode_fw.metrics.images import as_float_images
from braindecode_fw.metrics.pixel import pixcorr
from tests.conftest import compose_config, run_cli
from tests.tasks.test_cli import _assert_one_line_error

# the synthetic metric suite, reduced to its fast members for tests (AlexNet + the world's CLIP)
FAST_METRICS = [
    "metrics=synthetic",
    "metrics.feature_metrics.inception=null",
    "metrics.feature_metrics.effnet=null",
    "metrics.feature_metrics.swav=null",
    # the CLIP column: the shipped tiny CLIP itself (small enough for tests)
    "retrieval.subset_size=20",
    "retrieval.n_subsets=5",
    "logger=csv",
]


def _noisy(images: np.ndarray, sd: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float64) + rng.normal(0, sd, images.shape), 0, 255).astype(np.uint8)


def _evaluate(overrides, out_dir):
    from braindecode_fw.tasks.evaluate import evaluate

    cfg = compose_config("evaluate", [*FAST_METRICS, *overrides, f"paths.output_dir={out_dir}"])
    return evaluate(cfg)


@pytest.fixture
def recon_run(tiny_store, tmp_path):
    """A reconstruction folder as bdf-reconstruct writes it: 2 subjects, noisy test images, and
    retrieval embeddings."""
    store = open_store(tiny_store)
    run = tmp_path / "recon"
    w = ReconstructionWriter(run, store=tiny_store, dataset_version=store.version, test_set=None,
                             generator={"name": "noise"})
    test_idx = np.unique(store.subjects["subj01"].trials.image_index[store.subjects["subj01"].trials.split == "test"])
    ids = store.image_metadata["ids"]
    for k, (subject, sd) in enumerate((("subj01", 20.0), ("subj02", 90.0))):
        for j, i in enumerate(test_idx):
            w.add(subject, int(i), str(ids[i]), _noisy(store.images[i], sd, 100 * k + j), seed=j,
                  lowlevel=_noisy(store.images[i], 5.0, 7))
        emb = torch.randn(len(test_idx), 8, generator=torch.Generator().manual_seed(k))
        w.add_embeddings(subject, emb + 0.3 * torch.randn(emb.shape), emb)
    w.flush()
    return run, store, test_idx


def test_evaluate_reconstruction_folder(recon_run, tmp_path):
    run, store, test_idx = recon_run
    out = tmp_path / "eval"
    table = _evaluate([f"run={run}"], out)
    rows = {r["subject"]: r for r in table["rows"]}
    assert set(rows) == {"subj01", "subj02", "mean"}
    assert table["columns"] == ["pixcorr", "ssim", "alexnet2", "alexnet5", "clip",
                                "brain_to_image_top1", "image_to_brain_top1"]
    # PixCorr equals an independent computation from the PNGs and the store's images
    from braindecode_fw.data.reconstructions import open_reconstructions

    recs = open_reconstructions(run)
    items = recs.select("subj01")
    recon = torch.stack([torch.from_numpy(np.array(Image.open(run / i.path))).permute(2, 0, 1).float() / 255
                         for i in items])
    gts = as_float_images(store.images[test_idx])
    up = lambda x: torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)  # noqa: E731
    assert rows["subj01"]["pixcorr"] == pytest.approx(float(pixcorr(up(recon), up(gts)).mean()), abs=1e-9)
    assert rows["subj01"]["pixcorr"] > rows["subj02"]["pixcorr"]  # less noise, better scores
    assert rows["subj01"]["ssim"] > rows["subj02"]["ssim"]
    assert rows["subj01"]["n_images"] == len(test_idx)
    assert 0 <= rows["subj01"]["brain_to_image_top1"] <= 1
    for name in ("metrics.json", "metrics.csv", "metrics.md", "per_image.csv", "metrics_bars.png",
                 "metrics_boxes.png", "best_worst_subj01.png", "retrieval_topk.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "metrics.md").read_text()
    assert md.splitlines()[0].startswith("| Subject | n | PixCorr↑ | SSIM↑ | Alex(2)↑ | Alex(5)↑ | CLIP↑ | Ret b→i↑")
    assert "Published results" not in md  # synthetic test set: no comparison rows
    logged = (out / "csv" / "metrics.csv").read_text()
    assert "eval/subj01/pixcorr" in logged
    per_image = (out / "per_image.csv").read_text().splitlines()
    assert len(per_image) == 1 + 2 * len(test_idx)

    blended = _evaluate([f"run={run}", "blend_lowlevel=0.25", "test_set=nsd_new_1000", "plots.enabled=false"],
                        tmp_path / "eval_blend")
    pixel_only = _evaluate([f"run={run}", "test_set=nsd_new_1000", "plots.enabled=false",
                            "metrics.feature_metrics.alexnet2=null", "metrics.feature_metrics.alexnet5=null",
                            "metrics.feature_metrics.clip=null"],
                           tmp_path / "eval_pixel")
    assert pixel_only["comparison"] and "MindEye2, 40 sessions" in (tmp_path / "eval_pixel" / "metrics.md").read_text()
    brow = {r["subject"]: r for r in blended["rows"]}
    assert brow["subj02"]["pixcorr"] > rows["subj02"]["pixcorr"]  # the clean low-level image helps
    md = (tmp_path / "eval_blend" / "metrics.md").read_text()
    # AlexNet is random-weight in the synthetic suite: flagged, and no published rows beside it
    assert "random-weight networks (plumbing checks, not comparable with publications): Alex(2), Alex(5)." in md
    assert "MindEye2, 40 sessions" not in md
    assert json.loads((tmp_path / "eval_blend" / "metrics.json").read_text())["protocol"]["blend_lowlevel"] == 0.25


def test_evaluate_folder_pair(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "gt").mkdir()
    for s in ("subjA", "subjB"):
        (tmp_path / "rec" / s).mkdir(parents=True)
    for i in range(4):
        g = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(g).save(tmp_path / "gt" / f"{i:03d}.png")
        Image.fromarray(g).save(tmp_path / "rec" / "subjA" / f"{i:03d}.png")
        Image.fromarray(_noisy(g, 60, i)).save(tmp_path / "rec" / "subjB" / f"{i:03d}.png")
    table = _evaluate([f"recon_dir={tmp_path / 'rec'}", f"gt_dir={tmp_path / 'gt'}"], tmp_path / "out")
    rows = {r["subject"]: r for r in table["rows"]}
    assert rows["subjA"]["pixcorr"] == pytest.approx(1.0) and rows["subjA"]["ssim"] == pytest.approx(1.0)
    assert rows["subjA"]["alexnet2"] == 1.0 and rows["subjB"]["pixcorr"] < 0.9
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "rec" / "subjB" / "extra.png")
    with pytest.raises(ValueError, match=r"no ground truth for 1 reconstruction\(s\).*'extra'"):
        _evaluate([f"recon_dir={tmp_path / 'rec'}", f"gt_dir={tmp_path / 'gt'}"], tmp_path / "out2")


def test_cli_needs_exactly_one_input(tmp_path):
    proc = run_cli("bdf-evaluate", [], tmp_path)
    _assert_one_line_error(proc, "give exactly one input: run=", "got none")
    proc = run_cli("bdf-evaluate", [f"run={tmp_path}"], tmp_path)
    _assert_one_line_error(proc, "manifest.json: not a reconstruction folder")


def test_evaluate_float_array_pair_skips_8bit_rounding(tmp_path):
    """Two array files are matched by index and evaluated as stored; PNGs of the same recons equal
    the arrays rounded to 8 bits (so the difference between the two tables is the quantisation)."""
    g = torch.Generator().manual_seed(3)
    gts = (torch.rand(6, 3, 40, 40, generator=g) * 255).round() / 255
    recons = (gts + 0.15 * torch.randn(gts.shape, generator=g)).clamp(0, 1)  # float, not on the 8-bit grid
    np.save(tmp_path / "recons.npy", recons.numpy())
    torch.save(gts, tmp_path / "gts.pt")
    (tmp_path / "png_rec").mkdir()
    (tmp_path / "png_gt").mkdir()
    for i in range(6):
        to_u8 = lambda t: (t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # noqa: E731
        Image.fromarray(to_u8(recons[i])).save(tmp_path / "png_rec" / f"img{i}.png")
        Image.fromarray(to_u8(gts[i])).save(tmp_path / "png_gt" / f"img{i}.png")
    pixel = ["metrics.feature_metrics.alexnet2=null", "metrics.feature_metrics.alexnet5=null",
             "metrics.feature_metrics.clip=null", "plots.enabled=false"]
    arrays = _evaluate([f"recon_dir={tmp_path / 'recons.npy'}", f"gt_dir={tmp_path / 'gts.pt'}", *pixel],
                       tmp_path / "out_arr")
    pngs = _evaluate([f"recon_dir={tmp_path / 'png_rec'}", f"gt_dir={tmp_path / 'png_gt'}", *pixel],
                     tmp_path / "out_png")
    up = lambda x: torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)  # noqa: E731
    a, p = arrays["rows"][-1], pngs["rows"][-1]
    assert a["pixcorr"] == pytest.approx(float(pixcorr(up(recons), up(gts)).mean()), abs=1e-9)
    quantised = (recons * 255).round() / 255
    assert p["pixcorr"] == pytest.approx(float(pixcorr(up(quantised), up(gts)).mean()), abs=1e-6)
    assert a["pixcorr"] != p["pixcorr"]
    assert arrays["protocol"]["pixels"] == "float arrays" and pngs["protocol"]["pixels"] == "8-bit files"
    assert (tmp_path / "out_png" / "per_image.csv").read_text().splitlines()[1].startswith("all,img0,")

    with pytest.raises(ValueError, match=r"gts.pt holds 5 images.*|recons.npy holds 6 images, .*gts.pt holds 5"):
        torch.save(gts[:5], tmp_path / "gts.pt")
        _evaluate([f"recon_dir={tmp_path / 'recons.npy'}", f"gt_dir={tmp_path / 'gts.pt'}", *pixel], tmp_path / "e1")
    with pytest.raises(ValueError, match=r"give two folders \(matched by file name\) or two array files .*got a file and a folder"):
        _evaluate([f"recon_dir={tmp_path / 'recons.npy'}", f"gt_dir={tmp_path / 'png_gt'}", *pixel], tmp_path / "e2")
    with pytest.raises(FileNotFoundError, match=r"gt_dir: not found: .*nope.npy"):
        _evaluate([f"recon_dir={tmp_path / 'recons.npy'}", f"gt_dir={tmp_path / 'nope.npy'}", *pixel], tmp_path / "e3")
    (tmp_path / "recons.txt").write_text("x")
    with pytest.raises(ValueError, match=r"recon_dir: .*recons.txt is a file but not an array file"):
        _evaluate([f"recon_dir={tmp_path / 'recons.txt'}", f"gt_dir={tmp_path / 'gts.pt'}", *pixel], tmp_path / "e4")
    for name in ("e1", "e2", "e3", "e4"):
        assert not (tmp_path / name / "metrics.json").exists()


@pytest.mark.slow
def test_a_checkpoint_is_not_scored_on_another_store_version(tiny_train_run, tmp_path):
    """Regenerating a world (another seed) gives the same subject names other responses: a
    checkpoint run on it would score at chance without an error. bdf-evaluate and bdf-reconstruct
    refuse, naming both versions and the world keys that differ; allow_other_store=true runs it
    anyway; a store whose subjects have other feature counts is refused in any case."""
    from tests.conftest import TINY_WORLD

    _, root = tiny_train_run
    ckpt = sorted((root / "logs" / "train" / "runs").glob("*/checkpoints/best*.ckpt"))[0]
    trained_on = torch.load(ckpt, weights_only=True)["braindecode_fw"]["dataset_version"]
    other = tmp_path / "other_world"
    r = run_cli("bdf-prepare", [*TINY_WORLD, "dataset.world.seed=1", f"dataset.store={other}"], tmp_path)
    assert r.returncode == 0, r.stderr
    other_version = open_store(other).version
    assert other_version != trained_on
    from tests.tasks.test_reconstruct import TINY_GENERATOR

    for cmd, extra in (("bdf-evaluate", []), ("bdf-reconstruct", TINY_GENERATOR)):
        r = run_cli(cmd, [f"ckpt={ckpt}", f"store={other}", *extra], tmp_path)
        _assert_one_line_error(r)
        assert (f"was trained on store version {trained_on}, but {other} now holds version {other_version}; "
                f"the world config differs in dataset.world.seed") in r.stderr, r.stderr
    r = run_cli("bdf-evaluate", [f"ckpt={ckpt}", f"store={other}", "allow_other_store=true", "plots.enabled=false"],
                tmp_path)
    assert r.returncode == 0, r.stderr
    wider = tmp_path / "wider_world"
    world = [a for a in TINY_WORLD if not a.startswith("dataset.world.voxels_per_subject=")]
    r = run_cli("bdf-prepare", [*world, "dataset.world.voxels_per_subject=[70,90]", f"dataset.store={wider}"], tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("bdf-evaluate", [f"ckpt={ckpt}", f"store={wider}", "allow_other_store=true"], tmp_path)
    _assert_one_line_error(r)
    assert "disagree on the feature count of subj01: decoder 60, store 70" in r.stderr, r.stderr
