"""The converter base (braindecode_fw/data/convert/base.py): the order of its phases, nothing written
when a check fails, one report schema for every converter, and a minimal subclass end to end."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from braindecode_fw.data.convert.base import (
    REPORT_KEYS,
    Converter,
    ConverterInputError,
    Written,
    check_report_schema,
)
from braindecode_fw.data.store import StoreWriter, TrialTable, open_store
from braindecode_fw.errors import OutputExistsError


@dataclass
class ToyConfig:
    name: str
    store: str | None
    n_trials: int
    n_features: int
    image_size: int = 8
    force: bool = False
    replace: bool = False
    fail_in: str = ""  # phase that raises ("plan", "validate", "write")
    kind: str = "toy"
    converter: str | None = None


class ToyConverter(Converter[dict]):
    """A dataset of ``n_trials`` random trials over 4 images; records the phases it ran."""

    kind = "toy"
    title = "toy"
    modality = "fmri"
    config_class = ToyConfig
    calls: list[str] = []

    def locate(self) -> None:
        self.calls.append("locate")

    def fingerprint(self) -> str:
        self.calls.append("fingerprint")
        return f"toy-{self.cfg.n_trials}-{self.cfg.n_features}"

    def plan(self) -> dict:
        self.calls.append("plan")
        if self.cfg.fail_in == "plan":
            raise ConverterInputError("toy/plan.csv: bad row")
        rng = np.random.default_rng(0)
        self.check("toy inputs")
        return {"responses": rng.standard_normal((self.cfg.n_trials, self.cfg.n_features)).astype(np.float32)}

    def validate(self, plan: dict) -> None:
        self.calls.append("validate")
        if self.cfg.fail_in == "validate":
            raise ConverterInputError("toy/design.mat: does not match the responses")
        self.warn("toy warning")
        self.skip_check("toy release sizes: fixture")

    def write(self, writer: StoreWriter, plan: dict) -> Written:
        self.calls.append("write")
        n = self.cfg.n_trials
        writer.write_images(np.zeros((4, 8, 8, 3), np.uint8), [f"img{i}" for i in range(4)])
        split = np.array(["train"] * (n - 4) + ["val", "val", "test", "test"])
        trials = TrialTable(np.arange(n), np.arange(n) % 4, np.zeros(n, np.int64), np.zeros(n, np.int64),
                            np.arange(n) // 4, split)
        writer.write_subject("s1", trials, plan["responses"], statistics={"toy_stat": 3})
        if self.cfg.fail_in == "write":
            raise ConverterInputError("toy/betas.npy: row 7 holds NaN")
        return Written({"source": "toy", "config_fingerprint": self.fingerprint()}, {"s1": {"toy_stat": 3}},
                       {"toy_extra": 1})


def _toy(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return {"name": "toy", "store": str(tmp_path / "out" / "toy"), "n_trials": 12, "n_features": 5, **kw}


@pytest.fixture(autouse=True)
def _reset_calls():
    ToyConverter.calls = []


@pytest.mark.parametrize("phase", ["plan", "validate", "write"])
def test_failed_phase_writes_nothing_and_leaves_no_folder(tmp_path, phase):
    with pytest.raises(ConverterInputError, match=r"toy/\w+\.\w+: "):
        ToyConverter.convert(_toy(tmp_path, fail_in=phase))
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # no store, no .partial-<pid>
    order = ["locate", "fingerprint", "plan", "validate", "write"]
    assert ToyConverter.calls == order[:order.index(phase) + 1]


def test_a_failed_reconversion_keeps_the_previous_store(tmp_path):
    first = ToyConverter.convert(_toy(tmp_path))
    with pytest.raises(ConverterInputError):
        ToyConverter.convert(_toy(tmp_path, n_trials=16, fail_in="write", replace=True))
    assert open_store(first["store"]).version == first["store_version"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["toy"]


def test_minimal_subclass_end_to_end(tmp_path):
    summary = ToyConverter.convert(OmegaConf.create(_toy(tmp_path)))
    assert ToyConverter.calls == ["locate", "fingerprint", "plan", "validate", "write", "fingerprint"]
    check_report_schema(summary)
    st = open_store(summary["store"])
    assert summary["store_version"] == st.version and summary["dataset"] == "toy" and summary["n_images"] == 4
    assert summary["image_size"] == 8 and st.meta["image_size"] == 8
    assert summary["subjects"] == {"s1": {"toy_stat": 3, "n_trials": 12, "n_voxels": 5,
                                          "split_trials": {"train": 8, "val": 2, "test": 2}}}
    assert summary["checked"] == ["toy inputs"] and summary["warnings"] == ["toy warning"]
    assert summary["not_checked"] == ["toy release sizes: fixture"] and summary["extras"] == {"toy_extra": 1}
    assert summary["noop"] is False and summary["config_fingerprint"] == "toy-12-5"
    assert summary["report"].splitlines() == [
        "toy: 4 images, 1 subject(s)", "  s1: 5 voxels, trials {'train': 8, 'val': 2, 'test': 2}",
        "warning: toy warning",
        f"store version {st.version}; 1 input checks passed before writing, 1 did not apply"]

    ToyConverter.calls = []
    again = ToyConverter.convert(_toy(tmp_path))
    assert ToyConverter.calls == ["locate", "fingerprint"]  # up to date: no plan, nothing written
    check_report_schema(again)
    assert again["noop"] and again["skipped"] and again["store_version"] == st.version
    assert again["subjects"]["s1"] == summary["subjects"]["s1"]  # read back from the store
    assert "up to date" in again["report"] and "toy-12-5" in again["report"]

    assert not ToyConverter.convert(_toy(tmp_path, force=True))["noop"]
    with pytest.raises(OutputExistsError, match=r"dataset.store: .* already holds the toy store 'toy' version "
                       rf"{st.version} .*fingerprint toy-12-5, this one toy-12-3.*dataset.replace=true"):
        ToyConverter.convert(_toy(tmp_path, n_features=3))  # another fingerprint: refused
    assert open_store(summary["store"]).version == st.version
    other = ToyConverter.convert(_toy(tmp_path, n_features=3, replace=True))  # replaced when asked to
    assert not other["noop"] and other["subjects"]["s1"]["n_voxels"] == 3


def test_meg_subjects_report_sensors_and_times(tmp_path):
    class ToyMEG(ToyConverter):
        modality = "meg"

        def write(self, writer, plan):
            writer.write_images(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"])
            n = 6
            split = np.array(["train", "train", "val", "test", "test_large", "test_large"])
            trials = TrialTable(np.arange(n), np.arange(n) % 2, np.zeros(n, np.int64), np.zeros(n, np.int64),
                                np.arange(n) // 2, split)
            writer.write_subject("m1", trials, np.zeros((n, 3, 7), np.float32), sensor_names=["A", "B", "C"],
                                 sensor_positions=np.zeros((3, 2)), sfreq=120.0, tmin=-0.5)
            return Written({"source": "toy meg"}, {})

    summary = ToyMEG.convert(_toy(tmp_path))
    check_report_schema(summary)
    assert summary["subjects"]["m1"] == {"n_trials": 6, "n_sensors": 3, "n_times": 7, "split_trials": {
        "train": 2, "val": 1, "test": 1, "test_large": 2}}
    assert "m1: 3 sensors x 7 samples" in summary["report"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"dataset: unknown toy converter key\(s\) \['n_trails'\]; known keys"):
        ToyConverter.convert({**_toy(tmp_path), "n_trails": 3})
    with pytest.raises(ValueError, match=r"dataset: toy converter key\(s\) \['n_features'\] missing"):
        ToyConverter.convert({"name": "toy", "store": str(tmp_path / "s"), "n_trials": 3})
    with pytest.raises(ValueError, match=r"dataset.n_trials: expected an integer, got 'abc'"):
        ToyConverter.convert(_toy(tmp_path, n_trials="abc"))
    with pytest.raises(ValueError, match=r"dataset.store: not set \(where the prepared toy store is written\)"):
        ToyConverter.convert(_toy(tmp_path, store=None))
    assert ToyConverter.calls == ["locate"]


def test_prepare_finds_a_converter_module_of_the_kind_or_a_converter_class(tmp_path, monkeypatch):
    from braindecode_fw.data.prepare import prepare

    module = types.ModuleType("braindecode_fw.data.convert.toy")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    module.ToyConverter = ToyConverter
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # dataset.kind: toy -> the Converter of that kind in braindecode_fw/data/convert/toy.py (no registry entry)
    by_kind = prepare(OmegaConf.create({**_toy(tmp_path / "a"), "kind": "toy"}))
    assert by_kind["converter"] == "toy" and open_store(by_kind["store"]).version == by_kind["store_version"]
    # dataset.converter: "package.module:ConverterClass" (a lab's own converter)
    monkeypatch.setitem(sys.modules, "toy_lab", module)
    by_class = prepare(OmegaConf.create({**_toy(tmp_path / "b"), "converter": "toy_lab:ToyConverter"}))
    assert by_class["converter"] == "toy" and by_class["subjects"]["s1"]["n_trials"] == 12
    with pytest.raises(ValueError, match=r"dataset.kind: no preparer for 'nowhere'"):
        prepare(OmegaConf.create({**_toy(tmp_path / "c"), "kind": "nowhere"}))


# ------------------------------------------------------------------------------------------------
# every shipped converter: one schema
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_summaries(tmp_path_factory):
    from braindecode_fw.data.convert.mindeye import convert_mindeye1_avg, convert_mindeye2
    from braindecode_fw.data.convert.mindeye_fixture import (
        write_mindeye1_avg_fixture,
        write_mindeye2_fixture,
    )
    from braindecode_fw.data.convert.nsd import convert_nsd
    from braindecode_fw.data.convert.nsd_fixture import write_nsd_fixture
    from braindecode_fw.data.convert.things_meg import convert_things_meg
    from braindecode_fw.data.convert.things_meg_fixture import write_things_meg_fixture

    tmp = tmp_path_factory.mktemp("schema")
    write_nsd_fixture(tmp / "nsd", hdf5=False, captions=False)
    write_mindeye2_fixture(tmp / "me2")
    write_mindeye1_avg_fixture(tmp / "me1")
    fx = write_things_meg_fixture(tmp / "ds004212", n_runs=1, hebart=False)
    runs = {
        "nsd": (convert_nsd, {"root": str(tmp / "nsd"), "image_size": 16, "progress": False}),
        "mindeye2": (convert_mindeye2, {"root": str(tmp / "me2"), "subjects": [1], "image_size": 16}),
        "mindeye1_avg": (convert_mindeye1_avg, {"root": str(tmp / "me1"), "subjects": [1], "image_size": 16}),
        "things_meg": (convert_things_meg, {"root": str(fx["root"]), "images_root": str(fx["images_root"]),
                                            "image_size": 16, "progress": False}),
    }
    out = {}
    for kind, (fn, cfg) in runs.items():
        cfg = {**cfg, "store": str(tmp / "stores" / kind)}
        out[kind] = (fn(cfg), fn(cfg))  # (converted, up to date)
    return out


def test_every_shipped_converter_reports_the_same_schema(shipped_summaries):
    for kind, (summary, noop) in shipped_summaries.items():
        for s in (summary, noop):
            check_report_schema(s)
            assert list(s) == list(REPORT_KEYS), kind
            assert s["converter"] == kind and s["store_version"] == summary["store_version"]
        assert not summary["noop"] and noop["noop"] and noop["skipped"]
        assert summary["checked"], kind  # every converter says what it checked before writing
        assert set(noop["subjects"]) == set(summary["subjects"])
        for tag, st in summary["subjects"].items():
            common = {k: v for k, v in st.items() if k in ("n_trials", "n_voxels", "n_sensors", "n_times",
                                                           "split_trials")}
            assert {k: noop["subjects"][tag][k] for k in common} == common
            stored = json.loads((Path(summary["store"]) / "subjects" / tag / "statistics.json").read_text())
            assert json.loads(json.dumps({k: st[k] for k in stored})) == stored, kind
        assert f"store version {summary['store_version']}" in summary["report"]


def test_shipped_subject_counts_agree_with_the_store(shipped_summaries):
    for kind, (summary, _) in shipped_summaries.items():
        st = open_store(summary["store"])
        for tag, s in summary["subjects"].items():
            sub = st.subjects[tag]
            assert s["n_trials"] == len(sub.trials) == sub.responses.shape[0], kind
            assert sum(s["split_trials"].values()) == s["n_trials"]
            if kind == "things_meg":
                assert (s["n_sensors"], s["n_times"]) == sub.responses.shape[1:]
            else:
                assert s["n_voxels"] == sub.responses.shape[1]
