"""The THINGS-MEG converter on the real ds004212 sidecars of sub-BIGMEG1 (../shared/realdata).

The real files (all 12 sessions x 10 runs: events.tsv, channels.tsv, meg.json, coordsystem.json, the
eye-tracking physio.json, the top-level files and ``sourcedata/category_mat_manual.tsv``) are linked
into a temporary BIDS tree, never modified. What the shared copy lacks is made here:

* the recordings: the release's ``.ds`` runs are ~0.5 GB each, so each run is a short FIF written
  through MNE (the converter reads ``.ds`` and ``.fif`` through the same :func:`open_run`) with the
  run's real channel names and order (channels.tsv), its real rate (meg.json) and the real onsets of
  the events kept, ending 2 s after the last one. ``UPPT001`` carries a 64 pulse per kept image and a
  final 32. For the planning test the runs are empty ``*_meg.ds`` folders (planning never opens them);
* ``sourcedata/sample_attributes_P1.csv`` (git-annexed, not in the shared copy), one row per event;
  THINGS concept names are not in the sidecars, so image paths are ``concept<NNNN>/...`` made from
  ``things_category_nr``; and one tiny JPEG per THINGS image number;
* junk a real download carries: macOS ``._*`` files and eye-tracking ``physio.tsv.gz`` beside the
  runs, which must never be taken for runs.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from pathlib import Path

import mne
import numpy as np
import pytest
from mne.io.constants import FIFF
from PIL import Image

from braindecode_fw.data.convert.things_meg import (
    ThingsMEGConverter,
    ThingsMEGInputError,
    _split,
    convert_things_meg,
    discover_subjects,
    open_run,
    read_run_sidecars,
)
from braindecode_fw.data.meg_layout import (
    clean_channel_name,
    sensor_positions,
    things_meg_channel_names,
    valid_positions,
)
from braindecode_fw.data.store import open_store
from tests.realdata import realdata

REAL = realdata("things_meg_ds004212")
SUB = "sub-BIGMEG1"
RUNS = sorted((int(m.group(1)), int(m.group(2))) for p in (REAL / SUB).glob("ses-*/meg/*_events.tsv")
              if (m := re.search(r"_ses-(\d+)_task-main_run-(\d+)_events", p.name)))
TOP = ("dataset_description.json", "participants.tsv", "participants.json", "README", "CHANGES",
       "task-main_events.json", "sourcedata/category_mat_manual.tsv")


def _prefix(ses: int, run: int) -> str:
    return f"{SUB}_ses-{ses:02d}_task-main_run-{run:02d}"


def _events(ses: int, run: int) -> list[dict[str, str]]:
    with open(REAL / SUB / f"ses-{ses:02d}/meg/{_prefix(ses, run)}_events.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _concept(cat: str) -> str:
    return f"concept{int(float(cat)):04d}"


def _write_recording(path: Path, ses: int, run: int, onsets: np.ndarray, rng: np.random.Generator) -> None:
    """A FIF run with channels.tsv's names, types and order and meg.json's rate, 2 s past the last onset."""
    meg_dir = REAL / SUB / f"ses-{ses:02d}/meg"
    sfreq = float(json.loads((meg_dir / f"{_prefix(ses, run)}_meg.json").read_text())["SamplingFrequency"])
    with open(meg_dir / f"{_prefix(ses, run)}_channels.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    # channels.tsv types -> what MNE's CTF reader gives: sensors (OTHER) are mag with CTF gradiometer
    # coils, references ref_meg, UPPT001 the trigger (stim; typed MISC in channels.tsv)
    kinds = {"OTHER": ("mag", FIFF.FIFFV_COIL_CTF_GRAD), "MEGREFMAG": ("ref_meg", FIFF.FIFFV_COIL_CTF_REF_MAG),
             "MEGREFGRADAXIAL": ("ref_meg", FIFF.FIFFV_COIL_CTF_REF_GRAD), "MISC": ("misc", None)}
    names = [r["name"] for r in rows]
    types = ["stim" if n == "UPPT001" else kinds[r["type"]][0] for n, r in zip(names, rows, strict=True)]
    info = mne.create_info(names, sfreq, types)
    for ch, r in zip(info["chs"], rows, strict=True):
        coil = kinds[r["type"]][1]
        if coil is not None:
            ch["coil_type"] = coil
    n = int(round((onsets.max() + 2.0) * sfreq))
    data = rng.normal(0.0, 1e-13, (len(names), n)).astype(np.float32).astype(np.float64)
    meg = np.asarray(types) == "mag"
    samples = np.round(onsets * sfreq).astype(int)
    bump = np.exp(-0.5 * ((np.arange(int(0.3 * sfreq)) / sfreq - 0.17) / 0.04) ** 2)
    stim = np.zeros(n)
    for s0 in samples:
        data[meg, s0:s0 + len(bump)] += 3e-13 * bump
        stim[s0:s0 + 10] = 64
    stim[samples.max() + int(1.5 * sfreq):][:10] = 32
    data[names.index("UPPT001")] = stim
    mne.io.RawArray(data, info, verbose=False).save(path, overwrite=True, verbose=False)


def build_tree(dst: Path, keep: dict[tuple[int, int], int] | None, *, runs: list[tuple[int, int]] = RUNS,
               recordings: bool = True, seed: int = 0) -> dict:
    """The temporary BIDS tree described in the module docstring. ``keep[(ses, run)]`` = how many of the
    run's first events.tsv rows to keep (the copy is cut, written line by line as in the original);
    ``keep=None`` links every events.tsv whole. Returns the tree's paths and the kept events."""
    root, images = dst / "ds004212", dst / "THINGS-images"
    for name in TOP:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(REAL / name, root / name)
    rng = np.random.default_rng(seed)
    attributes, kept = [], {}
    for ses, run in runs:
        src, out = REAL / SUB / f"ses-{ses:02d}/meg", root / SUB / f"ses-{ses:02d}/meg"
        out.mkdir(parents=True, exist_ok=True)
        p = _prefix(ses, run)
        for f in src.glob(f"{p}_*"):
            if not f.name.endswith("_events.tsv"):
                os.symlink(f, out / f.name)  # channels.tsv, meg.json, coordsystem.json, physio.json
        ev = _events(ses, run)
        if keep is None:
            os.symlink(src / f"{p}_events.tsv", out / f"{p}_events.tsv")
        else:
            ev = ev[:keep.get((ses, run), 1)]
            lines = (src / f"{p}_events.tsv").read_text().splitlines(keepends=True)
            (out / f"{p}_events.tsv").write_text("".join(lines[:len(ev) + 1]))
        kept[(ses, run)] = ev
        with gzip.open(out / f"{p}_recording-eyetracking_physio.tsv.gz", "wt") as f:
            f.write("0.1\t0.2\t0.3\t0.4\t0.5\n")
        (out / f"._{p}_meg.fif").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource forks
        (out / f"._{p}_events.tsv").write_bytes(b"\x00\x05\x16\x07")
        if recordings:
            _write_recording(out / f"{p}_meg.fif", ses, run, np.asarray([float(e["onset"]) for e in ev]), rng)
        else:
            (out / f"{p}_meg.ds").mkdir()
        for e in ev:
            tt = e["trial_type"]
            if tt == "catch":
                path = f"images_catch_meg/catch{len(attributes):05d}.jpg"
            elif tt == "test":
                path = f"images_test_meg/{_concept(e['things_category_nr'])}_{int(float(e['value']))}s.jpg"
            else:
                c = _concept(e["things_category_nr"])
                path = f"images_meg/{c}/{c}_{int(float(e['value']))}b.jpg"
            attributes.append({"trial_type": tt, "things_image_nr": "" if tt == "catch" else e["value"],
                               "category_nr": "" if tt == "catch" else e["things_category_nr"],
                               "session_nr": ses, "run_nr": run, "image_path": path})
    (root / "sourcedata").mkdir(exist_ok=True)
    with open(root / "sourcedata/sample_attributes_P1.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(attributes[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(attributes)
    one = dst / "one.jpg"
    Image.new("RGB", (8, 8), (120, 60, 30)).save(one)
    for a in attributes:
        if a["trial_type"] != "catch":
            stem = Path(a["image_path"]).stem
            target = images / "_".join(stem.split("_")[:-1]) / f"{stem}.jpg"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(one, target)
    return {"root": root, "images_root": images, "events": kept}


def _cfg(tree: dict, store: Path, **kw) -> dict:
    return {"root": str(tree["root"]), "images_root": str(tree["images_root"]), "store": str(store),
            "image_size": 8, "progress": False, **kw}


# ---------------------------------------------------------------------------------------------
# The real sidecars themselves
# ---------------------------------------------------------------------------------------------


def test_real_sidecars_are_read_as_they_are():
    sc = read_run_sidecars(REAL / SUB / f"ses-01/meg/{_prefix(1, 1)}_meg.ds")
    assert sc.meg_names == things_meg_channel_names(suffix="-1609")  # the 272 sensors typed OTHER, in order
    assert sc.n_typed_other == 272 and sc.meg_channel_count == 272 and sc.sfreq == 1200.0
    assert sc.coord_units == "cm" and sc.coord_max_abs < 0.1  # "cm", but metres
    missing = read_run_sidecars(REAL / SUB / f"ses-03/meg/{_prefix(3, 1)}_meg.ds")
    assert missing.coord_units is None and missing.meg_names is not None  # the one run without coordsystem.json


# ---------------------------------------------------------------------------------------------
# Planning over every real events.tsv (recordings are placeholders: planning never opens them)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_plan(tmp_path_factory):
    tree = build_tree(tmp_path_factory.mktemp("plan"), None, recordings=False)
    conv = ThingsMEGConverter(_cfg(tree, tree["root"].parent / "store"))
    conv.locate()
    return tree, conv, conv.plan()


def test_plan_of_all_120_real_runs_reports_what_the_sidecars_say(full_plan):
    tree, conv, plan = full_plan
    assert discover_subjects(tree["root"]) == ["BIGMEG1"]  # BIGMEG2-4 and emptyroom have no runs here
    (p,) = plan.subjects
    meg_dirs = list((tree["root"] / SUB).glob("ses-*/meg"))
    assert len(list(tree["root"].glob(f"{SUB}/ses-*/meg/._*_meg.fif"))) == 120  # the junk is there ...
    assert len(list(tree["root"].glob(f"{SUB}/ses-*/meg/*_physio.*"))) == 240 and len(meg_dirs) == 12
    # ... and only the 120 placeholder runs are runs (no ._*, physio, json or tsv)
    assert sorted(rp.path for rp in p.runs) == sorted(d / f"{_prefix(s, r)}_meg.ds" for s, r in RUNS
                                                      for d in meg_dirs if d.parent.name == f"ses-{s:02d}")
    assert len(p.value) == 22248 + 2400 and p.n_catch == 2400
    checked = "\n".join(conv.checked)
    assert "sub-BIGMEG1: events per run: 72 run(s) of 225 (20 test, 20 catch), 48 run(s) of 226 (20 test, 20 catch)" \
        in checked
    assert "sub-BIGMEG1: 2400 catch trial(s) (N/A THINGS numbers) dropped" in checked
    assert "sub-BIGMEG1: events.tsv sample = onset x the sampling rate on all 27048 rows" in checked
    assert "sub-BIGMEG1: 200 test image(s), 200 shown 12x over 12 session(s)" in checked
    assert "sub-BIGMEG1: 22248 exp image(s), 22248 shown once" in checked
    assert ("sub-BIGMEG1: the 22448 image(s) have one THINGS concept each, 1854 concept(s) within the 1854 rows "
            "of sourcedata/category_mat_manual.tsv") in checked
    assert ("sub-BIGMEG1: channels.tsv of 120/120 runs list 272 MEG sensors (typed OTHER in 120 run(s): "
            "recognised by their CTF sensor names)") in checked
    assert "sub-BIGMEG1: meg.json SamplingFrequency 1200 Hz in 120/120 runs" in checked
    (note,) = [n for n in conv.not_checked if "coordsystem.json" in n]
    assert "119/120 runs have one (missing: sub-BIGMEG1_ses-03_task-main_run-01_coordsystem.json)" in note
    assert re.search(r"119 say units 'cm' with head-coil coordinates of at most 0\.0\d+ \(metres, not cm\)", note)
    assert conv.warnings == []
    split = _split(p, plan.test_concepts, conv.cfg)
    assert len(plan.test_concepts) == 200
    assert (split == "test").sum() == 2400 and (split == "test_large").sum() == 2400
    assert np.isin(split, ["train", "val"]).sum() == 19848
    assert len(plan.images.values) == 22448 and plan.images.values.min() >= 1 and plan.images.values.max() <= 26107


def test_a_placeholder_ds_is_refused_naming_it(full_plan):
    tree, _, plan = full_plan
    path = plan.subjects[0].runs[0].path
    with pytest.raises(ThingsMEGInputError, match=rf"{re.escape(str(path))}: cannot be read as a CTF \(\.ds folder\) "
                                                  r"recording \(.*res4 not found"):
        open_run(path)


# ---------------------------------------------------------------------------------------------
# End to end: every real run, recordings cut after the events kept
# ---------------------------------------------------------------------------------------------

# the first row of every run, and ses-01 run-02's first three (exp, test, catch: rows 1-3 of the real file)
KEEP = {(1, 2): 3}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tree = build_tree(tmp_path_factory.mktemp("e2e"), KEEP)
    summary = convert_things_meg(_cfg(tree, tree["root"].parent / "store", val_fraction=0.3))
    return tree, summary


@pytest.mark.slow
def test_all_real_runs_end_to_end_into_a_store(converted):
    tree, summary = converted
    store = open_store(summary["store"])
    sub = store.subjects["BIGMEG1"]
    events = tree["events"]
    kept = [(k, e) for k in RUNS for e in events[k] if e["trial_type"] != "catch"]
    assert [e["trial_type"] for e in events[(1, 2)]] == ["exp", "test", "catch"]
    x = np.asarray(sub.responses)
    assert x.shape == (len(kept), 272, 181) and len(kept) == 120 + 1
    assert np.isfinite(x).all() and np.abs(x).max() <= 20.0
    # geometry: the recording's (= channels.tsv's) sensor order, suffix dropped, every one placed
    geo = sub.sensor_geometry()
    assert geo["names"] == [clean_channel_name(n) for n in things_meg_channel_names(suffix="-1609")]
    assert valid_positions(geo["positions"]).all() and geo["sfreq"] == 120.0
    np.testing.assert_array_equal(geo["positions"], sensor_positions(geo["names"]))  # what the model reads
    t = sub.trials
    np.testing.assert_array_equal(t.session + 1, [k[0] for k, _ in kept])
    np.testing.assert_array_equal(t.run + 1, [k[1] for k, _ in kept])
    values = [int(float(e["value"])) for _, e in kept]  # "24812.0" -> 24812
    np.testing.assert_array_equal(np.asarray(store.image_metadata["source_ids"])[t.image_index], values)
    # trial_id = the row in acquisition order over the kept events (catch included)
    firsts = np.cumsum([0] + [len(events[k]) for k in RUNS])[:-1]
    expected_ids = [f + i for f, k in zip(firsts, RUNS, strict=True) for i, e in enumerate(events[k])
                    if e["trial_type"] != "catch"]
    np.testing.assert_array_equal(t.trial_id, expected_ids)
    st = summary["subjects"]["BIGMEG1"]
    assert st["n_runs"] == 120 and st["n_catch_dropped"] == 1 and st["layout"] == "CTF-275"
    run2 = [r for r in st["runs"] if (r["session"], r["run"]) == (1, 2)][0]
    assert (run2["n_events"], run2["n_test"], run2["n_trials"], run2["n_catch_dropped"]) == (3, 1, 2, 1)
    assert all(abs(r["trigger_minus_events_tsv_ms"]) < 1.0 for r in st["runs"])
    n_test = sum(e["trial_type"] == "test" for _, e in kept)
    assert st["split_counts"]["test"] == n_test > 0
    checked = "\n".join(summary["checked"])
    n_first_test = sum(events[k][0]["trial_type"] == "test" for k in RUNS if k != (1, 2))
    line = (f"sub-BIGMEG1: events per run: {119 - n_first_test} run(s) of 1 (0 test, 0 catch), {n_first_test} run(s) "
            f"of 1 (1 test, 0 catch), 1 run(s) of 3 (1 test, 1 catch)")
    assert line in checked
    assert f"sub-BIGMEG1: {n_test} test image(s), {n_test} shown 1x over 12 session(s)" in checked
    assert "channels.tsv of 120/120 runs list 272 MEG sensors (typed OTHER in 120 run(s)" in checked
    assert any("coordsystem.json not used" in n for n in summary["not_checked"])
    report = summary["report"]  # the printed report lists what the events and sidecars said
    assert "BIGMEG1" in report and "CTF-275" in report and f"checked: {line}" in report
    assert "not checked: sub-BIGMEG1: coordsystem.json not used" in report


def _small_tree(tmp_path: Path) -> dict:
    return build_tree(tmp_path, {(1, 1): 2}, runs=[(1, 1)])


def _tree_with_edited_recording(tmp_path: Path, edit) -> dict:
    """The small tree with its one recording re-saved after ``edit(raw)`` (returns the new raw)."""
    tree = _small_tree(tmp_path)
    run = tree["root"] / SUB / f"ses-01/meg/{_prefix(1, 1)}_meg.fif"
    raw = mne.io.read_raw_fif(run, preload=True, verbose="error")
    edit(raw).save(run, overwrite=True, verbose="error")
    return tree


def test_recording_rate_other_than_meg_json_names_both(tmp_path):
    tree = _tree_with_edited_recording(tmp_path, lambda raw: raw.resample(1000.0, verbose="error"))
    with pytest.raises(ThingsMEGInputError, match=rf"{_prefix(1, 1)}_meg\.fif: recorded at 1000 Hz, but "
                                                  rf"{_prefix(1, 1)}_meg\.json says SamplingFrequency 1200"):
        convert_things_meg(_cfg(tree, tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def test_recording_without_a_channels_tsv_sensor_names_it(tmp_path):
    tree = _tree_with_edited_recording(tmp_path, lambda raw: raw.drop_channels(["MLC11-1609"]))
    with pytest.raises(ThingsMEGInputError, match=r"its 271 MEG channels differ from the 272 MEG sensors of "
                                                  rf"{_prefix(1, 1)}_channels\.tsv \(only in the recording: \[\]; "
                                                  r"only in channels\.tsv: \['MLC11-1609'\]\)"):
        convert_things_meg(_cfg(tree, tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def test_a_fractional_things_number_names_the_file_and_line(tmp_path):
    tree = _small_tree(tmp_path)
    events = tree["root"] / SUB / f"ses-01/meg/{_prefix(1, 1)}_events.tsv"
    text = events.read_text()
    assert "\t24812.0\t" in text  # line 2 of the real file: value 24812.0
    events.write_text(text.replace("\t24812.0\t", "\t24812.5\t"))
    with pytest.raises(ThingsMEGInputError, match=rf"{_prefix(1, 1)}_events\.tsv: column value is 24812\.5 on line 2, "
                                                  r"expected a 1-based THINGS number"):
        convert_things_meg(_cfg(tree, tmp_path / "store"))
    assert not (tmp_path / "store").exists()
