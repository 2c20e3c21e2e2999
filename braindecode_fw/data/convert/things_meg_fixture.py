"""A miniature THINGS-MEG (OpenNeuro ds004212) in the real BIDS layout (docs/datasets/things_meg.md).

Same paths, file names, columns, index bases and channel names as the release, tiny durations:

* ``dataset_description.json``, ``participants.tsv`` (``sub-BIGMEG1`` ... plus ``sub-emptyroom``);
* ``sub-<label>/ses-NN/meg/sub-<label>_ses-NN_task-main_run-NN_meg.fif``: MNE cannot write CTF
  ``.ds``, so the raw runs are FIF at 1200 Hz with the 272 real sensor names (``MLC11-1609`` ...) as
  ``mag`` channels whose coil type is ``FIFFV_COIL_CTF_GRAD`` (so ``mne.find_layout`` answers
  ``CTF-275`` as for the real ``.ds``), two reference channels (``ref_meg``), one eye-tracker ``misc``
  channel and the ``UPPT001`` trigger (value 64 for 10 samples at each image onset, a final 32);
  data ~ N(0, 1e-13) T plus an image-dependent evoked bump 100-300 ms after each onset;
* ``..._events.tsv`` (``onset duration trial_type things_category_nr value sample``; catch rows
  ``N/A``), ``..._channels.tsv``, ``..._meg.json``;
* ``sourcedata/sample_attributes_P{n}.csv``: one row per trial in acquisition order;
* ``derivatives/preprocessed/preprocessed_P{n}-epo.fif``: Hebart's epochs, ``(n_trials, 271, 281)``
  at 200 Hz from -0.1 s, ``events[:, 2] = image_nr``, metadata = the sample attributes;
* ``<images_root>/<concept>/<stem>.jpg``: small flat-colour JPEGs (:func:`fixture_colour`) for every
  exp/test image, none for catch images.

Every run shows each test image once, so test images repeat across runs and sessions; some exp
images belong to the test concepts, so Benchetrit's "large" test set is non-empty.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SFREQ = 1200.0
HEBART_SFREQ = 200.0
HEBART_TMIN = -0.1
HEBART_TIMES = 281  # -0.1 .. 1.3 s at 200 Hz
TRIGGER_CHANNEL = "UPPT001"
# (concept, THINGS concept number); the first TEST_CONCEPTS have a test image
CONCEPTS = (("baby", 101), ("pine_tree", 1260), ("aardvark", 1), ("ice_cream", 830), ("banana", 110),
            ("bicycle", 160), ("teapot", 1700), ("zebra", 1854), ("golf_ball", 700), ("sea_lion", 1400))
TEST_CONCEPTS = 3
SAMPLE_ATTRIBUTE_COLUMNS = ("trial_type", "image_nr", "category_nr", "things_image_nr", "session_nr",
                            "run_nr", "trial_nr", "image_on", "image_off", "image_path")
EVENT_COLUMNS = ("onset", "duration", "trial_type", "things_category_nr", "value", "sample")


def fixture_colour(things_image_nr: int) -> tuple[int, int, int]:
    """The flat RGB colour of THINGS image ``things_image_nr`` in the fixture (unique per image)."""
    i = int(things_image_nr)
    return (37 * i) % 256, (91 * i + 60) % 256, (13 * i + 120) % 256


def _things_meg_names(suffix: str = "-1609") -> list[str]:
    from braindecode_fw.data.meg_layout import things_meg_channel_names

    return things_meg_channel_names(suffix=suffix)


def _write_tsv(path: Path, header: Sequence[str], rows: list[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _fmt(v: float | None) -> str:
    return "N/A" if v is None else f"{v:.1f}"


def _design_run(rng: np.random.Generator, n_exp: int, n_test: int, n_catch: int, exp_pool: list[dict],
                test_images: list[dict], catch_start: int) -> list[dict]:
    """Trials of one run in presentation order: ``n_exp`` new exp images, every test image, catches."""
    trials = [exp_pool.pop(0) for _ in range(n_exp)]
    trials += [dict(t) for t in test_images[:n_test]]
    trials += [{"trial_type": "catch", "concept": None, "category": None, "value": None,
                "stem": f"catch{catch_start + k:03d}"} for k in range(n_catch)]
    return [trials[i] for i in rng.permutation(len(trials))]


def write_things_meg_fixture(
    root: str | Path,
    subjects: Sequence[str] = ("BIGMEG1",),
    n_sessions: int = 1,
    n_runs: int = 2,
    *,
    n_exp: int = 14,
    n_test: int = TEST_CONCEPTS,
    n_catch: int = 3,
    images_root: str | Path | None = None,
    image_side: int = 16,
    trigger_lag: float = 0.0,
    hebart: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the THINGS-MEG fixture described above under ``root``; return a description of what was written.

    Each run has ``n_exp + n_test + n_catch`` trials (SOA uniform in 1.25-1.70 s, first onset 2 s,
    run ends 2 s after the last onset). ``trigger_lag`` (s) delays the ``UPPT001`` pulses relative to
    the events.tsv onsets (the real data's triggers and photodiode differ by ~150 ms). Images go to
    ``images_root`` (default ``<root>/../THINGS-images``). Returns ``{"root", "images_root",
    "runs": [{"subject", "session", "run", "path", "events", "trials"}], "test_concepts", ...}``.
    """
    import mne
    from mne.io.constants import FIFF
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images_root = Path(images_root) if images_root is not None else root.parent / "THINGS-images"
    rng = np.random.default_rng(seed)
    names = _things_meg_names()
    refs = ["BG1-1609", "G11-1609"]
    miscs = ["UADC005-2104"]
    n_meg = len(names)

    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "THINGS-MEG (miniature fixture)", "BIDSVersion": "1.2.1", "License": "CC0"}, indent=2))
    _write_tsv(root / "participants.tsv", ("participant_id", "sex", "age"),
               [(f"sub-{s}", "F" if i % 2 else "M", 23) for i, s in enumerate(subjects)] + [("sub-emptyroom", "n/a", "n/a")])

    # ---- images: test images (one per test concept, stem ends in "s"), exp images ("b") -----
    test_images = [{"trial_type": "test", "concept": c, "category": k, "value": 20000 + 10 * j,
                    "stem": f"{c}_{18 + j:02d}s"} for j, (c, k) in enumerate(CONCEPTS[:TEST_CONCEPTS])]
    n_trials_exp = n_exp * n_runs * n_sessions
    exp_images = []
    for i in range(n_trials_exp):  # cycle over all concepts: test concepts get exp images too
        c, k = CONCEPTS[i % len(CONCEPTS)]
        nr = i // len(CONCEPTS) + 1
        exp_images.append({"trial_type": "exp", "concept": c, "category": k, "value": 1000 + i,
                           "stem": f"{c}_{nr:02d}b"})
    for im in test_images + exp_images:
        d = images_root / im["concept"]
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (image_side, image_side), fixture_colour(im["value"])).save(d / f"{im['stem']}.jpg",
                                                                                   quality=95)
    image_nr = {im["value"]: j + 1 for j, im in enumerate(sorted(test_images + exp_images, key=lambda m: m["value"]))}

    runs: list[dict[str, Any]] = []
    for si, subject in enumerate(subjects):
        sub_pool = [dict(im) for im in exp_images]  # every subject sees the same exp images (like THINGS)
        sub_rng = np.random.default_rng(seed + 1000 * (si + 1))
        attributes: list[dict[str, Any]] = []
        subject_trials: list[dict[str, Any]] = []
        catch_count = 0
        for ses in range(1, n_sessions + 1):
            meg_dir = root / f"sub-{subject}/ses-{ses:02d}/meg"
            meg_dir.mkdir(parents=True, exist_ok=True)
            for run in range(1, n_runs + 1):
                trials = _design_run(sub_rng, n_exp, n_test, n_catch, sub_pool, test_images, catch_count)
                catch_count += n_catch
                soa = sub_rng.uniform(1.25, 1.70, len(trials))
                onsets = 2.0 + np.r_[0.0, np.cumsum(soa[:-1])]
                samples = np.round(onsets * SFREQ).astype(int)
                n_samples = int(round((onsets[-1] + 2.0) * SFREQ))
                data = rng.normal(0.0, 1e-13, (n_meg + len(refs) + len(miscs) + 1, n_samples))
                data[n_meg:n_meg + len(refs)] *= 10.0
                data[n_meg + len(refs):-1] = rng.normal(0.0, 1.0, (len(miscs), n_samples))
                t_bump = np.arange(int(0.3 * SFREQ)) / SFREQ
                bump = np.exp(-0.5 * ((t_bump - 0.17) / 0.04) ** 2) * (t_bump >= 0.1)
                stim = np.zeros(n_samples)
                for tr, s0 in zip(trials, samples, strict=True):
                    key = int(tr["category"] or 0)
                    pattern = np.random.default_rng(key).normal(0.0, 3e-13, n_meg)
                    data[:n_meg, s0:s0 + len(bump)] += pattern[:, None] * bump
                    p0 = s0 + int(round(trigger_lag * SFREQ))
                    stim[p0:p0 + 10] = 64
                end = samples[-1] + int(1.5 * SFREQ)
                stim[end:end + 10] = 32
                data[-1] = stim
                ch_names = names + refs + miscs + [TRIGGER_CHANNEL]
                types = ["mag"] * n_meg + ["ref_meg"] * len(refs) + ["misc"] * len(miscs) + ["stim"]
                info = mne.create_info(ch_names, SFREQ, types)
                for ch in info["chs"][:n_meg]:
                    ch["coil_type"] = FIFF.FIFFV_COIL_CTF_GRAD
                for ch in info["chs"][n_meg:n_meg + len(refs)]:
                    ch["coil_type"] = FIFF.FIFFV_COIL_CTF_REF_GRAD
                prefix = f"sub-{subject}_ses-{ses:02d}_task-main_run-{run:02d}"
                path = meg_dir / f"{prefix}_meg.fif"
                mne.io.RawArray(data, info, verbose=False).save(path, overwrite=True, verbose=False)

                ev_rows = []
                for tr, on, s0 in zip(trials, onsets, samples, strict=True):
                    ev_rows.append((f"{on:.6f}", "0.5", tr["trial_type"], _fmt(tr["category"]), _fmt(tr["value"]),
                                    int(s0)))
                _write_tsv(meg_dir / f"{prefix}_events.tsv", EVENT_COLUMNS, ev_rows)
                _write_tsv(meg_dir / f"{prefix}_channels.tsv",
                           ("name", "type", "units", "low_cutoff", "high_cutoff", "description",
                            "sampling_frequency", "status"),
                           [(n, "OTHER", "T", 0, 600, "n/a", SFREQ, "good") for n in names]
                           + [(n, "MEGREFGRADAXIAL", "T", 0, 600, "n/a", SFREQ, "good") for n in refs]
                           + [(n, "MISC", "V", 0, 600, "n/a", SFREQ, "good") for n in [*miscs, TRIGGER_CHANNEL]])
                (meg_dir / f"{prefix}_meg.json").write_text(json.dumps({
                    "TaskName": "main", "Manufacturer": "CTF", "SamplingFrequency": SFREQ,
                    "PowerLineFrequency": 60, "MEGChannelCount": n_meg, "MEGREFChannelCount": len(refs),
                    "MiscChannelCount": len(miscs) + 1, "RecordingType": "continuous",
                    "RecordingDuration": n_samples / SFREQ}, indent=2))
                for k, (tr, on) in enumerate(zip(trials, onsets, strict=True)):
                    if tr["trial_type"] == "catch":
                        path_img = f"images_catch_meg/{tr['stem']}.jpg"
                    elif tr["trial_type"] == "test":
                        path_img = f"images_test_meg/{tr['stem']}.jpg"
                    else:
                        path_img = f"images_meg/{tr['concept']}/{tr['stem']}.jpg"
                    attributes.append({
                        "trial_type": tr["trial_type"],
                        "image_nr": image_nr.get(tr["value"], 0) if tr["value"] is not None else 99999,
                        "category_nr": tr["category"] if tr["category"] is not None else "",
                        "things_image_nr": tr["value"] if tr["value"] is not None else "",
                        "session_nr": ses, "run_nr": run, "trial_nr": k + 1,
                        "image_on": f"{on:.4f}", "image_off": f"{on + 0.5:.4f}", "image_path": path_img,
                    })
                subject_trials += [{**tr, "session": ses, "run": run, "onset": float(on), "sample": int(s0)}
                                   for tr, on, s0 in zip(trials, onsets, samples, strict=True)]
                runs.append({"subject": subject, "session": ses, "run": run, "path": path,
                             "events": meg_dir / f"{prefix}_events.tsv", "trials": trials,
                             "onsets": onsets, "samples": samples})
        n = int(subject[-1]) if subject[-1].isdigit() else si + 1
        src = root / "sourcedata"
        src.mkdir(exist_ok=True)
        with open(src / f"sample_attributes_P{n}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SAMPLE_ATTRIBUTE_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(attributes)
        if hebart:
            _write_hebart(root / f"derivatives/preprocessed/preprocessed_P{n}-epo.fif", attributes, subject_trials,
                          np.random.default_rng(seed + 7 + si))
    return {"root": root, "images_root": images_root, "runs": runs, "subjects": list(subjects),
            "test_concepts": [c for c, _ in CONCEPTS[:TEST_CONCEPTS]],
            "test_values": [im["value"] for im in test_images], "exp_values": [im["value"] for im in exp_images]}


def _write_hebart(path: Path, attributes: list[dict[str, Any]], trials: list[dict[str, Any]],
                  rng: np.random.Generator) -> None:
    """Hebart's derivative: ``EpochsArray`` ``(n, 271, 281)`` at 200 Hz, tmin -0.1 s, metadata = the
    sample attributes (as a list of records: MNE stores metadata as JSON and reads it back as a
    DataFrame when pandas is installed, else as the same list)."""
    import mne
    from mne.io.constants import FIFF

    from braindecode_fw.data.meg_layout import HEBART_DERIVATIVE_DROPPED

    names = [n for n in _things_meg_names() if n.split("-")[0] not in HEBART_DERIVATIVE_DROPPED]
    info = mne.create_info(names, HEBART_SFREQ, "mag")
    for ch in info["chs"]:
        ch["coil_type"] = FIFF.FIFFV_COIL_CTF_GRAD
    n = len(attributes)
    t = HEBART_TMIN + np.arange(HEBART_TIMES) / HEBART_SFREQ
    data = rng.normal(0.0, 1.0, (n, len(names), HEBART_TIMES))
    bump = np.exp(-0.5 * ((t - 0.17) / 0.04) ** 2)
    for i, tr in enumerate(trials):
        pattern = np.random.default_rng(int(tr["category"] or 0)).normal(0.0, 2.0, len(names))
        data[i] += pattern[:, None] * bump
    events = np.c_[np.arange(n) * 2000 + 1000, np.zeros(n, int), [int(a["image_nr"]) for a in attributes]]
    metadata = [{k: (float(v) if k in ("category_nr", "things_image_nr") and v != "" else v) for k, v in a.items()}
                for a in attributes]
    for m in metadata:
        for k in ("category_nr", "things_image_nr"):
            if m[k] == "":
                m[k] = None
    try:  # MNE wants a DataFrame when pandas is installed, and takes a list of records otherwise
        import pandas as pd

        metadata = pd.DataFrame.from_records(metadata)
    except ImportError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = mne.EpochsArray(data, info, events=events, tmin=HEBART_TMIN, metadata=metadata, baseline=None,
                             verbose=False)
    epochs.save(path, overwrite=True, verbose=False)
