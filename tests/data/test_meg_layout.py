"""MEG sensor layout (CTF-275 via MNE) and the shared epoch preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from braindecode_fw.data.meg_layout import (
    MISSING_POSITION,
    THINGS_MEG_MISSING,
    clean_channel_name,
    layout_channel_names,
    sensor_positions,
    things_meg_channel_names,
    valid_positions,
)
from braindecode_fw.data.meg_preprocessing import RobustScaling, baseline_correct


def test_things_meg_channels_and_positions():
    import mne

    names = things_meg_channel_names()
    assert len(layout_channel_names()) == 275 and len(names) == 272
    assert not set(THINGS_MEG_MISSING) & set(names) and names[0] == "MLC11"
    assert things_meg_channel_names("-1609")[0] == "MLC11-1609" and clean_channel_name("MRO13-2622") == "MRO13"
    pos = sensor_positions(things_meg_channel_names("-1609") + ["UPPT001"])
    assert valid_positions(pos).tolist() == [True] * 272 + [False]
    assert (pos[-1] == MISSING_POSITION).all()
    # min-max over the whole 275-sensor layout: a reference from MNE's layout directly
    layout = mne.channels.read_layout("CTF-275")
    xy = layout.pos[:, :2]
    ref = (xy - xy.min(0)) / (xy.max(0) - xy.min(0))
    i = [n.split("-")[0] for n in layout.names].index("MRT57")
    np.testing.assert_allclose(pos[names.index("MRT57")], ref[i], rtol=1e-6)
    assert pos[:272].min() >= 0 and pos[:272].max() <= 1


def test_baseline_and_robust_scaling_against_direct_computation():
    rng = np.random.default_rng(0)
    times = np.linspace(-0.5, 1.0, 181)
    x = rng.standard_normal((7, 5, 181)) * 1e-13 + 3e-13
    b = baseline_correct(x, times)
    np.testing.assert_allclose(b[..., times <= 0].mean(-1), 0, atol=1e-25)
    np.testing.assert_allclose(b - x, -x[..., times <= 0].mean(-1, keepdims=True) * np.ones_like(x), rtol=1e-12)
    with pytest.raises(ValueError, match="baseline window"):
        baseline_correct(x, times, (1.5, 2.0))
    scaling = RobustScaling.fit(x)
    flat = np.moveaxis(x, 1, 0).reshape(5, -1)
    np.testing.assert_allclose(scaling.median, np.median(flat, 1))
    np.testing.assert_allclose(scaling.iqr, np.percentile(flat, 75, 1) - np.percentile(flat, 25, 1))
    y = scaling.apply(x, clamp=1.0)
    assert y.dtype == np.float32 and np.abs(y).max() == pytest.approx(1.0)
    unclamped = scaling.apply(x)
    np.testing.assert_allclose(np.median(np.moveaxis(unclamped, 1, 0).reshape(5, -1), 1), 0, atol=1e-6)
    np.testing.assert_allclose(y, np.clip(unclamped, -1, 1))
