"""Miniature MindEye2 / MindEye1 releases in the real on-disk formats (docs/datasets/mindeye.md).

The files carry the real names, dtypes, keys, axis orders and index bases; only the sizes are tiny
(8 voxels, a few hundred images). The 73k image array keeps its full logical shape
``(73000, 3, 224, 224)`` with lazily allocated ``(1, 3, 224, 224)`` chunks, so only the images the
design uses occupy disk. Each used image is a flat colour that encodes its 73k id, with a band of the
complementary colour over the top rows (so a height/width swap is visible).

Used by ``tests/data/convert/test_mindeye.py``; the returned dictionaries hold the ground truth.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from braindecode_fw.errors import DataError

N_IMAGES_73K = 73000
TRIALS_PER_SESSION = 750
RUN_LENGTHS = (63, 62) * 6  # NSD: 12 runs of 63/62 trials per 750-trial session
N_BEHAV_COLUMNS = 17
BAND_ROWS = 16  # rows of the complementary colour at the top of every fixture image


def image_colour(id73k: int) -> np.ndarray:
    """The flat RGB colour (uint8 ``(3,)``) that encodes a 73k id (unique for ids < 131072)."""
    return np.array([id73k % 256, (id73k // 256) % 256, 100 + id73k // 65536], dtype=np.uint8)


def fixture_image(id73k: int, size: int = 224) -> np.ndarray:
    """The fixture's image for ``id73k`` as uint8 ``(size, size, 3)`` (HWC)."""
    colour = image_colour(id73k)
    img = np.broadcast_to(colour, (size, size, 3)).copy()
    img[: BAND_ROWS * size // 224] = 255 - colour
    return img


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------------
# MindEye2
# --------------------------------------------------------------------------------------------


@dataclass
class MindEye2Design:
    """Ground truth of one fixture subject: per global trial (``n_sessions * 750``)."""

    subject: int
    id73k: np.ndarray  # (n_trials,) 0-based 73k id
    shared: np.ndarray  # (n_trials,) bool
    session: np.ndarray  # 1-based
    run: np.ndarray  # 1-based
    trial_in_run: np.ndarray  # 1-based
    betas: np.ndarray  # (n_trials, n_voxels) float32
    behav: np.ndarray  # (n_trials, 17) float64, -1 = NaN
    extra: dict = field(default_factory=dict)


def _mindeye2_design(subject: int, n_sessions: int, n_voxels: int, rng: np.random.Generator,
                     shared_ids: np.ndarray) -> MindEye2Design:
    n = n_sessions * TRIALS_PER_SESSION
    # shared images: all but the last two shown 3x, one 2x, one 1x (exercises repetition padding)
    shared_reps = np.full(len(shared_ids), 3)
    shared_reps[-2:] = (2, 1)
    shared_trials = np.repeat(shared_ids, shared_reps)
    n_train = n - len(shared_trials)
    # subject-specific training images (disjoint between subjects), mostly 3 presentations
    base = 1000 + 20000 * subject
    n_train_images = n_train // 3 + 2
    train_ids = base + rng.choice(15000, n_train_images, replace=False)
    reps = np.full(n_train_images, 3)
    reps[: 3 * n_train_images - n_train] -= 1  # a few images seen only twice
    train_trials = np.repeat(train_ids, reps)
    assert len(train_trials) == n_train
    ids = np.concatenate([shared_trials, train_trials])[rng.permutation(n)]
    session = np.arange(n) // TRIALS_PER_SESSION + 1
    within = np.arange(n) % TRIALS_PER_SESSION
    run_starts = np.cumsum((0, *RUN_LENGTHS))
    run = np.searchsorted(run_starts, within, side="right")
    trial_in_run = within - run_starts[run - 1] + 1
    shared = np.isin(ids, shared_ids)
    betas = rng.standard_normal((n, n_voxels)).astype(np.float32)
    behav = np.full((n, N_BEHAV_COLUMNS), -1.0)
    behav[:, 0] = ids
    behav[:, 1] = subject
    behav[:, 2] = session
    behav[:, 3] = run
    behav[:, 4] = trial_in_run
    behav[:, 5] = np.arange(n)
    behav[:, 6] = (session - 1) * 7 + within * 4.0 / 86400  # days
    seen: dict[int, int] = {}
    for g, i in enumerate(ids):
        behav[g, 7] = float(seen.get(int(i), 0) > 0)
        seen[int(i)] = seen.get(int(i), 0) + 1
    behav[:, 8] = rng.integers(0, 2, n)
    behav[:, 9] = rng.uniform(300, 1500, n).round()
    missing = rng.random(n) < 0.02  # no response: NaN (-1) in iscorrect, rt, button
    behav[missing, 8] = -1
    behav[missing, 9] = -1
    behav[:, 11] = behav[:, 7]
    behav[:, 12] = behav[:, 8]
    behav[:, 13] = rng.integers(0, 5, n)
    behav[:, 14] = rng.integers(0, 5, n)
    behav[:, 15] = np.where(missing, -1, rng.integers(1, 5, n))
    behav[:, 16] = shared.astype(float)
    return MindEye2Design(subject, ids.astype(np.int64), shared, session, run, trial_in_run, betas, behav)


def _sample_members(design: MindEye2Design, g: int) -> dict[str, np.ndarray]:
    """behav / past_behav / future_behav / olds_behav of global trial ``g`` (docs/datasets/mindeye.md)."""
    behav = design.behav
    ses0 = (g // TRIALS_PER_SESSION) * TRIALS_PER_SESSION
    past = np.full((15, N_BEHAV_COLUMNS), -1.0)
    for k in range(15):
        p = g - 15 + k
        if p >= ses0:
            past[k] = behav[p]
    future = np.full((15, N_BEHAV_COLUMNS), -1.0)
    for k in range(15):
        f = g + 1 + k
        if f < ses0 + TRIALS_PER_SESSION:
            future[k] = behav[f]
    olds = np.full((3, N_BEHAV_COLUMNS), -1.0)
    others = [t for t in np.flatnonzero(design.id73k == design.id73k[g]) if t != g]
    for k, t in enumerate(others[:3]):
        olds[k] = behav[t]
    return {"behav.npy": behav[g][None], "past_behav.npy": past, "future_behav.npy": future,
            "olds_behav.npy": olds}


def write_behaviour_tar(path: Path, design: MindEye2Design, trials: np.ndarray, first_key: int) -> int:
    """One webdataset tar with the given global trials; returns the next sample counter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = first_key
    with tarfile.open(path, "w") as tf:
        for g in trials:
            for ext, arr in _sample_members(design, int(g)).items():
                _add_member(tf, f"sample{key:09d}.{ext}", _npy_bytes(arr))
            key += 1
    return key


def write_mindeye2_fixture(root: str | Path, subjects: tuple[int, ...] = (1,), n_sessions: int = 2,
                           n_voxels: int = 8, n_shared: int = 8, seed: int = 0) -> dict[int, MindEye2Design]:
    """Write a miniature MindEye2 release under ``root`` (format: docs/datasets/mindeye.md).

    Per subject: ``betas_all_subjXX_fp32_renorm.hdf5`` ``betas`` float32 ``(n_sessions*750, n_voxels)``,
    ``wds/subjXX/train/{0..n_sessions-1}.tar`` (non-shared trials of each session),
    ``wds/subjXX/new_test/0.tar`` (every shared trial) and ``wds/subjXX/test/0.tar`` (legacy: the
    shared trials of all sessions but the last, as in the older 37-of-40-session release).
    Shared: ``coco_images_224_float16.hdf5``, ``shared1000.npy``, ``COCO_73k_subj_indices.hdf5``.
    The ``n_shared`` shared images are shown 3x except the last two (2x and 1x).
    Returns the design per subject.
    """
    import h5py

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shared_ids = np.sort(rng.choice(1000, n_shared, replace=False) * 7 + 3)
    designs = {s: _mindeye2_design(s, n_sessions, n_voxels, rng, shared_ids) for s in subjects}
    shared_mask = np.zeros(N_IMAGES_73K, dtype=bool)
    shared_mask[shared_ids] = True
    np.save(root / "shared1000.npy", shared_mask)
    with h5py.File(root / "COCO_73k_subj_indices.hdf5", "w") as f:
        for s, d in designs.items():
            f.create_dataset(f"subj{s:02d}", data=d.id73k.astype(np.int64))
    used = np.unique(np.concatenate([d.id73k for d in designs.values()]))
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as f:
        ds = f.create_dataset("images", shape=(N_IMAGES_73K, 3, 224, 224), dtype=np.float16,
                              chunks=(1, 3, 224, 224), compression="gzip")
        for i in used:
            ds[int(i)] = (fixture_image(int(i)).transpose(2, 0, 1) / np.float32(255)).astype(np.float16)
    for s, d in designs.items():
        with h5py.File(root / f"betas_all_subj{s:02d}_fp32_renorm.hdf5", "w") as f:
            f.create_dataset("betas", data=d.betas)
        wds = root / "wds" / f"subj{s:02d}"
        key = 0
        for e in range(n_sessions):
            rows = np.flatnonzero((d.session == e + 1) & ~d.shared)
            key = write_behaviour_tar(wds / "train" / f"{e}.tar", d, rows, key)
        write_behaviour_tar(wds / "new_test" / "0.tar", d, np.flatnonzero(d.shared), 0)
        write_behaviour_tar(wds / "test" / "0.tar", d, np.flatnonzero(d.shared & (d.session < n_sessions)), 0)
    return designs


# --------------------------------------------------------------------------------------------
# MindEye1 webdataset_avg_split
# --------------------------------------------------------------------------------------------


@dataclass
class MindEye1Sample:
    split: str
    key: str
    id73k: int
    nsdgeneral: np.ndarray  # (3, n_voxels) float32
    jpg: bytes


def _jpeg_bytes(id73k: int, size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(fixture_image(id73k, size)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_mindeye1_avg_fixture(root: str | Path, subjects: tuple[int, ...] = (1,), layout: str = "tar",
                               counts: dict[str, int] | None = None, n_voxels: int = 10,
                               image_size: int = 64, seed: int = 0) -> dict[int, list[MindEye1Sample]]:
    """Write a miniature MindEye1 ``webdataset_avg_split`` under ``root`` (docs/datasets/mindeye.md).

    ``layout="tar"``: ``{train,val,test}/{split}_subjXX_{k}.tar`` (train in 2 shards, test in 2) and
    ``metadata_subjXX.json``; ``layout="extracted"``: MindBridge's
    ``{train,val,test}/subjXX/sampleNNNNNNNNN.<ext>``. Members: ``nsdgeneral.npy`` float32
    ``(3, n_voxels)``, ``jpg``, ``coco73k.npy`` (``(1,)`` int64, 0-based), ``trial.npy``,
    ``num_uniques.npy``. Test images are shared between subjects. Returns the samples per subject.
    """
    if layout not in ("tar", "extracted"):
        raise DataError(f"layout must be 'tar' or 'extracted', got {layout!r}")
    root = Path(root)
    counts = counts or {"train": 6, "val": 2, "test": 3}
    rng = np.random.default_rng(seed)
    test_ids = rng.choice(1000, counts["test"], replace=False) + 5
    out: dict[int, list[MindEye1Sample]] = {}
    for s in subjects:
        own = 2000 + 10000 * s + rng.choice(5000, counts["train"] + counts["val"], replace=False)
        ids = {"train": own[: counts["train"]], "val": own[counts["train"]:], "test": test_ids}
        samples = []
        key = 0
        for split in ("train", "val", "test"):
            for i in ids[split]:
                samples.append(MindEye1Sample(split, f"sample{key:09d}", int(i),
                                              rng.standard_normal((3, n_voxels)).astype(np.float32),
                                              _jpeg_bytes(int(i), image_size)))
                key += 1
        out[s] = samples
        for split in ("train", "val", "test"):
            mine = [x for x in samples if x.split == split]
            shards = [mine] if split == "val" else [mine[: (len(mine) + 1) // 2], mine[(len(mine) + 1) // 2:]]
            for k, shard in enumerate(shards):
                members = []
                for x in shard:
                    members += [(f"{x.key}.nsdgeneral.npy", _npy_bytes(x.nsdgeneral)), (f"{x.key}.jpg", x.jpg),
                                (f"{x.key}.coco73k.npy", _npy_bytes(np.array([x.id73k], dtype=np.int64))),
                                (f"{x.key}.trial.npy", _npy_bytes(np.array([int(x.key[6:])], dtype=np.int64))),
                                (f"{x.key}.num_uniques.npy", _npy_bytes(np.array([3], dtype=np.int64)))]
                if layout == "tar":
                    path = root / split / f"{split}_subj{s:02d}_{k}.tar"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with tarfile.open(path, "w") as tf:
                        for name, data in members:
                            _add_member(tf, name, data)
                else:
                    d = root / split / f"subj{s:02d}"
                    d.mkdir(parents=True, exist_ok=True)
                    for name, data in members:
                        (d / name).write_bytes(data)
        if layout == "tar":
            meta = {"totals": {split: sum(x.split == split for x in samples) for split in ("train", "val", "test")}}
            (root / f"metadata_subj{s:02d}.json").write_text(json.dumps(meta))
    return out
