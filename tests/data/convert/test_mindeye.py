"""MindEye2 release and MindEye1 avg-split import on miniature real-format fixtures (braindecode_fw/data/convert/mindeye_fixture.py)."""

from __future__ import annotations

import inspect
import io
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from braindecode_fw.data.convert.mindeye import convert_mindeye1_avg, convert_mindeye2
from braindecode_fw.data.convert.mindeye_fixture import (
    fixture_image,
    write_mindeye1_avg_fixture,
    write_mindeye2_fixture,
)
from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.data.store import open_store
from braindecode_fw.errors import OutputExistsError
from tests.conftest import TINY_MODEL


def _me2_cfg(root: Path, store: Path, **kw) -> OmegaConf:
    return OmegaConf.create({"name": "mindeye2", "kind": "mindeye2", "modality": "fmri", "root": str(root),
                             "store": str(store), "subjects": [1], "test_convention": "new", "image_size": 224,
                             "val_fraction": 0.03, "val_seed": 0, "chunk_rows": 500, "validate": "warn",
                             "force": False, **kw})


@pytest.fixture(scope="module")
def me2_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("mindeye2") / "data"
    return root, write_mindeye2_fixture(root)[1]


@pytest.fixture(scope="module")
def me2_store(me2_release, tmp_path_factory) -> Path:
    root, _ = me2_release
    store = tmp_path_factory.mktemp("prepared") / "mindeye2"
    convert_mindeye2(_me2_cfg(root, store))
    return store


def _behav_of_tar(path: Path) -> np.ndarray:
    import tarfile

    with tarfile.open(path) as tf:
        return np.stack([np.load(io.BytesIO(tf.extractfile(m).read()))[0]
                         for m in tf if m.name.endswith(".behav.npy") and "_behav" not in m.name])


# ------------------------------------------------------------------------------------------------
# MindEye2: values
# ------------------------------------------------------------------------------------------------


def test_mindeye2_betas_bit_exact_and_trial_table(me2_release, me2_store):
    root, design = me2_release
    st = open_store(me2_store)
    sub = st.subjects["subj01"]
    t = sub.trials
    behav = np.concatenate([_behav_of_tar(p) for p in sorted((root / "wds/subj01/train").glob("*.tar"))]
                           + [_behav_of_tar(root / "wds/subj01/new_test/0.tar")])
    behav = behav[np.argsort(behav[:, 5])]
    assert len(t) == len(behav) == 1500
    with h5py.File(root / "betas_all_subj01_fp32_renorm.hdf5") as f:
        expected = f["betas"][:][behav[:, 5].astype(int)]
    assert sub.responses.dtype == np.float32
    assert np.array_equal(np.asarray(sub.responses), expected)  # bit-exact, not re-normalised
    assert np.array_equal(t.trial_id, behav[:, 5].astype(int))
    assert np.array_equal(t.session, behav[:, 2].astype(int) - 1)
    assert np.array_equal(t.run, behav[:, 3].astype(int) - 1)
    assert t.run.min() == 0 and t.run.max() == 11
    source = np.asarray(st.image_metadata["source_ids"])
    assert np.array_equal(source[t.image_index], behav[:, 0].astype(int))
    prov = st.meta["provenance"]
    assert prov["normalisation"] == "mindeye2_renorm" and prov["zscore_at_load"] is False
    assert prov["test_convention"] == "new" and "val_rule" in prov and prov["geometry"].startswith("none")
    assert not (me2_store / "subjects/subj01/geometry.npz").exists()


def test_mindeye2_images_equal_release(me2_release, me2_store):
    root, _ = me2_release
    st = open_store(me2_store)
    ids = np.asarray(st.image_metadata["source_ids"])
    assert np.all(np.diff(ids) > 0) and st.images.shape == (len(ids), 224, 224, 3)
    with h5py.File(root / "coco_images_224_float16.hdf5") as f:
        for k in (0, len(ids) // 2, len(ids) - 1):
            ref = np.rint(f["images"][ids[k]].astype(np.float32) * 255).astype(np.uint8).transpose(1, 2, 0)
            assert np.array_equal(st.images[k], ref)
            assert np.array_equal(st.images[k], fixture_image(int(ids[k])))


def test_mindeye2_image_resize_rule(me2_release, tmp_path):
    root, _ = me2_release
    convert_mindeye2(_me2_cfg(root, tmp_path / "s64", image_size=64))
    st = open_store(tmp_path / "s64")
    assert st.images.shape[1:] == (64, 64, 3) and st.meta["image_size"] == 64
    i = int(st.image_metadata["source_ids"][3])
    ref = np.asarray(Image.fromarray(fixture_image(i)).resize((64, 64), Image.Resampling.BICUBIC))
    assert np.array_equal(st.images[3], ref)


def test_mindeye2_test_split_and_repeats(me2_release, me2_store):
    _, design = me2_release
    t = open_store(me2_store).subjects["subj01"].trials
    shared_trials = np.flatnonzero(design.shared)
    assert np.array_equal(np.sort(t.trial_id[t.split == "test"]), shared_trials)  # every shared trial, once
    assert not np.isin(t.trial_id[t.split != "test"], shared_trials).any()
    ids = design.id73k[t.trial_id]
    for i in np.unique(ids):
        rows = np.flatnonzero(ids == i)  # trials are in global-trial order
        assert np.array_equal(t.repeat[rows], np.arange(len(rows)))
    test_ids, counts = np.unique(ids[t.split == "test"], return_counts=True)
    assert sorted(counts.tolist()) == [1, 2] + [3] * (len(test_ids) - 2)


def test_mindeye2_legacy_test_convention(me2_release, tmp_path):
    root, design = me2_release
    convert_mindeye2(_me2_cfg(root, tmp_path / "legacy", test_convention="legacy"))
    st = open_store(tmp_path / "legacy")
    t = st.subjects["subj01"].trials
    expected = np.flatnonzero(design.shared & (design.session == 1))  # old release: earlier sessions only
    assert np.array_equal(np.sort(t.trial_id[t.split == "test"]), expected)
    assert not np.isin(np.flatnonzero(design.shared & (design.session == 2)), t.trial_id).any()
    assert st.meta["provenance"]["test_convention"] == "legacy"
    assert st.subjects["subj01"].statistics()["test_tar"] == "wds/subj01/test/0.tar"


def test_mindeye2_val_split_is_by_image(me2_store):
    st = open_store(me2_store)
    t = st.subjects["subj01"].trials
    val_images = np.unique(t.image_index[t.split == "val"])
    train_images = np.unique(t.image_index[t.split == "train"])
    test_images = np.unique(t.image_index[t.split == "test"])
    assert len(val_images) > 0
    assert not np.intersect1d(val_images, train_images).size and not np.intersect1d(val_images, test_images).size
    # the shared rule, recomputed here with plain Python integers (splitmix64 of the 73k id, seed 0)
    ids73k = np.asarray(st.image_metadata["source_ids"])

    def uniform(i: int, seed: int = 0) -> float:
        m = (1 << 64) - 1
        z = (i + seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return ((z ^ (z >> 31)) >> 11) / float(1 << 53)

    expected = {int(i) for i in np.concatenate([val_images, train_images]) if uniform(int(ids73k[i])) < 0.03}
    assert set(val_images.tolist()) == expected


def test_mindeye2_rerun_is_noop_unless_forced(me2_release, tmp_path):
    root, _ = me2_release
    store = tmp_path / "me2"
    first = convert_mindeye2(_me2_cfg(root, store))
    assert not first.get("skipped") and "subj01" in first["report"]
    stamp = (store / "dataset.json").stat().st_mtime_ns
    again = convert_mindeye2(_me2_cfg(root, store))
    assert again["skipped"] and "up to date" in again["report"]
    assert (store / "dataset.json").stat().st_mtime_ns == stamp
    forced = convert_mindeye2(_me2_cfg(root, store, force=True))
    assert not forced.get("skipped")
    assert (store / "dataset.json").stat().st_mtime_ns != stamp
    with pytest.raises(OutputExistsError, match=r"prepared from another configuration: dataset.val_fraction "):
        convert_mindeye2(_me2_cfg(root, store, val_fraction=0.1))  # other options: refused, store kept
    assert open_store(store).version == forced["store_version"]
    changed = convert_mindeye2(_me2_cfg(root, store, val_fraction=0.1, replace=True))  # rebuilt when asked to
    assert not changed.get("skipped")
    assert json.loads((store / "dataset.json").read_text())["provenance"]["options"]["val_fraction"] == 0.1


# ------------------------------------------------------------------------------------------------
# MindEye2: bad input -> clear error, no store
# ------------------------------------------------------------------------------------------------


def _link_release(src: Path, dst: Path) -> Path:
    """A copy of the release made of symlinks; ``_replace`` swaps one file for a real one."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def _replace(path: Path, data: bytes | None) -> None:
    path.unlink()
    if data is not None:
        path.write_bytes(data)


def _rewrite_betas(path: Path, fn) -> None:
    with h5py.File(path) as f:
        betas = f["betas"][:]
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=fn(betas))


def _nan_row(b):
    b = b.copy()
    b[777, 3] = np.nan
    return b


BAD_INPUTS = {
    "missing_betas": (lambda r: _replace(r / "betas_all_subj01_fp32_renorm.hdf5", None),
                      FileNotFoundError, ["betas_all_subj01_fp32_renorm.hdf5", "missing file"]),
    "global_trial_out_of_range": (lambda r: _rewrite_betas(r / "betas_all_subj01_fp32_renorm.hdf5", lambda b: b[:1400]),
                                  ValueError, [".tar", "global trial", "1400 rows",
                                               "betas_all_subj01_fp32_renorm.hdf5"]),
    "truncated_hdf5": (lambda r: _replace(r / "betas_all_subj01_fp32_renorm.hdf5",
                                          (r / "betas_all_subj01_fp32_renorm.hdf5").read_bytes()[:3000]),
                       ValueError, ["betas_all_subj01_fp32_renorm.hdf5", "truncated"]),
    "nan_betas": (lambda r: _rewrite_betas(r / "betas_all_subj01_fp32_renorm.hdf5", _nan_row),
                  ValueError, ["betas_all_subj01_fp32_renorm.hdf5", "row 777", "NaN"]),
    "missing_test_tar": (lambda r: _replace(r / "wds/subj01/new_test/0.tar", None),
                         FileNotFoundError, ["wds/subj01/new_test/0.tar", "test_convention=new"]),
    "truncated_tar": (lambda r: _replace(r / "wds/subj01/train/1.tar",
                                         (r / "wds/subj01/train/1.tar").read_bytes()[:5000]),
                      ValueError, ["wds/subj01/train/1.tar"]),
    "missing_images": (lambda r: _replace(r / "coco_images_224_float16.hdf5", None),
                       FileNotFoundError, ["coco_images_224_float16.hdf5"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_mindeye2_bad_input_fails_clearly_without_store(case, me2_release, tmp_path):
    src, _ = me2_release
    root = _link_release(src, tmp_path / "release")
    corrupt, error, needles = BAD_INPUTS[case]
    corrupt(root)
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(error) as info:
        convert_mindeye2(_me2_cfg(root, out / "mindeye2"))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert list(out.iterdir()) == []  # no store, no .partial-* folder
    assert (src / "betas_all_subj01_fp32_renorm.hdf5").stat().st_size > 3000  # the shared fixture is intact


def test_mindeye2_real_size_checks_follow_validate(tmp_path):
    # >= 1000 voxels: the data "look real", so the release's voxel / test-trial / session-tar counts apply
    write_mindeye2_fixture(tmp_path / "big", n_voxels=1000)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"15724 voxels.*3000.*40 session tars|15724"):
        convert_mindeye2(_me2_cfg(tmp_path / "big", out / "fail", validate="fail"))
    assert not out.exists() or list(out.iterdir()) == []
    summary = convert_mindeye2(_me2_cfg(tmp_path / "big", out / "warn", validate="warn"))
    assert "warning:" in summary["report"] and "15724" in summary["report"]
    prov = open_store(out / "warn").meta["provenance"]["validation"]
    assert prov["mode"] == "warn" and len(prov["problems"]) == 3
    summary = convert_mindeye2(_me2_cfg(tmp_path / "big", out / "off", validate="off"))
    assert "warning:" not in summary["report"]


def test_mindeye2_root_must_be_set(tmp_path):
    with pytest.raises(ValueError, match="dataset.root"):
        convert_mindeye2(OmegaConf.create({"root": None, "store": str(tmp_path / "s")}))


# ------------------------------------------------------------------------------------------------
# No double z-scoring
# ------------------------------------------------------------------------------------------------


def test_datamodule_inputs_equal_stored_betas_without_zscore(me2_store):
    dm = BrainDataModule(me2_store, zscore=False)
    dm.setup()
    ds, _ = dm._trial_dataset("train")
    batch = ds.__getitems__(list(range(len(ds))))
    stored = np.asarray(dm.store.subjects["subj01"].responses)
    assert np.array_equal(batch.responses.numpy(), stored[ds.rows])
    rep = dm.repeated_dataset("test")
    items = rep.__getitems__(list(range(len(rep))))
    n_valid = (rep.rows >= 0).sum(1)
    assert sorted(n_valid.tolist()) == [1, 2] + [3] * (len(rep) - 2)  # padded repetitions
    one = int(np.flatnonzero(n_valid == 1)[0])
    assert np.array_equal(items.responses[one].numpy(), stored[rep.rows[one, 0]])


@pytest.mark.skipif(inspect.signature(BrainDataModule).parameters["zscore"].default != "auto",
                    reason="needs the datamodule to honour provenance.zscore_at_load (data.zscore=auto)")
def test_datamodule_does_not_zscore_a_mindeye2_store_by_default(me2_store):
    dm = BrainDataModule(me2_store)
    dm.setup()
    assert dm.zscore is False
    ds, _ = dm._trial_dataset("train")
    batch = ds.__getitems__(list(range(0, len(ds), 7)))
    stored = np.asarray(dm.store.subjects["subj01"].responses)
    assert np.array_equal(batch.responses.numpy(), stored[ds.rows[::7]])


# ------------------------------------------------------------------------------------------------
# MindEye1 webdataset_avg_split
# ------------------------------------------------------------------------------------------------


def _me1_cfg(root: Path, store: Path, **kw) -> OmegaConf:
    return OmegaConf.create({"name": "mindeye1_avg", "kind": "mindeye1_avg", "root": str(root),
                             "store": str(store), "subjects": [1, 2], "layout": "auto", "image_size": 224,
                             "zscore_at_load": False, "validate": "warn", "force": False, **kw})


@pytest.mark.parametrize("layout", ["tar", "extracted"])
def test_mindeye1_avg_import(layout, tmp_path):
    samples = write_mindeye1_avg_fixture(tmp_path / "avg", subjects=(1, 2), layout=layout)
    convert_mindeye1_avg(_me1_cfg(tmp_path / "avg", tmp_path / "store"))
    st = open_store(tmp_path / "store")
    ids = np.asarray(st.image_metadata["source_ids"])
    for s in (1, 2):
        sub = st.subjects[f"subj{s:02d}"]
        t = sub.trials
        mine = sorted(samples[s], key=lambda x: (("train", "val", "test").index(x.split), x.key))
        assert len(t) == 3 * len(mine)
        for i, x in enumerate(mine):
            rows = slice(3 * i, 3 * i + 3)
            assert np.array_equal(np.asarray(sub.responses[rows]), x.nsdgeneral)
            assert t.repeat[rows].tolist() == [0, 1, 2] and set(t.split[rows]) == {x.split}
            assert set(ids[t.image_index[rows]]) == {x.id73k}
        assert {sp: int((t.split == sp).sum()) for sp in ("train", "val", "test")} == {"train": 18, "val": 6,
                                                                                        "test": 9}
        assert sub.statistics()["layout"] == layout
    x = samples[1][0]
    ref = np.asarray(Image.open(io.BytesIO(x.jpg)).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
    assert np.array_equal(st.images[int(np.searchsorted(ids, x.id73k))], ref)
    prov = st.meta["provenance"]
    assert prov["normalisation"] == "mindeye1_unknown" and prov["zscore_at_load"] is False
    assert "zscore_choice" in prov


def test_mindeye1_avg_layouts_give_the_same_store(tmp_path):
    for layout in ("tar", "extracted"):
        write_mindeye1_avg_fixture(tmp_path / layout, layout=layout)
        convert_mindeye1_avg(_me1_cfg(tmp_path / layout, tmp_path / f"store_{layout}", subjects=[1]))
    a, b = open_store(tmp_path / "store_tar"), open_store(tmp_path / "store_extracted")
    assert np.array_equal(a.images, b.images)
    assert (tmp_path / "store_tar/subjects/subj01/trials.tsv").read_text() == \
        (tmp_path / "store_extracted/subjects/subj01/trials.tsv").read_text()
    assert np.array_equal(a.subjects["subj01"].responses, b.subjects["subj01"].responses)


def test_mindeye1_avg_missing_split_fails_without_store(tmp_path):
    write_mindeye1_avg_fixture(tmp_path / "avg", layout="extracted")
    shutil.rmtree(tmp_path / "avg/val/subj01")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match=r"subj01"):
        convert_mindeye1_avg(_me1_cfg(tmp_path / "avg", tmp_path / "out/store", subjects=[1]))
    assert list((tmp_path / "out").iterdir()) == []


def test_mindeye1_avg_rerun_is_noop(tmp_path):
    write_mindeye1_avg_fixture(tmp_path / "avg")
    cfg = _me1_cfg(tmp_path / "avg", tmp_path / "store", subjects=[1])
    assert not convert_mindeye1_avg(cfg).get("skipped")
    assert convert_mindeye1_avg(cfg)["skipped"]
    cfg.force = True
    assert not convert_mindeye1_avg(cfg).get("skipped")


# ------------------------------------------------------------------------------------------------
# Console scripts
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bdf_prepare_and_train_on_mindeye2(me2_release, tmp_path):
    from tests.conftest import run_cli as _run  # in this process: no second import of Lightning

    root, _ = me2_release
    store = tmp_path / "prepared/mindeye2"
    proc = _run("bdf-prepare", ["dataset=mindeye2", f"dataset.root={root}", f"dataset.store={store}",
                                "dataset.subjects=[1]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mindeye2_renorm" in proc.stdout and "subj01" in proc.stdout
    proc = _run("bdf-train", ["dataset=mindeye2", f"dataset.store={store}", *TINY_MODEL, "trainer.max_epochs=1",
                              "reconstruction.enabled=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_bdf_prepare_mindeye2_without_root_is_one_line_error(tmp_path):
    from tests.conftest import run_cli as _run
    from tests.tasks.test_cli import _assert_one_line_error

    proc = _run("bdf-prepare", ["dataset=mindeye2"], tmp_path)
    _assert_one_line_error(proc, "bdf-prepare: error:", "dataset.root")


# ------------------------------------------------------------------------------------------------
# Typed configs (one source per default: the packaged YAML)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["mindeye2", "mindeye1_avg"])
def test_config_defaults_equal_the_composed_config(dataset):
    import dataclasses

    from hydra.core.global_hydra import GlobalHydra

    from braindecode_fw import schema
    from braindecode_fw.data.convert.mindeye import MindEye1AvgConvertConfig, MindEye2ConvertConfig
    from tests.conftest import compose_config

    cls = {"mindeye2": MindEye2ConvertConfig, "mindeye1_avg": MindEye1AvgConvertConfig}[dataset]
    GlobalHydra.instance().clear()
    try:
        composed = OmegaConf.to_container(compose_config("prepare", [f"dataset={dataset}"]).dataset, resolve=True)
    finally:
        GlobalHydra.instance().clear()
    assert set(composed) == {f.name for f in dataclasses.fields(cls)}
    assert all(f.default is schema.FROM_YAML for f in dataclasses.fields(cls))
    default = dataclasses.asdict(cls.from_mapping({}))
    assert default.pop("store") is None  # ${paths.data_dir}/... needs Hydra
    composed.pop("store")
    assert default == composed


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"dataset: unknown MindEye2 converter key\(s\) \['chunk_row'\]"):
        convert_mindeye2({"root": str(tmp_path), "store": str(tmp_path / "s"), "chunk_row": 5})
    with pytest.raises(ValueError, match=r"dataset.chunk_rows: expected an integer, got 'abc'"):
        convert_mindeye2({"root": str(tmp_path), "store": str(tmp_path / "s"), "chunk_rows": "abc"})
    with pytest.raises(ValueError, match=r"dataset.test_convention: 'old' is not one of \['new', 'legacy'\]"):
        convert_mindeye2({"root": str(tmp_path), "store": str(tmp_path / "s"), "test_convention": "old"})
    with pytest.raises(ValueError, match=r"dataset.subjects: expected distinct subjects"):
        convert_mindeye1_avg({"root": str(tmp_path), "store": str(tmp_path / "s"), "subjects": [1, "subj01"]})
    assert not (tmp_path / "s").exists()
