"""The synthetic MEG world: store contract, THINGS-MEG-like design, preprocessing, simulator
properties (lead field, time courses, 1/f noise, exact whitening), oracle, determinism, auto-prepare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
from omegaconf import OmegaConf

from braindecode_fw.data.meg_layout import things_meg_channel_names
from braindecode_fw.data.store import open_store
from braindecode_fw.data.synthetic import meg
from braindecode_fw.data.synthetic.meg_world import SyntheticMEGWorldConfig, generate_meg_world
from braindecode_fw.errors import OutputExistsError
from braindecode_fw.metrics.retrieval import retrieval_accuracy

REPO = Path(__file__).resolve().parents[3]
SMALL = {
    "sources_per_subject": [150, 200], "volume_shape": [10, 12, 10], "image_size": 32, "feature_resolution": 8,
    "n_test_images": 20, "test_repetitions": 4, "n_train_images": 40, "n_sessions": 4, "runs_per_session": 2,
    "snr": 0.05, "oracle_subset_size": 20, "oracle_n_subsets": 1,
}


def small_config(**changes) -> SyntheticMEGWorldConfig:
    return SyntheticMEGWorldConfig.from_mapping({**SMALL, **changes})


@pytest.fixture(scope="module")
def meg_store(tmp_path_factory) -> Path:
    """A small generated MEG world (2 subjects, 40 train images, 20 test images x 4). Read-only."""
    root = tmp_path_factory.mktemp("meg") / "synthetic_meg"
    generate_meg_world(small_config(), root)
    return root


def _truth(sub) -> dict[str, np.ndarray]:
    with np.load(sub.directory / "simulator.npz") as z:
        return {k: z[k] for k in z.files}


def test_store_contract_and_things_meg_design(meg_store):
    store = open_store(meg_store)
    cfg = small_config()
    assert store.modality == "meg" and list(store.subjects) == ["sub01", "sub02"]
    prov = store.meta["provenance"]
    assert prov["zscore_at_load"] is False and prov["config_fingerprint"] == cfg.fingerprint()
    names = things_meg_channel_names()
    train_images = []
    for sub in store.subjects.values():
        assert sub.responses.shape == (40 + 20 * 4, 272, 181) and sub.responses.dtype == np.float16
        geo = sub.sensor_geometry()
        assert geo["names"] == names and len(names) == 272
        assert geo["positions"].min() >= 0.0 and geo["positions"].max() <= 1.0
        assert geo["sfreq"] == 120.0 and geo["tmin"] == pytest.approx(-0.5)
        t = sub.trials
        counts = {k: int((t.split == k).sum()) for k in ("train", "val", "test")}
        assert counts == {"train": 36, "val": 4, "test": 80}  # val: 10 % of the 40 training images
        test_imgs, reps = np.unique(t.image_index[t.split == "test"], return_counts=True)
        np.testing.assert_array_equal(test_imgs, np.arange(20))  # the shared test set
        assert (reps == 4).all()
        for i in test_imgs:  # test_repetitions == n_sessions: once per session, repeats 0..3
            rows = t.image_index == i
            assert sorted(t.session[rows]) == [0, 1, 2, 3] and sorted(t.repeat[rows]) == [0, 1, 2, 3]
        own = t.image_index[t.split != "test"]
        assert len(np.unique(own)) == len(own) == 40  # training images shown once
        train_images.append(set(own.tolist()))
        assert set(np.unique(t.run)) == {0, 1}
    assert not train_images[0] & train_images[1]  # subject-specific training images


def test_preprocessing_baseline_then_robust_scaling_per_run(meg_store):
    """Stored = clamp((baseline-corrected - median_run) / iqr_run): per run and channel the median is 0
    and the IQR 1; undoing the scaling with the stored statistics gives baseline means of 0."""
    sub = open_store(meg_store).subjects["sub01"]
    truth = _truth(sub)
    x = np.asarray(sub.responses, dtype=np.float64)
    t = sub.trials
    times = truth["times"]
    base = (times >= -0.5 - 1e-9) & (times <= 1e-9)
    for r_i, (e, r) in enumerate(zip(truth["scaling_session"], truth["scaling_run"], strict=True)):
        rows = (t.session == e) & (t.run == r)
        flat = np.moveaxis(x[rows], 1, 0).reshape(272, -1)
        q25, q50, q75 = np.percentile(flat, [25, 50, 75], axis=1)
        assert np.abs(q50).max() < 0.01 and np.abs(q75 - q25 - 1).max() < 0.01  # float16 rounding
        raw = x[rows] * truth["scaling_iqr"][r_i][:, None] + truth["scaling_median"][r_i][:, None]
        baseline_mean = raw[..., base].mean(-1)
        assert np.abs(baseline_mean).max() < 2e-3 * raw.std()


def test_lead_field_is_smooth_and_dipolar(meg_store):
    sub = open_store(meg_store).subjects["sub02"]
    lf = _truth(sub)["lead_field"]  # (C, V)
    pos = sub.sensor_geometry()["positions"]
    assert lf.shape == (272, 200)
    np.testing.assert_allclose(np.linalg.norm(lf, axis=0), 1.0, rtol=1e-6)
    corr = np.corrcoef(lf)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    near = (dist > 0) & (dist < 0.08)
    far = dist > 0.5
    assert corr[near].mean() > 0.5 > np.abs(corr[far]).mean()
    # dipolar: each source has a positive and a negative lobe of comparable size
    assert ((lf.max(0) > 0.3 * np.abs(lf).max(0)) & (lf.min(0) < -0.3 * np.abs(lf).max(0))).all()


def test_time_courses_early_then_semantic(meg_store):
    """Image-specific noise-free sensor power peaks ~100 ms for the early population and at
    200-400 ms for the semantic one."""
    truth = _truth(open_store(meg_store).subjects["sub01"])
    times = truth["times"]
    assert len(times) == 181 and times[0] == pytest.approx(-0.5) and times[-1] == pytest.approx(1.0)
    amps = truth["test_amplitudes"] - truth["test_amplitudes"].mean(0)
    for pop, (lo, hi) in ((0, (0.07, 0.15)), (1, (0.18, 0.42))):
        keep = truth["population"] == pop
        mix = meg.mixing_matrix(truth["lead_field"][:, keep], truth["kernels"][keep], float(truth["signal_gain"]))
        s = meg.sensor_signals(amps[:, keep], mix, 272)
        power = (s**2).mean(axis=(0, 1))
        assert lo <= times[power.argmax()] <= hi, (pop, times[power.argmax()])
        assert power[times <= 0].max() == 0.0  # causal: nothing before the onset
    early, higher = truth["latency"][truth["population"] == 0], truth["latency"][truth["population"] == 1]
    assert 0.08 <= early.min() and early.max() <= 0.13 and 0.2 <= higher.min() and higher.max() <= 0.4


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_noise_psd_follows_one_over_f(alpha):
    names = things_meg_channel_names()
    from braindecode_fw.data.meg_layout import sensor_positions

    xy = sensor_positions(names).astype(np.float64)
    times = meg.time_axis(120.0, -0.5, 1.0)
    noise = meg.noise_model(xy, times, 120.0, meg.MEGNoiseConfig(alpha=alpha, white_floor=0.0),
                            meg.LeadFieldConfig(), np.random.default_rng(0))
    e = noise.sample(200, np.random.default_rng(1))
    assert e.var() == pytest.approx(1.0, rel=0.05)  # unit variance per sensor and sample
    f, p = scipy.signal.welch(e, fs=120.0, nperseg=181, axis=-1)
    p = p.mean(axis=(0, 1))
    band = (f >= 2) & (f <= 30)
    slope = np.polyfit(np.log(f[band]), np.log(p[band]), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.2)
    # spatially correlated: neighbouring sensors share noise
    c = np.corrcoef(e.transpose(1, 0, 2).reshape(272, -1))
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    assert c[(dist > 0) & (dist < 0.08)].mean() > 0.2 > np.abs(c[dist > 0.5]).mean()


def test_whitening_is_exact(meg_store):
    """Whitened noise has identity covariance (empirical check on a 24-sensor model, where the
    full covariance can be estimated), and a subject's stored model whitens its own noise to unit
    variance, with the model covariance equal to the empirical one before whitening."""
    rng = np.random.default_rng(3)
    small = meg.noise_model(rng.uniform(0, 1, size=(24, 2)), meg.time_axis(120.0, -0.5, 1.0), 120.0,
                            meg.MEGNoiseConfig(n_brain_sources=40), meg.LeadFieldConfig(), rng)
    w = small.whiten(small.sample(4000, rng))
    assert w.shape == (4000, 24 * 181)
    cov = np.cov(w.T)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(np.diag(cov) - 1).max() < 0.15 and np.abs(off).max() < 0.1 and np.abs(off).mean() < 0.02

    noise = meg.NoiseModel.from_arrays(_truth(open_store(meg_store).subjects["sub01"]))
    e = noise.sample(600, rng)
    assert noise.whiten(e).var() == pytest.approx(1.0, abs=0.02)
    # model covariance of one channel's time course (circulant, mixed spectrum) vs empirical
    basis, bins = meg.real_fourier_basis(181)
    c = 7
    model = basis.T @ ((noise.eigvecs[c] ** 2) @ noise.variance[:, bins] * basis.T).T
    emp = np.cov(e[:, c, :].T)
    assert np.abs(emp - model).max() < 0.25 * np.abs(model).max()
    # whitening without DC drops exactly one coefficient per spatial component
    assert noise.whiten(e[:2], drop_dc=True).shape == (2, 272 * 180)


def test_oracle_beats_chance_and_template_matching(meg_store):
    store = open_store(meg_store)
    oracle = store.extra("oracle")
    assert oracle["chance_top1"] == pytest.approx(1 / 20) and oracle["chance_top5"] == pytest.approx(5 / 20)
    for s, sub in store.subjects.items():
        o = oracle["subjects"][s]
        assert {"brain_to_image_top1", "brain_to_image_top5", "image_to_brain_top1", "image_to_brain_top5"} <= set(o)
        assert o["brain_to_image_top1"] > 3 * oracle["chance_top1"]
        assert o["brain_to_image_top5"] >= o["brain_to_image_top1"]
        assert sub.statistics()["oracle"] == o
        # decoder-free baseline on the stored (scaled) data: correlate the repetition average with
        # the noise-free templates; the exact-likelihood oracle must do at least as well
        truth = _truth(sub)
        t = sub.trials
        test = t.split == "test"
        resp = np.asarray(sub.responses[test], dtype=np.float64)
        avg = np.stack([resp[t.image_index[test] == i].mean(0) for i in range(20)])
        base = retrieval_accuracy(avg.reshape(20, -1), truth["test_noise_free"].reshape(20, -1),
                                  subset_size=20, n_subsets=1, ks=(1, 5))
        assert o["brain_to_image_top1"] >= base.mean("brain_to_image") - 1e-9
        assert o["brain_to_image_top5"] >= base.mean("brain_to_image", 5) - 1e-9
    assert set(oracle["mean"]) >= {"brain_to_image_top1", "brain_to_image_top5"}


def test_oracle_recomputed_from_the_stored_data(meg_store):
    """Robust scaling is an invertible per-run affine map: undoing it with the stored statistics and
    recomputing the oracle from the float16 store gives the same accuracies as ``oracle.json``."""
    store = open_store(meg_store)
    sub = store.subjects["sub02"]
    truth = _truth(sub)
    t = sub.trials
    x = np.asarray(sub.responses, dtype=np.float64)
    for r_i, (e, r) in enumerate(zip(truth["scaling_session"], truth["scaling_run"], strict=True)):
        rows = (t.session == e) & (t.run == r)
        x[rows] = x[rows] * truth["scaling_iqr"][r_i][:, None] + truth["scaling_median"][r_i][:, None]
    test = t.split == "test"
    means = np.stack([x[test][t.image_index[test] == i].mean(0) for i in range(20)])
    ll = meg.oracle_log_likelihood(means, np.full(20, 4), truth["test_noise_free"], meg.NoiseModel.from_arrays(truth))
    from braindecode_fw.metrics.retrieval import retrieval_from_scores

    res = retrieval_from_scores(ll, subset_size=20, n_subsets=1, ks=(1, 5), posterior=True).summary()
    expected = store.extra("oracle")["subjects"]["sub02"]
    for key in ("brain_to_image_top1", "brain_to_image_top5", "image_to_brain_top1", "image_to_brain_top5"):
        assert res[key] == pytest.approx(expected[key], abs=0.051), key  # at most one item of 20 flips


def test_oracle_likelihood_matches_brute_force_gaussian():
    """The whitened-distance log-likelihood equals the dense multivariate normal log-density (up to
    a per-query constant) on a small problem (8 channels x 15 samples, full covariance)."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, size=(8, 2))
    times = np.linspace(-0.2, 0.5, 15)
    noise = meg.noise_model(xy, times, 20.0, meg.MEGNoiseConfig(n_brain_sources=20), meg.LeadFieldConfig(), rng)
    basis, bins = meg.real_fourier_basis(15)
    # dense covariance of the vectorised (C*T) epoch, built from the model's definition
    big = np.kron(noise.eigvecs, basis.T)
    cov = big @ np.diag(noise.variance[:, bins].ravel()) @ big.T
    cands = rng.standard_normal((5, 8, 15))
    query = cands[2] + noise.sample(1, rng)[0]
    ll = meg.oracle_log_likelihood(query[None], np.array([1]), cands, noise)[0]
    # baseline-corrected likelihood = marginalise an unknown constant per channel: project out the DC
    ones = np.kron(np.eye(8), np.ones((15, 1)))  # (C*T, C)
    prec = np.linalg.inv(cov)
    prec_bc = prec - prec @ ones @ np.linalg.solve(ones.T @ prec @ ones, ones.T @ prec)
    diff = query.ravel()[None] - cands.reshape(5, -1)
    dense = -0.5 * np.einsum("ni,ij,nj->n", diff, prec_bc, diff)
    np.testing.assert_allclose(ll - ll.max(), dense - dense.max(), rtol=1e-6, atol=1e-6)


def test_deterministic_and_fingerprint(meg_store, tmp_path):
    generate_meg_world(small_config(), tmp_path / "again")
    a, b = open_store(meg_store), open_store(tmp_path / "again")
    assert a.version == b.version
    for s in a.subjects:
        np.testing.assert_array_equal(a.subjects[s].responses, b.subjects[s].responses)
        np.testing.assert_array_equal(_truth(a.subjects[s])["lead_field"], _truth(b.subjects[s])["lead_field"])
    base = small_config().fingerprint()
    assert small_config(snr=0.06).fingerprint() != base
    assert small_config(noise={"alpha": 1.5}).fingerprint() != base
    assert small_config().fingerprint() == base


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown synthetic-MEG-world key\(s\) \['n_sensors'\]"):
        SyntheticMEGWorldConfig.from_mapping({"n_sensors": 3})
    with pytest.raises(ValueError, match=r"dataset.world.noise: unknown key\(s\) \['alfa'\]"):
        SyntheticMEGWorldConfig.from_mapping({"noise": {"alfa": 1.0}})
    with pytest.raises(ValueError, match="baseline"):
        SyntheticMEGWorldConfig.from_mapping({"baseline": [0.1, 0.2]})


def test_yaml_mirrors_the_dataclass_defaults():
    cfg = OmegaConf.load(REPO / "braindecode_fw" / "conf" / "dataset" / "synthetic_meg.yaml")
    assert cfg.kind == "synthetic_meg" and cfg.modality == "meg" and cfg.name == "synthetic_meg"
    world = OmegaConf.to_container(cfg.world)
    assert SyntheticMEGWorldConfig.from_mapping(world) == SyntheticMEGWorldConfig()
    default = SyntheticMEGWorldConfig()
    assert default.fingerprint() == SyntheticMEGWorldConfig.from_mapping(world).fingerprint()
    assert len(default.subjects) == 4 and default.n_test_images == 200 and default.test_repetitions == 12


def test_ensure_store_generates_reuses_and_replaces_only_when_asked(tmp_path):
    from braindecode_fw.data.prepare import describe, ensure_store, prepare

    small = {**SMALL, "sources_per_subject": [100], "n_train_images": 8, "n_test_images": 6,
             "test_repetitions": 2, "n_sessions": 2, "oracle_subset_size": 6}
    ds = OmegaConf.create({"name": "synthetic_meg", "kind": "synthetic_meg", "modality": "meg",
                           "store": str(tmp_path / "prepared" / "synthetic_meg"), "auto_prepare": True,
                           "world": small})
    store = ensure_store(ds)
    meta = json.loads((store / "dataset.json").read_text())
    assert meta["modality"] == "meg"
    assert meta["provenance"]["config_fingerprint"] == SyntheticMEGWorldConfig.from_mapping(small).fingerprint()
    version = meta["version"]
    mtime = (store / "dataset.json").stat().st_mtime_ns
    assert ensure_store(ds) == store and (store / "dataset.json").stat().st_mtime_ns == mtime  # reused
    ds.world.snr = 0.2  # another world: refused, the store trained on is kept
    with pytest.raises(OutputExistsError, match=r"dataset.world.snr .* -> 0.2; .*dataset.replace=true"):
        ensure_store(ds)
    assert json.loads((store / "dataset.json").read_text())["version"] == version
    ds.replace = True
    ensure_store(ds)
    meta2 = json.loads((store / "dataset.json").read_text())
    assert meta2["version"] != version
    assert meta2["provenance"]["config_fingerprint"] == SyntheticMEGWorldConfig.from_mapping(
        OmegaConf.to_container(ds.world)).fingerprint()
    assert prepare(ds)["noop"]  # up to date now (replace only matters for another world)
    ds.force = True
    report = describe(prepare(ds))
    assert "top-5" in report and "sub01" in report
    ds.world.n_sensor = 3
    with pytest.raises(ValueError, match="n_sensor"):
        prepare(ds)
