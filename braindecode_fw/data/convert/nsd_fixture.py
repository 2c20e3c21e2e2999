"""A miniature Natural Scenes Dataset in the real on-disk layout (docs/datasets/nsd.md).

Same paths, file names, dtypes, axis orders, keys and 1-/0-based conventions as the real release,
tiny volumes. The stimulus brick keeps its full logical shape ``(73000, 425, 425, 3)`` with lazily
allocated HDF5 chunks; only the images the written trials use are stored, each a flat colour
(:func:`fixture_colour`) so a test can tell which image a converter fetched. Used by the converter
tests and, scaled to the real volume size, by the conversion throughput benchmark.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.errors import DataError

N_IMAGES_73K = 73000
IMAGE_SIDE = 425
TRIALS_PER_SESSION = 750
N_TOTAL_TRIALS = 30000
RESPONSE_COLUMNS = (
    "SUBJECT", "SESSION", "RUN", "TRIAL", "73KID", "10KID", "TIME", "ISOLD", "ISCORRECT", "RT",
    "CHANGEMIND", "MEMORYRECENT", "MEMORYFIRST", "ISOLDCURRENT", "ISCORRECTCURRENT", "TOTAL1", "TOTAL2",
    "BUTTON", "MISSINGDATA",
)
BETA_DIRS = {"b1": "betas_assumehrf", "b2": "betas_fithrf", "b3": "betas_fithrf_GLMdenoise_RR"}


def fixture_colour(id73k: int | np.ndarray) -> np.ndarray:
    """The flat RGB colour (uint8, ``(..., 3)``) of 0-based 73k image ``id73k``; unique per id."""
    i = np.asarray(id73k, dtype=np.int64)
    return np.stack([i % 256, (i // 256) % 256, 64 + 128 * (i // 65536)], axis=-1).astype(np.uint8)


def run_layout() -> tuple[np.ndarray, np.ndarray]:
    """1-based (run, trial-in-run) of the 750 trials of a session: 12 runs of 63 (odd) / 62 (even)."""
    runs, trials = [], []
    for r in range(1, 13):
        n = 63 if r % 2 else 62
        runs += [r] * n
        trials += list(range(1, n + 1))
    return np.asarray(runs), np.asarray(trials)


def _design(rng: np.random.Generator, designed_trials: int) -> np.ndarray:
    """1-based 10k indices for ``designed_trials`` trials: shared images (k10 <= 1000) mostly 3x,
    one shown 2x and one 1x; training images (k10 > 1000) shown 1-3x; order shuffled."""
    if designed_trials >= N_TOTAL_TRIALS:
        return rng.permutation(np.repeat(np.arange(1, 10001), 3))
    n_test = max(designed_trials // 10, 17)
    n3 = min((n_test - 3) // 3, 998)
    shared = [*np.repeat(np.arange(1, n3 + 1), 3), n3 + 1, n3 + 1, n3 + 2]
    n_train = designed_trials - len(shared)
    train, k, pattern = [], 1001, (3, 3, 2, 1, 3)
    while len(train) < n_train:
        reps = min(pattern[(k - 1001) % len(pattern)], n_train - len(train))
        train += [k] * reps
        k += 1
    return rng.permutation(np.asarray(shared + train, dtype=np.int64))


def write_nsd_fixture(
    root: str | Path,
    subjects: Sequence[int] = (1,),
    n_sessions: int = 2,
    volume_shape: tuple[int, int, int] = (6, 5, 4),
    roi_voxels: int = 8,
    seed: int = 0,
    hdf5: bool = True,
    *,
    sessions: Sequence[int] | None = None,
    nifti: bool = True,
    beta_version: str = "b3",
    captions: bool = True,
    signal_sd: float = 1.0,
    gzip_level: int = 6,
    image_side: int = IMAGE_SIDE,
) -> dict[str, Any]:
    """Write the NSD fixture described above under ``root``; return a description (paths, shared ids, ...).

    ``sessions`` (1-based) overrides ``n_sessions`` (e.g. ``(1, 38)`` to exercise the legacy
    37-session convention). Betas are ``round(pct * 300)`` int16 with ``pct`` = per-session offset
    + image-driven signal (ROI voxels only) + N(0, 1) noise, zero outside the brain mask.
    ``image_side`` other than 425 writes a brick the converter must refuse (not the release's).
    """
    import h5py
    import nibabel as nib
    from scipy.io import savemat

    root = Path(root)
    sessions = list(sessions) if sessions is not None else list(range(1, n_sessions + 1))
    rng = np.random.default_rng(seed)
    X, Y, Z = (int(s) for s in volume_shape)
    exp_dir = root / "nsddata/experiments/nsd"
    exp_dir.mkdir(parents=True, exist_ok=True)

    # ---- experimental design: one masterordering, per-subject 10k -> 73k maps ----------------
    perm = rng.permutation(N_IMAGES_73K)
    shared = np.sort(perm[:1000])
    subjectim = np.zeros((8, 10000), dtype=np.float64)
    for s in range(8):
        subjectim[s, :1000] = shared + 1
        subjectim[s, 1000:] = perm[1000 + 9000 * s: 1000 + 9000 * (s + 1)] + 1
    written_g = np.concatenate([(s - 1) * TRIALS_PER_SESSION + np.arange(TRIALS_PER_SESSION) for s in sessions])
    masterordering = np.zeros(N_TOTAL_TRIALS, dtype=np.int64)
    masterordering[written_g] = _design(rng, len(written_g))
    rest = np.setdiff1d(np.arange(N_TOTAL_TRIALS), written_g)
    if len(rest):
        used = np.bincount(masterordering[written_g], minlength=10001)[1:]
        fill = np.repeat(np.arange(1, 10001), np.maximum(3 - used, 0))
        fill = rng.permutation(fill)
        if len(fill) < len(rest):  # only when the designed part over-used images (never in practice)
            fill = np.concatenate([fill, rng.integers(1, 10001, len(rest) - len(fill))])
        masterordering[rest] = fill[: len(rest)]
    savemat(exp_dir / "nsd_expdesign.mat", {
        "masterordering": masterordering[None, :].astype(np.float64),
        "subjectim": subjectim,
        "sharedix": (shared + 1)[None, :].astype(np.float64),
        "basiccnt": np.zeros((3, 40)),
        "stimpattern": np.zeros((40, 12, 75)),
    })

    # ---- stimulus info CSV (73k rows) ----------------------------------------------------------
    _write_stim_info(exp_dir / "nsd_stim_info_merged.csv", rng, shared, subjectim, masterordering)

    # ---- per subject: ROI, brain mask, responses.tsv, betas ---------------------------------
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = -0.9 * (np.asarray(volume_shape) - 1)
    lo = [max(1, round(0.15 * d)) for d in (X, Y, Z)]
    hi = [d - m for d, m in zip((X, Y, Z), lo, strict=True)]
    brain = np.zeros((X, Y, Z), dtype=bool)
    brain[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    brain_flat = np.flatnonzero(brain)
    if roi_voxels > len(brain_flat):
        raise DataError(f"roi_voxels={roi_voxels} exceeds the {len(brain_flat)} brain voxels of {volume_shape}")
    used_ids: set[int] = set()
    out: dict[str, Any] = {"root": root, "sessions": sessions, "shared_ids": shared, "subjects": {}}
    for subj in subjects:
        srng = np.random.default_rng([seed, subj])
        tag = f"subj{subj:02d}"
        func = root / f"nsddata/ppdata/{tag}/func1pt8mm"
        (func / "roi").mkdir(parents=True, exist_ok=True)
        roi_flat = np.sort(srng.choice(brain_flat, roi_voxels, replace=False))
        nsdgeneral = np.where(brain, 0, -1).astype(np.int16)
        nsdgeneral.reshape(-1)[roi_flat] = 1
        nib.save(nib.Nifti1Image(nsdgeneral, affine), str(func / "roi/nsdgeneral.nii.gz"))
        prf = np.where(brain, srng.integers(0, 5, (X, Y, Z)), -1).astype(np.int16)
        nib.save(nib.Nifti1Image(prf, affine), str(func / "roi/prf-visualrois.nii.gz"))
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(func / "brainmask.nii.gz"))

        id73k = (subjectim[subj - 1, masterordering[written_g] - 1] - 1).astype(np.int64)
        used_ids.update(np.unique(id73k).tolist())
        _write_responses(root / f"nsddata/ppdata/{tag}/behav/responses.tsv", srng, subj, sessions,
                         masterordering, subjectim)

        uniq, local = np.unique(id73k, return_inverse=True)
        roi_idx = np.flatnonzero(nsdgeneral.reshape(-1) == 1)
        signal = (signal_sd * srng.standard_normal((len(uniq), len(roi_idx)))).astype(np.float32)
        beta_dir = root / f"nsddata_betas/ppdata/{tag}/func1pt8mm" / BETA_DIRS[beta_version]
        beta_dir.mkdir(parents=True, exist_ok=True)
        for j, sess in enumerate(sessions):
            rows = slice(j * TRIALS_PER_SESSION, (j + 1) * TRIALS_PER_SESSION)
            data = np.zeros((X, Y, Z, TRIALS_PER_SESSION), dtype=np.int16)
            flat = data.reshape(-1, TRIALS_PER_SESSION)  # C-order (X,Y,Z) voxel rows, a view
            offset = srng.normal(0, 0.5, len(brain_flat)).astype(np.float32)
            for t0 in range(0, TRIALS_PER_SESSION, 150):
                t1 = min(t0 + 150, TRIALS_PER_SESSION)
                pct = srng.standard_normal((len(brain_flat), t1 - t0), dtype=np.float32) + offset[:, None]
                flat[brain_flat, t0:t1] = np.clip(np.rint(pct * 300), -32768, 32767).astype(np.int16)
                sig = signal[local[rows][t0:t1]].T  # (roi, trials)
                cur = flat[roi_idx, t0:t1].astype(np.float32) / 300 + sig
                flat[roi_idx, t0:t1] = np.clip(np.rint(cur * 300), -32768, 32767).astype(np.int16)
            name = f"betas_session{sess:02d}"
            if nifti:
                img = nib.Nifti1Image(data, affine)
                img.set_data_dtype(np.int16)
                previous = nib.openers.Opener.default_compresslevel
                nib.openers.Opener.default_compresslevel = gzip_level
                try:
                    nib.save(img, str(beta_dir / f"{name}.nii.gz"))
                finally:
                    nib.openers.Opener.default_compresslevel = previous
            if hdf5:
                with h5py.File(beta_dir / f"{name}.hdf5", "w") as f:
                    f.create_dataset("betas", data=data.transpose(3, 2, 1, 0),
                                     chunks=(TRIALS_PER_SESSION, 1, 1, 1))
            del data, flat
        out["subjects"][subj] = {"roi_flat": roi_flat, "beta_dir": beta_dir}

    # ---- stimuli: full logical brick, only used ids written ----------------------------------
    stim_dir = root / "nsddata_stimuli/stimuli/nsd"
    stim_dir.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(sorted(used_ids), dtype=np.int64)
    with h5py.File(stim_dir / "nsd_stimuli.hdf5", "w") as f:
        brick = f.create_dataset("imgBrick", shape=(N_IMAGES_73K, image_side, image_side, 3), dtype=np.uint8,
                                 chunks=(1, image_side, image_side, 3), compression="gzip")
        tile = np.empty((image_side, image_side, 3), dtype=np.uint8)
        for i, c in zip(ids, fixture_colour(ids), strict=True):
            tile[:] = c
            brick[int(i)] = tile
    if captions:
        caps = np.full((N_IMAGES_73K, 5), "", dtype=object)
        for i in ids:
            for c in range(5):
                caps[i, c] = f"image {i} caption {c}" if (c or i % 7) else ""
        np.save(root / "COCO_73k_annots_curated.npy", caps, allow_pickle=True)
        out["captions"] = root / "COCO_73k_annots_curated.npy"
    out["used_ids"] = ids
    return out


def _write_responses(path: Path, rng: np.random.Generator, subj: int, sessions: list[int],
                     masterordering: np.ndarray, subjectim: np.ndarray) -> None:
    """``responses.tsv``: 19 columns, one row per trial of the written sessions, NaN for some RTs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs, trials = run_layout()
    first_seen: dict[int, int] = {}
    last_seen: dict[int, int] = {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(RESPONSE_COLUMNS)
        for sess in sessions:
            for t in range(TRIALS_PER_SESSION):
                g = (sess - 1) * TRIALS_PER_SESSION + t
                k10 = int(masterordering[g])
                k73 = int(subjectim[subj - 1, k10 - 1])
                isold = int(k10 in first_seen)
                recent = g - last_seen[k10] if isold else float("nan")
                first = g - first_seen[k10] if isold else float("nan")
                first_seen.setdefault(k10, g)
                last_seen[k10] = g
                missing = g % 97 == 5
                correct = float("nan") if missing else float(rng.integers(0, 2))
                rt = float("nan") if missing else float(np.round(rng.uniform(400, 1500), 3))
                change = float("nan") if missing else 0.0
                button = float("nan") if missing else float(1 + isold)
                row = [subj, sess, int(runs[t]), int(trials[t]), k73, k10,
                       round(sess - 1 + t * 4.0 / 86400, 8), isold, correct, rt, change, recent, first,
                       isold, correct, int(rng.integers(0, 50)), int(rng.integers(0, 50)), button, int(missing)]
                w.writerow(["NaN" if isinstance(v, float) and np.isnan(v) else v for v in row])


def _write_stim_info(path: Path, rng: np.random.Generator, shared: np.ndarray, subjectim: np.ndarray,
                     masterordering: np.ndarray) -> None:
    """``nsd_stim_info_merged.csv``: 73,000 rows, first column the 0-based row index."""
    n = N_IMAGES_73K
    shown = np.zeros((8, n), dtype=np.int64)
    reps = np.zeros((8, 3, n), dtype=np.int64)
    for s in range(8):
        ids = (subjectim[s, masterordering - 1] - 1).astype(np.int64)
        shown[s, np.unique(ids)] = 1
        order = np.argsort(ids, kind="stable")
        sid = ids[order]
        start = np.r_[0, np.flatnonzero(np.diff(sid)) + 1]
        rank = np.arange(len(sid)) - np.repeat(start, np.diff(np.r_[start, len(sid)]))
        keep = rank < 3
        reps[s, rank[keep], sid[keep]] = order[keep] + 1  # 1-based global trial
    is_shared = np.zeros(n, dtype=bool)
    is_shared[shared] = True
    coco = rng.permutation(600000)[:n] + 9
    split = np.where(rng.random(n) < 0.05, "val2017", "train2017")
    loss = np.round(rng.random(n), 6)
    header = ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000",
              *[f"subject{s}" for s in range(1, 9)],
              *[f"subject{s}_rep{r}" for s in range(1, 9) for r in range(3)]]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for i in range(n):
            w.writerow([i, int(coco[i]), split[i], "(0, 0, 0.125, 0.125)", loss[i], i, False, False,
                        bool(is_shared[i]), *shown[:, i].tolist(), *reps[:, :, i].reshape(-1).tolist()])
