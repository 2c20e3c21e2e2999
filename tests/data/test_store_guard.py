"""What happens to what is already at ``dataset.store`` when a store is prepared there
(braindecode_fw/data/convert/common.py ``check_existing_store``, used by ``prepare()`` for the
synthetic worlds and ``dataset.converter`` functions, by ``Converter.run`` and by ``ensure_store``'s
auto-prepare): the same configuration is a no-op, ``dataset.force=true`` rebuilds it, another
configuration is refused (the store earlier runs were trained on is kept) unless
``dataset.replace=true``, and another ``dataset.name`` writes beside it."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from braindecode_fw.data.convert.common import check_existing_store, config_differences
from braindecode_fw.data.prepare import ensure_store, prepare
from braindecode_fw.data.store import StoreWriter, TrialTable, open_store
from braindecode_fw.errors import MissingFileError, OutputExistsError
from braindecode_fw.schema import CONF_ROOT
from tests.conftest import TINY_WORLD


def _dataset(tmp_path: Path, *overrides: str) -> DictConfig:
    """``dataset=synthetic`` as bdf-prepare composes it (``store: ${paths.data_dir}/prepared/${dataset.name}``),
    with the tiny world and ``overrides``."""
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path / "data")},
                            "dataset": OmegaConf.load(CONF_ROOT / "dataset" / "synthetic.yaml")})
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([*TINY_WORLD, *overrides])).dataset


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` -> (size, mtime): what a refused run must leave untouched."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path) -> tuple[DictConfig, Path, str]:
    """The tiny synthetic world prepared once at its default store; (config, store, version)."""
    ds = _dataset(tmp_path)
    summary = prepare(ds)
    store = Path(ds.store)
    assert store == tmp_path / "data" / "prepared" / "synthetic" and not summary.get("noop")
    return ds, store, open_store(store).version


def test_same_world_again_is_a_noop(world):
    ds, store, version = world
    before = _files(store)
    again = prepare(ds)
    assert again["noop"] and again["store_version"] == version
    assert "is up to date" in again["report"] and "dataset.force=true regenerates it" in again["report"]
    assert _files(store) == before


def test_force_rebuilds_the_same_world(world):
    ds, store, version = world
    stamp = (store / "dataset.json").stat().st_mtime_ns
    forced = prepare(OmegaConf.merge(ds, {"force": True}))
    assert not forced.get("noop")
    assert (store / "dataset.json").stat().st_mtime_ns != stamp
    assert open_store(store).version == version  # same configuration, same contents


def test_another_world_is_refused_and_nothing_is_written(world, tmp_path):
    ds, store, version = world
    before = _files(tmp_path / "data")
    with pytest.raises(OutputExistsError) as err:
        prepare(OmegaConf.merge(ds, {"world": {"seed": 3}}))
    message = str(err.value)
    assert "\n" not in message
    for part in (f"dataset.store: {store} already holds the synthetic world store 'synthetic' version {version}",
                 "prepared from another configuration: dataset.world.seed 0 -> 3",
                 "it is kept, since runs and checkpoints trained on it need it",
                 "set dataset.replace=true to replace it",
                 f"or another dataset.name=<new name> to prepare it beside this one (in {store.parent}/<new name>)"):
        assert part in message, message
    assert _files(tmp_path / "data") == before  # no partial folder, no change to the store
    # force rebuilds the same contents only: it is no way past the refusal
    with pytest.raises(OutputExistsError, match="dataset.world.seed 0 -> 3"):
        prepare(OmegaConf.merge(ds, {"world": {"seed": 3}, "force": True}))
    assert open_store(store).version == version


def test_the_keys_that_differ_are_named_with_their_values(world):
    ds, _, _ = world
    other = OmegaConf.merge(ds, {"world": {"seed": 3, "ncsnr": {"median": 0.5}}})
    with pytest.raises(OutputExistsError, match=r"dataset.world.ncsnr.median 0.35 -> 0.5, dataset.world.seed 0 -> 3;"):
        prepare(other)
    stored = {"a": 1, "b": {"c": [1, 2]}, "d": 0, "e": 1, "f": 2, "g": 3}
    wanted = {"a": 2, "b": {"c": [1, 3]}, "d": 1, "e": 2, "f": 3, "h": 4}
    assert config_differences(stored, wanted) == [
        "dataset.a 1 -> 2", "dataset.b.c [1, 2] -> [1, 3]", "dataset.d 0 -> 1", "dataset.e 1 -> 2", "... and 3 more"]
    assert config_differences({"x": 1}, {"y": 1}, "dataset.world") == [
        "dataset.world.x 1 -> '(absent)'", "dataset.world.y '(absent)' -> 1"]


def test_replace_true_replaces_it(world):
    ds, store, version = world
    replaced = prepare(OmegaConf.merge(ds, {"world": {"seed": 3}, "replace": True}))
    assert not replaced.get("noop")
    st = open_store(store)
    assert st.version != version and st.meta["provenance"]["config"]["seed"] == 3
    assert sorted(p.name for p in store.parent.iterdir()) == ["synthetic"]  # no .replaced-<pid> left
    # replace only matters for another world: the same one again is a no-op
    assert prepare(OmegaConf.merge(ds, {"world": {"seed": 3}, "replace": True}))["noop"]


def test_another_name_writes_beside_it(world, tmp_path):
    ds, store, version = world
    before = _files(store)
    seed3 = _dataset(tmp_path, "dataset.name=synthetic_seed3", "dataset.world.seed=3")  # the README's example
    prepare(seed3)
    assert Path(seed3.store) == store.parent / "synthetic_seed3"
    assert open_store(seed3.store).meta["provenance"]["config"]["seed"] == 3
    assert open_store(store).version == version and _files(store) == before
    assert sorted(p.name for p in store.parent.iterdir()) == ["synthetic", "synthetic_seed3"]


def test_auto_prepare_reuses_the_world_and_refuses_another(world):
    ds, store, version = world
    assert ds.auto_prepare is True
    before = _files(store)
    assert ensure_store(ds) == store and _files(store) == before
    with pytest.raises(OutputExistsError, match=r"dataset.store: .* version \w+ prepared from another configuration: "
                                                r"dataset.world.seed 0 -> 3; .*dataset.replace=true"):
        ensure_store(OmegaConf.merge(ds, {"world": {"seed": 3}}))  # bdf-train dataset.world.seed=3
    assert _files(store) == before and open_store(store).version == version


def test_a_folder_without_dataset_json_is_not_a_finished_store(tmp_path):
    ds = _dataset(tmp_path)
    half = Path(ds.store)
    (half / "subjects" / "subj01").mkdir(parents=True)
    (half / "subjects" / "subj01" / "responses.npy").write_bytes(b"half a copy")
    before = _files(half)
    with pytest.raises(MissingFileError) as err:  # bdf-train on a store it does not prepare
        ensure_store(OmegaConf.merge(ds, {"auto_prepare": False}))
    assert f"dataset.store: {half} is not a finished store (no dataset.json)" in str(err.value)
    assert "prepared store not found" not in str(err.value)
    assert "dataset.replace=true" in str(err.value)
    with pytest.raises(OutputExistsError, match=r"is not a finished store \(no dataset.json\).*dataset.replace=true"):
        ensure_store(ds)  # auto-prepare never deletes a folder it did not write
    with pytest.raises(OutputExistsError, match=r"exists but is not a finished store \(no dataset.json\)"):
        prepare(ds)
    assert _files(half) == before
    prepare(OmegaConf.merge(ds, {"replace": True}))
    assert open_store(half).subjects["subj01"].n_features == 60


def test_a_missing_store_names_the_command_and_an_empty_folder_is_written(tmp_path):
    ds = _dataset(tmp_path)
    with pytest.raises(MissingFileError, match=r"dataset.store: prepared store not found at .*; run "
                                               r"`bdf-prepare dataset=synthetic`"):
        ensure_store(OmegaConf.merge(ds, {"auto_prepare": False}))
    Path(ds.store).mkdir(parents=True)  # an empty folder holds nothing to lose
    assert not prepare(ds).get("noop") and (Path(ds.store) / "dataset.json").is_file()


# ---- the shared helper on its own, and converters that declare no fingerprint ---------------------


def _write_store(root: Path, provenance: dict) -> None:
    with StoreWriter(root, name="lab", modality="fmri", overwrite=True) as w:
        w.write_images(np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"])
        n = 4
        w.write_subject("s1", TrialTable(np.arange(n), np.arange(n) % 2, np.zeros(n, np.int64),
                                         np.zeros(n, np.int64), np.arange(n) // 2,
                                         np.array(["train", "train", "val", "test"])), np.zeros((n, 3), np.float32))
        w.finalize(provenance, image_size=4)


def test_check_existing_store_cases(tmp_path):
    store = tmp_path / "prepared" / "lab"
    assert check_existing_store(store, "f1") is None  # nothing there
    _write_store(store, {"source": "lab", "config_fingerprint": "f1"})
    version = json.loads((store / "dataset.json").read_text())["version"]
    assert check_existing_store(store, "f1", source="lab")["version"] == version  # up to date
    assert check_existing_store(store, "f1", source="lab", force=True) is None
    assert check_existing_store(store, "f2", replace=True) is None
    with pytest.raises(OutputExistsError, match=r"from another source \(provenance source 'lab', this is 'nsd'\)"):
        check_existing_store(store, "f1", source="nsd")
    with pytest.raises(OutputExistsError, match=r"fingerprint f1, this one f2\); .*dataset.name=<new name>"):
        check_existing_store(store, "f2", name="lab", what="lab")
    with pytest.raises(OutputExistsError, match=r"converter declares no fingerprint.*another dataset.store="):
        check_existing_store(store, None, name="other_name")  # the store path does not derive from the name
    _write_store(store, {"source": "lab"})
    with pytest.raises(OutputExistsError, match=r"with no provenance.config_fingerprint"):
        check_existing_store(store, "f1")
    (store / "dataset.json").write_text("{not json")
    with pytest.raises(OutputExistsError, match=r"holds an unreadable dataset.json"):
        check_existing_store(store, "f1")
    a_file = tmp_path / "prepared" / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputExistsError, match=r"is a file, not a prepared-store folder"):
        check_existing_store(a_file, "f1", replace=True)


def test_a_converter_function_without_fingerprint_needs_replace(tmp_path, monkeypatch):
    calls = []

    def convert(dataset_cfg):
        calls.append(dataset_cfg.store)
        _write_store(Path(dataset_cfg.store), {"source": "lab function"})
        return {"report": "written"}

    module = types.ModuleType("lab_function_converter")
    module.convert = convert
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ds = OmegaConf.create({"paths": {"data_dir": str(tmp_path)},
                           "dataset": {"name": "lab", "converter": "lab_function_converter:convert",
                                       "store": "${paths.data_dir}/prepared/${dataset.name}"}}).dataset
    assert prepare(ds)["report"] == "written"
    with pytest.raises(OutputExistsError, match=r"the lab_function_converter:convert converter declares no "
                                                r"fingerprint.*dataset.replace=true"):
        prepare(ds)
    assert len(calls) == 1  # refused before the function ran
    prepare(OmegaConf.merge(ds, {"replace": True}))
    assert len(calls) == 2
