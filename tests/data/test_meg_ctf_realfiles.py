"""The MEG reading path on real CTF recordings (../shared/realdata/ctf, MNE's testing data).

Each ``.ds`` is opened the way the THINGS-MEG converter opens a run (:func:`open_run`, i.e.
``mne.io.read_raw_ctf``) and compared with ``<name>.ds_raw.fif`` beside it, MNE's own conversion:
data, channel names and types, rate, sensor locations and the 2-D positions the spatial attention
uses. Then the converter's per-run preprocessing (resampling to 120 Hz, epoching, baseline, robust
scaling, clamping) runs on them unchanged.

* ``testdata_ctf_short_discontinuous.ds``: 1200 Hz, 356 channels (273 MEG of a CTF-275), 2 s from two
  discontinuous trials (MNE reads them as one continuous 2,402-sample run, with no boundary annotation);
* ``somMDYO-18av.ds``: older res4, 1250 Hz, an averaged 0.5 s recording of a CTF-151 system
  (151 MEG channels, 3rd-order gradient compensation: coil types ``CTF_GRAD + (3 << 16)``); 7 of its
  sensors have no position in MNE's CTF-275 layout.
"""

from __future__ import annotations

import csv
from pathlib import Path

import mne
import numpy as np
import pytest

from braindecode_fw.data.convert.things_meg import (
    RunPlan,
    ThingsMEGConvertConfig,
    ThingsMEGInputError,
    _check_layout,
    _process_run,
    open_run,
    read_events_tsv,
)
from braindecode_fw.data.meg_layout import (
    CTF_LAYOUT,
    clean_channel_name,
    sensor_positions,
    valid_positions,
)
from braindecode_fw.data.meg_preprocessing import RobustScaling, baseline_correct
from tests.realdata import realdata

CTF = realdata("ctf")
SHORT = "testdata_ctf_short_discontinuous.ds"
AVERAGED = "somMDYO-18av.ds"
# name -> (rate, channels, samples, MEG channels, compensation grade)
EXPECTED = {SHORT: (1200.0, 356, 2402, 273, 0), AVERAGED: (1250.0, 181, 626, 151, 3)}
NOT_IN_CTF275 = ["MLC33", "MLC43", "MLP13", "MRC33", "MRC43", "MRP13", "MZP02"]  # CTF-151 sensors


def _pair(name: str) -> tuple[mne.io.BaseRaw, mne.io.BaseRaw]:
    raw = open_run(CTF / name, preload=True)
    ref = mne.io.read_raw_fif(CTF / f"{name}_raw.fif", preload=True, verbose="error")
    return raw, ref


@pytest.mark.parametrize("name", [SHORT, AVERAGED])
def test_ds_matches_the_fif_reference(name):
    raw, ref = _pair(name)
    sfreq, n_ch, n_times, n_meg, grade = EXPECTED[name]
    assert type(raw).__name__ == "RawCTF"  # open_run went through mne.io.read_raw_ctf
    assert raw.ch_names == ref.ch_names and len(raw.ch_names) == n_ch
    assert raw.get_channel_types() == ref.get_channel_types()
    assert raw.info["sfreq"] == ref.info["sfreq"] == sfreq
    assert raw.n_times == ref.n_times == n_times and raw.first_samp == ref.first_samp == 0
    assert raw.compensation_grade == ref.compensation_grade == grade
    types = np.asarray(raw.get_channel_types())
    assert (types == "mag").sum() == n_meg
    d, r = raw.get_data(), ref.get_data()
    # the FIF stores float32: every channel agrees to float32 rounding (measured <= 1.1e-7 relative)
    scale = np.maximum(np.abs(r).max(axis=1), 1e-30)
    assert (np.abs(d - r).max(axis=1) / scale).max() < 1e-6
    meg = types == "mag"
    assert np.abs(d[meg] - r[meg]).max() < 1e-16  # Tesla; measured 6.3e-18 (short) and 3.9e-17 (averaged)
    assert np.abs(r[meg]).max() > 1e-11  # real field values, not zeros
    # MEG sensor geometry: coil types and 3-D locations (position + orientation) as in the reference
    chs, ref_chs = mne.pick_info(raw.info, np.flatnonzero(meg))["chs"], mne.pick_info(ref.info, np.flatnonzero(meg))["chs"]
    assert [c["coil_type"] for c in chs] == [c["coil_type"] for c in ref_chs]
    np.testing.assert_allclose([c["loc"] for c in chs], [c["loc"] for c in ref_chs], atol=1e-6)
    np.testing.assert_allclose(raw.info["dev_head_t"]["trans"], ref.info["dev_head_t"]["trans"], atol=1e-6)


@pytest.mark.parametrize("name", [SHORT, AVERAGED])
def test_sensor_positions_as_the_spatial_attention_uses_them(name):
    raw, ref = _pair(name)
    raw.pick("mag")
    ref.pick("mag")
    assert mne.channels.find_layout(raw.info).kind == mne.channels.find_layout(ref.info).kind == CTF_LAYOUT
    pos = sensor_positions(raw.ch_names)
    np.testing.assert_array_equal(pos, sensor_positions(ref.ch_names))
    ok = valid_positions(pos)
    missing = sorted(clean_channel_name(n) for n, k in zip(raw.ch_names, ok, strict=True) if not k)
    assert missing == ([] if name == SHORT else NOT_IN_CTF275)
    assert ((pos[ok] >= 0) & (pos[ok] <= 1)).all()
    # the name-based 2-D layout follows the recording's own sensor geometry (device x right, y front)
    loc = np.asarray([c["loc"][:3] for c in raw.info["chs"]])
    assert np.corrcoef(pos[ok, 0], loc[ok, 0])[0, 1] > 0.9  # measured 0.98 / 0.95
    assert np.corrcoef(pos[ok, 1], loc[ok, 1])[0, 1] > 0.9  # measured 0.98 / 0.97
    if name == SHORT:
        assert _check_layout(raw.info, raw.ch_names, CTF / name) == CTF_LAYOUT
    else:  # a CTF-151 run is refused by the converter, naming the sensors without a CTF-275 position
        with pytest.raises(ThingsMEGInputError, match=r"somMDYO-18av\.ds: channel\(s\) \['MLC33-606'"):
            _check_layout(raw.info, raw.ch_names, CTF / name)


def _run_plan(tmp_path: Path, ds: Path, onsets: list[float], trial_types: list[str], sfreq: float) -> RunPlan:
    events = tmp_path / "run_events.tsv"
    with open(events, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["onset", "duration", "trial_type", "things_category_nr", "value", "sample"])
        for i, (on, tt) in enumerate(zip(onsets, trial_types, strict=True)):
            num = "N/A" if tt == "catch" else f"{10.0 + i:.1f}"
            w.writerow([on, 0.5, tt, num, num, int(round(on * sfreq))])
    return RunPlan(session=1, run=1, path=ds, events_path=events, events=read_events_tsv(events), first_row=0)


def test_converter_preprocessing_on_a_real_ctf_run_matches_an_mne_epochs_reference(tmp_path):
    """_process_run (the converter's per-run step, default config: 120 Hz, -0.5..1.0 s, baseline
    (None, 0), robust scaling, clamp 20) on the real .ds, against mne.Epochs on the FIF reference."""
    onsets, types = [0.55, 0.75, 0.95], ["exp", "catch", "test"]
    rp = _run_plan(tmp_path, CTF / SHORT, onsets, types, 1200.0)
    cfg = ThingsMEGConvertConfig.from_mapping({})
    res = _process_run(rp, cfg)
    assert res.epochs.shape == (2, 273, 181)  # catch dropped; -0.5..1.0 s at 120 Hz = 181 samples
    assert res.epochs.dtype == np.float32 and np.isfinite(res.epochs).all()
    assert np.abs(res.epochs).max() <= 20.0 and res.layout == CTF_LAYOUT
    assert res.names == [n for n, t in zip(open_run(CTF / SHORT).ch_names,
                                           open_run(CTF / SHORT).get_channel_types(), strict=True) if t == "mag"]

    ref = mne.io.read_raw_fif(CTF / f"{SHORT}_raw.fif", preload=True, verbose="error").pick("mag")
    ref.resample(120.0, verbose="error")
    assert ref.n_times == 240  # 2,402 samples at 1200 Hz
    idx = np.round(np.asarray(onsets) * 120.0).astype(int)
    ev = np.c_[idx, np.zeros(3, int), np.ones(3, int)]
    epochs = mne.Epochs(ref, ev, tmin=-0.5, tmax=1.0, baseline=(None, 0), preload=True, verbose="error")
    x = epochs.get_data()
    assert x.shape == (3, 273, 181)
    q25, q50, q75 = np.percentile(np.moveaxis(x, 1, 0).reshape(273, -1), [25, 50, 75], axis=1)
    expected = np.clip((x[[0, 2]] - q50[:, None]) / (q75 - q25)[:, None], -20, 20)
    np.testing.assert_allclose(res.epochs, expected, atol=1e-3)  # measured max |diff| 4.3e-7 (values up to 3.6)


def test_preprocessing_steps_on_the_averaged_ctf151_recording():
    """The same steps on the 0.5 s, grade-3 compensated CTF-151 recording (the converter itself refuses
    its 7 sensors without a CTF-275 position): a -0.1..0.3 s window at 120 Hz is 49 samples."""
    raw = open_run(CTF / AVERAGED, preload=True).pick("mag")
    raw.resample(120.0, verbose="error")
    assert raw.n_times == 60  # 626 samples at 1250 Hz
    data = raw.get_data()
    i0, n_t = int(round(-0.1 * 120)), int(round(0.3 * 120)) - int(round(-0.1 * 120)) + 1
    starts = np.round(np.asarray([0.1, 0.14, 0.18]) * 120).astype(int) + i0
    epochs = np.moveaxis(data[:, starts[:, None] + np.arange(n_t)], 1, 0)
    times = (i0 + np.arange(n_t)) / 120.0
    assert epochs.shape == (3, 151, 49)
    base = baseline_correct(epochs, times, (None, 0.0))
    np.testing.assert_allclose(base[..., times <= 0].mean(-1), 0.0, atol=1e-6 * np.abs(base).max())
    scaled = RobustScaling.fit(base).apply(base, clamp=20.0)
    assert scaled.shape == (3, 151, 49) and np.isfinite(scaled).all() and np.abs(scaled).max() <= 20.0
    assert np.abs(np.median(scaled, axis=(0, 2))).max() < 1e-3  # median-centred per channel
