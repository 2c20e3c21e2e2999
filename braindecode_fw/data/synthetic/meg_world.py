"""The synthetic MEG world: the fMRI world's scenes and populations, seen through 272 MEG sensors.

THINGS-MEG-like design (docs/datasets/things_meg.md): 4 subjects, each sees its own training images once and
a shared test set repeated ``test_repetitions`` (12) times, spread over ``n_sessions`` (12) sessions
(once per session when the two are equal) of ``runs_per_session`` runs. The epochs are processed as
the THINGS-MEG converter does (Benchetrit et al. 2023, docs/methods/meg_brainmodule.md §1): baseline correction over
``[tmin, 0]`` per epoch and channel, then per run (= recording) robust scaling per channel (median /
IQR) and clamping to ``±clamp``; the store holds the result as ``(trials, 272, 181)`` and says
``provenance.zscore_at_load = false`` so the datamodule does not normalise again.

Ground truth per subject goes to ``subjects/<id>/simulator.npz`` (populations, latencies, kernels,
lead field, exact noise model, per-run scaling, test noise-free responses); the Bayes-optimal
retrieval of the test images goes to ``extras/oracle.json`` with the fMRI world's structure.

The oracle is computed on the baseline-corrected epochs *before* robust scaling: the scaling is an
invertible per-run affine map of each channel, so it changes no likelihood ratio, except where the
clamp bites (values beyond ``clamp`` IQRs, i.e. > ~27 noise sd at the default: the fraction of
clamped values is in each subject's statistics) and for the float16 rounding of the stored values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from braindecode_fw.data.meg_layout import sensor_positions, things_meg_channel_names
from braindecode_fw.data.meg_preprocessing import RobustScaling, baseline_correct
from braindecode_fw.data.store import StoreWriter, TrialTable
from braindecode_fw.data.synthetic import fmri, meg, scenes
from braindecode_fw.data.synthetic.world import _scene_record
from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.retrieval import retrieval_from_scores
from braindecode_fw.ops.faults import fault_point
from braindecode_fw.schema import FROM_YAML, config_dataclass, dataclass_from_mapping, setting

log = logging.getLogger(__name__)
GENERATOR_VERSION = "synthetic-meg-1"
# fMRI-only fields of SubjectSimulation, meaningless for the MEG sources (their noise lives in sensors)
_FMRI_ONLY = ("ncsnr_true", "noise_sd", "baseline")


@config_dataclass("dataset/synthetic_meg.yaml", "world", key="dataset.world")
class SyntheticMEGWorldConfig:
    """All parameters of the synthetic MEG world: ``world`` of ``braindecode_fw/conf/dataset/synthetic_meg.yaml``,
    which holds every default and describes every key (braindecode_fw/schema.py fills the fields from it)."""

    seed: int = setting(min=0)
    image_size: int = setting(min=1)
    feature_resolution: int = setting(min=1)
    max_objects: int = setting(min=1)
    sources_per_subject: list[int] = setting(min=1)
    volume_shape: list[int] = setting(min=1)
    n_test_images: int = setting(min=1)
    test_repetitions: int = setting(min=1)
    n_train_images: int = setting(min=1)
    val_fraction: float = setting(min=0, lt=1)
    n_sessions: int = setting(min=1)
    runs_per_session: int = setting(min=1)
    early_fraction: float = setting(min=0, max=1)
    rf_size: list[float] = setting(min=0)
    tuning_smoothness: float = setting(min=0)
    nonlinearity_gain: float = setting(min=0)
    sfreq: float = setting(gt=0)
    tmin: float = FROM_YAML
    tmax: float = FROM_YAML
    baseline: list[float] = FROM_YAML
    early_kernel: meg.KernelConfig = FROM_YAML
    higher_kernel: meg.KernelConfig = FROM_YAML
    latency_smoothness: float = setting(min=0)
    evoked_amplitude: float = FROM_YAML
    lead_field: meg.LeadFieldConfig = FROM_YAML
    noise: meg.MEGNoiseConfig = FROM_YAML
    snr: float = setting(min=0)
    clamp: float | None = setting(gt=0)
    dtype: str = FROM_YAML
    subject_prefix: str = FROM_YAML
    oracle_subset_size: int = setting(min=2)
    oracle_n_subsets: int = setting(min=1)

    _NESTED: ClassVar[dict[str, type]] = {"early_kernel": meg.KernelConfig, "higher_kernel": meg.KernelConfig,
               "lead_field": meg.LeadFieldConfig, "noise": meg.MEGNoiseConfig}

    @classmethod
    def from_mapping(cls, cfg: dict[str, Any]) -> SyntheticMEGWorldConfig:
        """Build from a (Hydra) mapping; unknown keys (also nested ones) raise an error naming them."""
        out = dataclass_from_mapping(cls, cfg, what="synthetic-MEG-world", nested=cls._NESTED)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise a ``ConfigError`` naming the first inconsistent config key."""
        if not self.sources_per_subject:
            raise ConfigError("dataset.world.sources_per_subject must list at least one subject")
        if self.test_repetitions < 1 or self.n_test_images < 2:
            raise ConfigError("dataset.world.test_repetitions must be >= 1 and n_test_images >= 2")
        if self.image_size % self.feature_resolution:
            raise ConfigError("dataset.world.image_size must be a multiple of dataset.world.feature_resolution")
        trials_per_session = (self.n_train_images + self.n_test_images * self.test_repetitions) // self.n_sessions
        if self.n_sessions < 1 or not 1 <= self.runs_per_session <= trials_per_session:
            raise ConfigError("dataset.world.runs_per_session must be between 1 and the trials per session "
                              f"({trials_per_session}); dataset.world.n_sessions must be >= 1")
        if not self.tmin < self.baseline[1] <= 0.0 < self.tmax or self.baseline[0] > self.baseline[1]:
            raise ConfigError(f"dataset.world.baseline {self.baseline} must lie in [tmin, 0] with tmin < 0 < tmax "
                              f"(tmin={self.tmin}, tmax={self.tmax})")
        if max(self.higher_kernel.latency + self.early_kernel.latency) >= self.tmax:
            raise ConfigError("dataset.world.*_kernel.latency must end before dataset.world.tmax")
        if not 0.0 <= self.noise.white_floor <= 1.0 or not 0.0 <= self.noise.spatial_correlation <= 1.0:
            raise ConfigError("dataset.world.noise.white_floor and spatial_correlation must lie in [0, 1]")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dataset.world.dtype must be float16 or float32, got {self.dtype!r}")

    @property
    def subjects(self) -> list[str]:
        return [f"{self.subject_prefix}{i + 1:02d}" for i in range(len(self.sources_per_subject))]

    def fingerprint(self) -> str:
        blob = json.dumps({"generator": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrialDesign:
    """One subject's trial order, sessions and runs (trial rows session-major, runs contiguous)."""

    local: np.ndarray  # (n,) row in the subject's shown images: < n_test = a test image
    session: np.ndarray  # (n,)
    run: np.ndarray  # (n,) within session
    repeat: np.ndarray  # (n,)


def trial_design(n_test: int, test_repetitions: int, n_train: int, n_sessions: int, runs_per_session: int,
                 rng: np.random.Generator) -> TrialDesign:
    """THINGS-MEG-like order: test repetition ``r`` goes to session ``r * n_sessions // R`` (once per
    session when R = n_sessions), training images are spread evenly over sessions, trials are shuffled
    within a session and cut into ``runs_per_session`` runs of (nearly) equal length."""
    per_session: list[list[np.ndarray]] = [[] for _ in range(n_sessions)]
    for r in range(test_repetitions):
        per_session[r * n_sessions // test_repetitions].append(np.arange(n_test))
    for e, chunk in enumerate(np.array_split(n_test + rng.permutation(n_train), n_sessions)):
        per_session[e].append(chunk)
    local, session, run = [], [], []
    for e, parts in enumerate(per_session):
        items = np.concatenate(parts).astype(np.int64)
        items = items[rng.permutation(len(items))]
        local.append(items)
        session.append(np.full(len(items), e))
        run.append(np.arange(len(items)) * runs_per_session // max(len(items), 1))
    loc = np.concatenate(local)
    repeat = np.zeros(len(loc), dtype=np.int64)
    seen: dict[int, int] = {}
    for t, li in enumerate(loc.tolist()):
        repeat[t] = seen.get(li, 0)
        seen[li] = repeat[t] + 1
    return TrialDesign(loc, np.concatenate(session).astype(np.int64), np.concatenate(run).astype(np.int64), repeat)


@dataclass
class MEGSubject:
    """What the simulator builds for one subject before any trial is drawn."""

    sim: fmri.SubjectSimulation
    amplitudes: np.ndarray  # (n_shown, V) float32: evoked + image-specific amplitude per source
    latency: np.ndarray  # (V,) s
    kernels: np.ndarray  # (V, T)
    lead: dict[str, np.ndarray]  # meg.lead_field output, "lead_field" (C, V)
    noise: meg.NoiseModel
    gain: float
    mix: np.ndarray  # (V, C*T) float32, see meg.mixing_matrix


def build_meg_subject(cfg: SyntheticMEGWorldConfig, n_sources: int, images: np.ndarray, semantic: np.ndarray,
                      sensor_xy: np.ndarray, times: np.ndarray, rng: np.random.Generator) -> MEGSubject:
    """Sources (fMRI populations) -> amplitudes for the subject's ``images`` ``(N, H, W, 3)`` with
    ``semantic`` ``(N, F)`` features, kernels, lead field, noise model and signal gain."""
    sim = fmri.build_subject(
        n_sources, tuple(cfg.volume_shape), semantic.shape[1], rng, early_fraction=cfg.early_fraction,
        ncsnr=fmri.NoiseCeilingConfig(), drift=fmri.DriftConfig(),  # the fMRI world's (unused by MEG)
        rf_size=tuple(cfg.rf_size),
        tuning_smoothness=cfg.tuning_smoothness,
    )
    drive = fmri.neural_drive(sim, fmri.image_channels(images, cfg.feature_resolution), semantic, cfg.feature_resolution)
    f = fmri.noise_free_responses(sim, drive, nonlinearity_gain=cfg.nonlinearity_gain, fit=True)
    del drive
    latency = meg.source_latencies(sim, tuple(cfg.volume_shape), cfg.early_kernel, cfg.higher_kernel,
                                   cfg.latency_smoothness, rng)
    kernels = meg.temporal_kernels(times, latency, sim.population, cfg.early_kernel, cfg.higher_kernel)
    lead = meg.lead_field(sensor_xy, sim.voxel_ijk, tuple(cfg.volume_shape), cfg.lead_field, rng)
    noise = meg.noise_model(sensor_xy, times, cfg.sfreq, cfg.noise, cfg.lead_field, rng)
    gain = meg.signal_gain(lead["lead_field"], kernels, f, times, cfg.snr)
    return MEGSubject(sim=sim, amplitudes=(f + np.float32(cfg.evoked_amplitude)).astype(np.float32),
                      latency=latency, kernels=kernels, lead=lead, noise=noise, gain=gain,
                      mix=meg.mixing_matrix(lead["lead_field"], kernels, gain))


def generate_meg_world(cfg: SyntheticMEGWorldConfig, root: str | Path, *, name: str = "synthetic_meg",
                       overwrite: bool = True) -> dict[str, Any]:
    """Generate the MEG world into a prepared store at ``root`` (modality ``meg``, responses
    ``(trials, 272, T)``). Streams run by run into the memory map, so memory stays at about one
    subject's model plus its test-set sums. Returns a summary (oracle, statistics, timings)."""
    t0 = time.perf_counter()
    cfg.validate()
    seeds = np.random.SeedSequence(cfg.seed).spawn(2 + len(cfg.subjects))
    scene_rng = np.random.default_rng(seeds[0])
    split_rng = np.random.default_rng(seeds[1])

    n_subj, n_test = len(cfg.subjects), cfg.n_test_images
    all_scenes = scenes.sample_scenes(n_test + n_subj * cfg.n_train_images, scene_rng, cfg.max_objects)
    images = np.stack([scenes.render_scene(s, cfg.image_size) for s in all_scenes])
    captions = [scenes.caption_scene(s) for s in all_scenes]
    semantic = scenes.semantic_features(all_scenes)
    names = things_meg_channel_names()
    sensor_xy = sensor_positions(names).astype(np.float64)
    times = meg.time_axis(cfg.sfreq, cfg.tmin, cfg.tmax)
    n_sensors, n_times = len(names), len(times)
    log.info("rendered %d scenes in %.1f s", len(all_scenes), time.perf_counter() - t0)

    summary: dict[str, Any] = {"modality": "meg", "subjects": {}, "fingerprint": cfg.fingerprint()}
    oracle: dict[str, Any] = {
        "protocol": {
            "subset_size": cfg.oracle_subset_size,
            "n_subsets": cfg.oracle_n_subsets,
            "seed": 42,
            "ks": [1, 5],
            "repetitions_averaged": cfg.test_repetitions,
            "method": "Bayes-optimal under the known generative model: exact Gaussian likelihood of each "
            "test query (mean of its baseline-corrected repetitions, before robust scaling) whitened with "
            "the exact spatio-temporal noise covariance (DC coefficient, removed by the baseline, left out), "
            "posterior over the subset's images (uniform prior); brain->image = MAP image, image->brain = "
            "brain response with the highest posterior for that image. Caveat: robust scaling is an "
            "invertible per-run affine map; clamping and float16 storage are not modelled",
        },
        "subjects": {},
    }
    with StoreWriter(root, name=name, modality="meg", overwrite=overwrite) as writer:
        writer.write_images(images, ids=[f"synth-{i:06d}" for i in range(len(images))], captions=captions)
        writer.write_extra("scenes", [_scene_record(s) for s in all_scenes])
        for s_i, subject in enumerate(cfg.subjects):
            t_s = time.perf_counter()
            rng = np.random.default_rng(seeds[2 + s_i])
            train_idx = n_test + s_i * cfg.n_train_images + np.arange(cfg.n_train_images)
            shown = np.concatenate([np.arange(n_test), train_idx])  # local row -> global image index
            model = build_meg_subject(cfg, cfg.sources_per_subject[s_i], images[shown], semantic[shown],
                                      sensor_xy, times, rng)
            design = trial_design(n_test, cfg.test_repetitions, cfg.n_train_images, cfg.n_sessions,
                                  cfg.runs_per_session, rng)
            n_trials = len(design.local)
            responses = writer.open_responses(subject, (n_trials, n_sensors, n_times), cfg.dtype)
            test_sum = np.zeros((n_test, n_sensors, n_times))
            run_keys = np.unique(np.stack([design.session, design.run], 1), axis=0)
            medians = np.zeros((len(run_keys), n_sensors))
            iqrs = np.zeros((len(run_keys), n_sensors))
            n_clamped = 0
            candidates = meg.sensor_signals(model.amplitudes[:n_test], model.mix, n_sensors)
            for r_i, (e, r) in enumerate(run_keys):
                rows = np.flatnonzero((design.session == e) & (design.run == r))  # contiguous
                loc = design.local[rows]
                is_t = loc < n_test
                y = model.noise.sample(len(rows), rng)
                # test images repeat: their noise-free signals are computed once (also the oracle's candidates)
                y[is_t] += candidates[loc[is_t]]
                y[~is_t] += meg.sensor_signals(model.amplitudes[loc[~is_t]], model.mix, n_sensors)
                y = baseline_correct(y, times, (cfg.baseline[0], cfg.baseline[1]))
                for row in np.flatnonzero(is_t):
                    test_sum[loc[row]] += y[row]
                scaler = RobustScaling.fit(y)
                out = scaler.apply(y)
                if cfg.clamp is not None:
                    n_clamped += int((np.abs(out) > cfg.clamp).sum())
                    np.clip(out, -cfg.clamp, cfg.clamp, out=out)
                responses[rows[0] : rows[-1] + 1] = out.astype(cfg.dtype)
                medians[r_i], iqrs[r_i] = scaler.median, scaler.iqr
            responses.flush()
            del responses
            fault_point("world.subject", root)  # crash tests: killed mid-store (docs/operations.md)

            val_images = split_rng.choice(
                cfg.n_train_images, int(round(cfg.val_fraction * cfg.n_train_images)), replace=False
            ) + n_test
            is_test = design.local < n_test
            split = np.where(is_test, "test", np.where(np.isin(design.local, val_images), "val", "train"))
            trials = TrialTable(
                trial_id=np.arange(n_trials, dtype=np.int64), image_index=shown[design.local].astype(np.int64),
                session=design.session, run=design.run, repeat=design.repeat, split=split.astype(str),
            )

            # oracle: exact likelihood of each test query (mean of its repetitions) under each test image
            n_reps = np.bincount(design.local[is_test], minlength=n_test)
            loglik = meg.oracle_log_likelihood(test_sum / n_reps[:, None, None], n_reps, candidates, model.noise)
            res = retrieval_from_scores(loglik, subset_size=cfg.oracle_subset_size, n_subsets=cfg.oracle_n_subsets,
                                        seed=42, ks=(1, 5), posterior=True)
            oracle["subjects"][subject] = res.summary()
            del test_sum

            sim = model.sim
            statistics = {
                "n_sensors": n_sensors,
                "n_times": n_times,
                "n_sources": int(len(sim.population)),
                "n_trials": int(n_trials),
                "n_sessions": int(cfg.n_sessions),
                "n_runs": int(len(run_keys)),
                "split_trials": {k: int((split == k).sum()) for k in ("train", "val", "test")},
                "population_counts": {"early": int((sim.population == 0).sum()),
                                      "higher": int((sim.population == 1).sum())},
                "snr": float(cfg.snr),
                "signal_gain": float(model.gain),
                "clamped_fraction": n_clamped / float(n_trials * n_sensors * n_times),
                "oracle": res.summary(),
            }
            writer.write_subject(
                subject, trials, sensor_names=names, sensor_positions=sensor_xy.astype(np.float32),
                sfreq=cfg.sfreq, tmin=float(times[0]), statistics=statistics,
            )
            truth = {k: v for k, v in sim.as_arrays().items() if k not in _FMRI_ONLY}
            np.savez(
                writer.subject_dir(subject) / "simulator.npz",
                **truth,
                **{f"lead_{k}" if k != "lead_field" else k: v for k, v in model.lead.items()},
                latency=model.latency, kernels=model.kernels, times=times, signal_gain=np.float64(model.gain),
                evoked_amplitude=np.float64(cfg.evoked_amplitude),
                noise_eigvecs=model.noise.eigvecs, noise_variance=model.noise.variance,
                noise_psd=model.noise.psd, noise_freqs=model.noise.freqs, noise_spatial_cov=model.noise.spatial_cov,
                scaling_session=run_keys[:, 0], scaling_run=run_keys[:, 1],
                scaling_median=medians, scaling_iqr=iqrs,
                test_amplitudes=model.amplitudes[:n_test], test_noise_free=candidates,
            )
            summary["subjects"][subject] = statistics
            log.info("%s: %d sources, %d trials in %.1f s, oracle brain->image top-1 %.3f / top-5 %.3f",
                     subject, len(sim.population), n_trials, time.perf_counter() - t_s,
                     res.mean("brain_to_image"), res.mean("brain_to_image", 5))
            del model, candidates, loglik

        subj = oracle["subjects"]
        oracle["mean"] = {k: float(np.mean([subj[s][k] for s in subj])) for k in next(iter(subj.values()))}
        oracle["chance_top1"] = 1.0 / min(cfg.oracle_subset_size, n_test)
        oracle["chance_top5"] = min(5.0 / min(cfg.oracle_subset_size, n_test), 1.0)
        writer.write_extra("oracle", oracle)
        summary["oracle"] = oracle
        writer.finalize(
            provenance={
                "source": "synthetic",
                "generator": GENERATOR_VERSION,
                "config": dataclasses.asdict(cfg),
                "config_fingerprint": cfg.fingerprint(),
                "split_rule": f"test: {n_test} shared images x {cfg.test_repetitions} (over {cfg.n_sessions} "
                f"sessions); val: random {cfg.val_fraction:.0%} of each subject's training images (seeded)",
                "normalisation": f"baseline {cfg.baseline} s per epoch and channel; robust scaling (median/IQR) "
                f"per run and channel; clamp ±{cfg.clamp} (Benchetrit et al. 2023, docs/methods/meg_brainmodule.md §1)",
                "zscore_at_load": False,
                "sfreq": cfg.sfreq,
                "tmin": float(times[0]),
                "sensor_layout": "CTF-275 minus MLF25, MRF43, MRO13 (THINGS-MEG, 272 channels)",
            },
            image_size=cfg.image_size,
        )
    summary["seconds"] = time.perf_counter() - t0
    return summary
