"""The synthetic fMRI world: scenes + simulated subjects + oracle, written as a prepared store.

NSD-like design (docs/datasets/nsd.md): every subject sees its own training images and a shared test
set shown ``test_repetitions`` (3) times, trials shuffled into sessions of fixed length. The store
also keeps the simulator's ground truth (``subjects/<id>/simulator.npz``), the measured per-voxel
ncsnr (``ncsnr.npy``, NSD formula on session-z-scored test repeats) and the oracle retrieval
accuracy (``extras/oracle.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.data.normalization import fit_session_stats, ncsnr_from_repeats
from braindecode_fw.data.store import StoreWriter, TrialTable
from braindecode_fw.data.synthetic import fmri, scenes
from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.retrieval import retrieval_from_scores
from braindecode_fw.ops.faults import fault_point
from braindecode_fw.ops.progress import Progress
from braindecode_fw.schema import FROM_YAML, config_dataclass, dataclass_from_mapping, setting

log = logging.getLogger(__name__)
GENERATOR_VERSION = "synthetic-fmri-2"


@config_dataclass("dataset/synthetic.yaml", "world", key="dataset.world")
class SyntheticWorldConfig:
    """All parameters of the synthetic fMRI world: ``world`` of ``braindecode_fw/conf/dataset/synthetic.yaml``,
    which holds every default and describes every key (braindecode_fw/schema.py fills the fields from it)."""

    seed: int = setting(min=0)
    image_size: int = setting(min=1)
    feature_resolution: int = setting(min=1)
    max_objects: int = setting(min=1)
    voxels_per_subject: list[int] = setting(min=1)
    volume_shape: list[int] = setting(min=1)
    n_test_images: int = setting(min=2)
    test_repetitions: int = setting(min=2)
    n_train_images: int = setting(min=1)
    train_repetitions: int = setting(min=1)
    val_fraction: float = setting(min=0, lt=1)
    session_length: int = setting(min=1)
    runs_per_session: int = setting(min=1)
    early_fraction: float = setting(min=0, max=1)
    rf_size: list[float] = setting(min=0)
    tuning_smoothness: float = setting(min=0)
    nonlinearity_gain: float = setting(min=0)
    ncsnr: fmri.NoiseCeilingConfig = FROM_YAML
    drift: fmri.DriftConfig = FROM_YAML
    dtype: str = FROM_YAML
    subject_prefix: str = FROM_YAML
    oracle_subset_size: int = setting(min=2)
    oracle_n_subsets: int = setting(min=1)

    @classmethod
    def from_mapping(cls, cfg: dict[str, Any]) -> SyntheticWorldConfig:
        """Build from a (Hydra) mapping; unknown keys raise an error naming them."""
        out = dataclass_from_mapping(cls, cfg, what="synthetic-world",
                                     nested={"ncsnr": fmri.NoiseCeilingConfig, "drift": fmri.DriftConfig})
        out.validate()
        return out

    def validate(self) -> None:
        """Checks across fields (each field's type and range is checked when it is read)."""
        k = "dataset.world"
        if self.image_size % self.feature_resolution:
            raise ConfigError(f"{k}.image_size: {self.image_size} is not a multiple of {k}.feature_resolution "
                              f"({self.feature_resolution})")
        if not 1 <= self.runs_per_session <= self.session_length:
            raise ConfigError(f"{k}.runs_per_session: expected between 1 and {k}.session_length "
                              f"({self.session_length}), got {self.runs_per_session}")
        if len(self.volume_shape) != 3:
            raise ConfigError(f"{k}.volume_shape: expected 3 sizes [x, y, z], got {list(self.volume_shape)}")
        if len(self.rf_size) != 2:
            raise ConfigError(f"{k}.rf_size: expected [base, slope] (sd = base + slope * eccentricity), "
                              f"got {list(self.rf_size)}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"{k}.dtype: expected 'float16' or 'float32', got {self.dtype!r}")
        if not self.voxels_per_subject:
            raise ConfigError(f"{k}.voxels_per_subject: expected one voxel count per subject, got []")
        # a subject's mask takes the highest half of the volume at most (fmri.sample_voxel_mask)
        room = int(np.prod(self.volume_shape)) // 2
        if max(self.voxels_per_subject) > room:
            raise ConfigError(f"{k}.voxels_per_subject: {max(self.voxels_per_subject)} voxels do not fit in "
                              f"{k}.volume_shape {list(self.volume_shape)} (at most half its "
                              f"{int(np.prod(self.volume_shape))} voxels, {room}); enlarge the volume or use fewer voxels")

    @property
    def subjects(self) -> list[str]:
        return [f"{self.subject_prefix}{i + 1:02d}" for i in range(len(self.voxels_per_subject))]

    def fingerprint(self) -> str:
        blob = json.dumps({"generator": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scene_record(scene: scenes.Scene) -> dict[str, Any]:
    return {
        "objects": [
            {
                "category": scenes.CATEGORIES[o.category],
                "colour": list(scenes.COLOURS)[o.colour],
                "size": list(scenes.SIZES)[o.size],
                "x": round(o.x, 4),
                "y": round(o.y, 4),
            }
            for o in scene.objects
        ],
        "background": scenes.BACKGROUNDS[scene.background],
        "tint": list(scenes.BACKGROUND_TINTS)[scene.tint],
    }


def generate_world(cfg: SyntheticWorldConfig, root: str | Path, *, name: str = "synthetic",
                   overwrite: bool = True) -> dict[str, Any]:
    """Generate the world into a prepared store at ``root`` (dataset ``name``). Returns a summary
    (oracle, ncsnr, timings)."""
    t0 = time.perf_counter()
    cfg.validate()
    seeds = np.random.SeedSequence(cfg.seed).spawn(2 + len(cfg.subjects))
    scene_rng = np.random.default_rng(seeds[0])
    split_rng = np.random.default_rng(seeds[1])

    n_subj = len(cfg.subjects)
    all_scenes = scenes.sample_scenes(cfg.n_test_images + n_subj * cfg.n_train_images, scene_rng, cfg.max_objects)
    images = np.empty((len(all_scenes), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    with Progress(len(all_scenes), "rendering scenes", unit="scenes", logger=log) as progress:
        for i, scene in enumerate(all_scenes):
            images[i] = scenes.render_scene(scene, cfg.image_size)
            progress.update()
    captions = [scenes.caption_scene(s) for s in all_scenes]
    semantic = scenes.semantic_features(all_scenes)
    test_idx = np.arange(cfg.n_test_images)
    log.info("rendered %d scenes in %.1f s", len(all_scenes), time.perf_counter() - t0)

    summary: dict[str, Any] = {"subjects": {}, "fingerprint": cfg.fingerprint()}
    oracle: dict[str, Any] = {
        "protocol": {
            "subset_size": cfg.oracle_subset_size,
            "n_subsets": cfg.oracle_n_subsets,
            "seed": 42,
            "repetitions_averaged": cfg.test_repetitions,
            "method": "Bayes-optimal under the known generative model: exact Gaussian likelihood of "
            "each test query (repetitions combined by precision-weighted mean, drift removed), "
            "posterior over the subset's images (uniform prior); brain->image = MAP image, "
            "image->brain = brain response with the highest posterior for that image",
        },
        "subjects": {},
    }
    with StoreWriter(root, name=name, modality="fmri", overwrite=overwrite) as writer:
        writer.write_images(images, ids=[f"synth-{i:06d}" for i in range(len(images))], captions=captions)
        writer.write_extra("scenes", [_scene_record(s) for s in all_scenes])
        for s_i, subject in enumerate(cfg.subjects):
            rng = np.random.default_rng(seeds[2 + s_i])
            sim = fmri.build_subject(
                cfg.voxels_per_subject[s_i],
                tuple(cfg.volume_shape),
                semantic.shape[1],
                rng,
                early_fraction=cfg.early_fraction,
                ncsnr=cfg.ncsnr,
                drift=cfg.drift,
                rf_size=tuple(cfg.rf_size),
                tuning_smoothness=cfg.tuning_smoothness,
            )
            train_idx = cfg.n_test_images + s_i * cfg.n_train_images + np.arange(cfg.n_train_images)
            shown = np.concatenate([test_idx, train_idx])  # local row -> global image index
            drive = fmri.neural_drive(
                sim, fmri.image_channels(images[shown], cfg.feature_resolution), semantic[shown], cfg.feature_resolution
            )
            f = fmri.noise_free_responses(sim, drive, nonlinearity_gain=cfg.nonlinearity_gain, fit=True)
            del drive

            # trial order: every image its number of repetitions, shuffled into sessions
            local = np.concatenate(
                [np.repeat(np.arange(len(test_idx)), cfg.test_repetitions),
                 np.repeat(len(test_idx) + np.arange(len(train_idx)), cfg.train_repetitions)]
            )
            local = local[rng.permutation(len(local))]
            n_trials = len(local)
            trial_pos = np.arange(n_trials)
            session = trial_pos // cfg.session_length
            # runs of (nearly) equal length, e.g. NSD's 12 runs of 62/63 trials in a 750-trial session
            run = (trial_pos % cfg.session_length) * cfg.runs_per_session // cfg.session_length
            repeat = np.zeros(n_trials, dtype=np.int64)
            seen: dict[int, int] = {}
            for t, li in enumerate(local):
                repeat[t] = seen.get(int(li), 0)
                seen[int(li)] = repeat[t] + 1
            n_sessions = int(session.max()) + 1
            gain = np.exp(cfg.drift.gain_sd * rng.standard_normal((n_sessions, len(sim.noise_sd))))
            offset = cfg.drift.offset_sd * rng.standard_normal((n_sessions, len(sim.noise_sd)))

            responses = writer.open_responses(subject, (n_trials, len(sim.noise_sd)), cfg.dtype)
            for e in range(n_sessions):
                rows = np.flatnonzero(session == e)
                noise = rng.standard_normal((len(rows), len(sim.noise_sd)), dtype=np.float32)
                y = gain[e] * f[local[rows]] + offset[e] + sim.baseline + sim.noise_sd * noise
                responses[rows] = y.astype(cfg.dtype)
            responses.flush()
            fault_point("world.subject", root)  # crash tests: killed mid-store (docs/operations.md)

            is_test = local < len(test_idx)
            val_images = split_rng.choice(
                len(train_idx), int(round(cfg.val_fraction * len(train_idx))), replace=False
            ) + len(test_idx)
            split = np.where(is_test, "test", np.where(np.isin(local, val_images), "val", "train"))
            trials = TrialTable(
                trial_id=np.arange(n_trials, dtype=np.int64),
                image_index=shown[local].astype(np.int64),
                session=session.astype(np.int64),
                run=run.astype(np.int64),
                repeat=repeat,
                split=split.astype(str),
            )

            # oracle: exact likelihood of each test query (its repetitions) under each test image
            test_rows = np.flatnonzero(is_test)
            y_test = np.asarray(responses[test_rows], dtype=np.float64)
            sess_t = session[test_rows]
            loglik = fmri.oracle_log_likelihood(
                y_test,
                gain[sess_t],
                offset[sess_t] + sim.baseline,
                sim.noise_sd,
                group=local[test_rows],
                candidates=f[: len(test_idx)],
            )
            res = retrieval_from_scores(
                loglik, subset_size=cfg.oracle_subset_size, n_subsets=cfg.oracle_n_subsets, seed=42,
                posterior=True,
            )
            oracle["subjects"][subject] = res.summary()

            # measured ncsnr, NSD formula on session-z-scored test repetitions
            stats = fit_session_stats(responses, session, split == "train")
            z = stats.apply(y_test, sess_t)
            order = np.lexsort((repeat[test_rows], local[test_rows]))
            reps = z[order].reshape(len(test_idx), cfg.test_repetitions, -1)
            ncsnr = ncsnr_from_repeats(reps)
            q = [5, 25, 50, 75, 95]
            statistics = {
                "n_voxels": int(len(sim.noise_sd)),
                "n_trials": int(n_trials),
                "n_sessions": n_sessions,
                "population_counts": {"early": int((sim.population == 0).sum()), "higher": int((sim.population == 1).sum())},
                "ncsnr_measured_percentiles": dict(zip(map(str, q), np.percentile(ncsnr, q).round(4).tolist(), strict=True)),
                "ncsnr_true_percentiles": dict(zip(map(str, q), np.percentile(sim.ncsnr_true, q).round(4).tolist(), strict=True)),
                "oracle": res.summary(),
            }
            vol = np.asarray(cfg.volume_shape)
            affine = np.diag([1.8, 1.8, 1.8, 1.0])  # NSD-like 1.8 mm voxels
            affine[:3, 3] = -0.9 * (vol - 1)
            writer.write_subject(
                subject,
                trials,
                voxel_ijk=sim.voxel_ijk,
                affine=affine,
                volume_shape=tuple(cfg.volume_shape),
                statistics=statistics,
                arrays={"ncsnr": ncsnr.astype(np.float32)},
            )
            np.savez_compressed(
                writer.subject_dir(subject) / "simulator.npz",
                **sim.as_arrays(),
                session_gain=gain.astype(np.float32),
                session_offset=offset.astype(np.float32),
                test_noise_free=f[: len(test_idx)],
            )
            summary["subjects"][subject] = statistics
            log.info("%s: %d voxels, %d trials, oracle brain->image top-1 %.3f, median ncsnr %.3f",
                     subject, len(sim.noise_sd), n_trials, res.mean("brain_to_image"), float(np.median(ncsnr)))
            del f, responses

        subj = oracle["subjects"]
        oracle["mean"] = {k: float(np.mean([subj[s][k] for s in subj])) for k in next(iter(subj.values()))}
        oracle["chance_top1"] = 1.0 / min(cfg.oracle_subset_size, cfg.n_test_images)
        writer.write_extra("oracle", oracle)
        summary["oracle"] = oracle
        writer.finalize(
            provenance={
                "source": "synthetic",
                "generator": GENERATOR_VERSION,
                "config": dataclasses.asdict(cfg),
                "config_fingerprint": cfg.fingerprint(),
                "split_rule": f"test: {cfg.n_test_images} shared images x {cfg.test_repetitions}; "
                f"val: random {cfg.val_fraction:.0%} of each subject's training images (seeded)",
                "normalisation": "raw simulated responses; z-scoring per session is done by the datamodule",
            },
            image_size=cfg.image_size,
        )
    summary["seconds"] = time.perf_counter() - t0
    return summary
