"""Voxel-to-cluster (V2C) mapping of Brain-IT (docs/methods/brainit.md §2) and new-subject mapping (§7).

- :func:`fit_voxel_clusters`: L2-normalise the Universal Encoder's voxel embeddings and fit one
  Gaussian mixture jointly over all subjects' voxels, so clusters are shared across subjects; hard
  labels. Brain-IT's ``get_clusters.py`` sets no ``random_state`` (re-runs give different
  clusterings); here the fit is seeded.
- :func:`assign_new_subject`: each voxel of a new subject takes the cluster of its nearest
  reference voxel in the normalised embedding space (L2), as Brain-IT's transfer does.
- :func:`functional_labels` / :func:`cluster_agreement`: score a clustering against the known
  functional organisation of a synthetic subject, with chance and anatomical baselines.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.errors import ConfigError, MissingFileError, UnknownNameError
from braindecode_fw.io import atomic_write_bytes

FORMAT_VERSION = 1


def normalize_embeddings(x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Row-wise L2 normalisation, ``(V, e)`` -> ``(V, e)`` of ``dtype``.

    scikit-learn's ``normalize``, as Brain-IT does, so the results are the released ones bit for
    bit (its row norms round differently from ``np.linalg.norm``'s by an ulp); rows of norm below
    10 eps (zero rows) are left as they are. ``get_clusters.py`` normalises float32 (the default);
    ``map_clusters_transfer.py`` passes torch tensors, which scikit-learn turns into float64:
    ``dtype=np.float64`` reproduces that.
    """
    from sklearn.preprocessing import normalize

    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ConfigError(f"voxel embeddings must be (V, e), got shape {x.shape}")
    return normalize(x, axis=1)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (no torch import needed here)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


@dataclass
class VoxelClusters:
    """Shared voxel clusters (V2C).

    labels: subject -> ``(V_s,)`` int64 cluster ids in ``[0, K)``; centers: ``(K, e)`` GMM means in
    the normalised embedding space; embeddings: subject -> ``(V_s, e)`` float32 normalised
    embeddings; reference_subjects: the subjects the mixture was fitted on (nearest-neighbour
    candidates for new subjects); nearest: for subjects added by :func:`assign_new_subject`,
    ``(V_s, 2)`` int64 ``(index into reference_subjects, voxel index)`` of each voxel's nearest
    reference voxel; info: configuration and provenance (JSON-serialisable).
    """

    labels: dict[str, np.ndarray]
    centers: np.ndarray
    embeddings: dict[str, np.ndarray]
    n_clusters: int
    reference_subjects: list[str] = field(default_factory=list)
    nearest: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        return list(self.labels)

    def _labels(self, subject: str) -> np.ndarray:
        if subject not in self.labels:
            raise UnknownNameError(f"no cluster labels for subject {subject!r}; the clustering has {self.subjects}")
        return self.labels[subject]

    def cluster_sizes(self, subject: str | None = None) -> np.ndarray:
        """``(K,)`` voxel counts per cluster, for one subject or pooled over all."""
        labels = np.concatenate(list(self.labels.values())) if subject is None else self._labels(subject)
        return np.bincount(labels, minlength=self.n_clusters)

    def mapping_array(self, subject: str | None = None) -> np.ndarray:
        """Brain-IT's V2C mapping: ``(K, max cluster size)`` int64 voxel indices (ascending within
        each cluster), padded with −1. For one subject the indices are that subject's voxel
        indices; with ``subject=None`` they index the concatenation of all subjects' voxels in
        :attr:`subjects` order (Brain-IT's joint array)."""
        labels = np.concatenate(list(self.labels.values())) if subject is None else self._labels(subject)
        sizes = np.bincount(labels, minlength=self.n_clusters)
        out = np.full((self.n_clusters, max(int(sizes.max(initial=0)), 1)), -1, dtype=np.int64)
        order = np.argsort(labels, kind="stable")  # voxel indices grouped by cluster, ascending inside
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        for k in np.flatnonzero(sizes):
            out[k, : sizes[k]] = order[starts[k]: starts[k] + sizes[k]]
        return out

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` atomically (temporary name in the same folder, then ``os.replace``)."""
        subjects = self.subjects
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION),
            "subjects": np.array(subjects, dtype=np.str_),
            "reference_subjects": np.array(self.reference_subjects, dtype=np.str_),
            "centers": np.asarray(self.centers, dtype=np.float32),
            "n_clusters": np.array(self.n_clusters),
            "info": np.array(json.dumps(self.info, default=str)),
        }
        for i, s in enumerate(subjects):  # indexed keys: subject ids need not be valid file names
            arrays[f"labels_{i}"] = np.asarray(self.labels[s], dtype=np.int64)
            if s in self.embeddings:
                arrays[f"embeddings_{i}"] = np.asarray(self.embeddings[s], dtype=np.float32)
            if s in self.nearest:
                arrays[f"nearest_{i}"] = np.asarray(self.nearest[s], dtype=np.int64)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> VoxelClusters:
        """Read a file written by :meth:`save` (``allow_pickle=False``)."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"voxel-cluster file {path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ConfigError(f"voxel-cluster file {path} is not a readable .npz: {err}") from err
        with data:
            def get(key: str) -> np.ndarray:
                if key not in data.files:
                    raise UnknownNameError(f"voxel-cluster file {path} has no field {key!r} (fields: {sorted(data.files)})")
                try:
                    return data[key]
                except ValueError as err:  # e.g. an object array, refused with allow_pickle=False
                    raise ConfigError(f"voxel-cluster file {path}: field {key!r} cannot be read: {err}") from err

            version = int(get("format_version"))
            if version != FORMAT_VERSION:
                raise ConfigError(f"voxel-cluster file {path} has format_version {version}, expected {FORMAT_VERSION}")
            subjects = [str(s) for s in get("subjects")]
            labels, embeddings, nearest = {}, {}, {}
            for i, s in enumerate(subjects):
                labels[s] = get(f"labels_{i}").astype(np.int64)
                if f"embeddings_{i}" in data.files:
                    embeddings[s] = get(f"embeddings_{i}")
                if f"nearest_{i}" in data.files:
                    nearest[s] = get(f"nearest_{i}")
            return cls(labels=labels, centers=get("centers"), embeddings=embeddings, n_clusters=int(get("n_clusters")),
                       reference_subjects=[str(s) for s in get("reference_subjects")], nearest=nearest,
                       info=json.loads(str(get("info"))))


def fit_voxel_clusters(embeddings: Mapping[str, Any], n_clusters: int = 128, *, seed: int = 0,
                       covariance_type: str = "full", max_iter: int = 100, n_init: int = 1,
                       reg_covar: float = 1e-6) -> VoxelClusters:
    """V2C (docs/methods/brainit.md §2): one GaussianMixture over the L2-normalised voxel embeddings of all
    subjects jointly (so clusters are shared across subjects), hard labels.

    embeddings: subject -> ``(V_s, e)`` (numpy or torch). Brain-IT: K = 128, sklearn defaults
    (full covariance, 1 init, 100 iterations), no seed; here ``seed`` sets ``random_state``.
    """
    from sklearn.mixture import GaussianMixture

    if not embeddings:
        raise ConfigError("fit_voxel_clusters: no subjects given")
    normed = {s: normalize_embeddings(_as_numpy(x)) for s, x in embeddings.items()}
    dims = {s: x.shape[1] for s, x in normed.items()}
    if len(set(dims.values())) != 1:
        raise ConfigError(f"voxel embeddings of different widths: {dims}")
    pooled = np.concatenate(list(normed.values()))
    if not 1 <= n_clusters <= len(pooled):
        raise ConfigError(f"n_clusters={n_clusters} must be between 1 and the total voxel count {len(pooled)}")
    gmm = GaussianMixture(n_components=n_clusters, covariance_type=covariance_type, max_iter=max_iter,
                          n_init=n_init, reg_covar=reg_covar, random_state=seed)
    # fit, then predict, as released: fit_predict's labels come from the responsibilities, which can
    # tie (and so pick another component) where predict's weighted log-likelihoods do not
    pooled_labels = gmm.fit(pooled).predict(pooled).astype(np.int64)
    bounds = np.cumsum([0, *[len(x) for x in normed.values()]])
    labels = {s: pooled_labels[bounds[i]: bounds[i + 1]] for i, s in enumerate(normed)}
    info = {"method": "gmm", "n_clusters": n_clusters, "seed": seed, "covariance_type": covariance_type,
            "max_iter": max_iter, "n_init": n_init, "reg_covar": reg_covar, "converged": bool(gmm.converged_),
            "n_iter": int(gmm.n_iter_), "n_voxels": {s: len(x) for s, x in normed.items()},
            "embed_dim": next(iter(dims.values()))}
    return VoxelClusters(labels=labels, centers=gmm.means_.astype(np.float32), embeddings=normed,
                         n_clusters=n_clusters, reference_subjects=list(normed), info=info)


def nearest_reference(reference: np.ndarray, query: np.ndarray, *, max_elements: int = 1 << 25) -> np.ndarray:
    """Index of the nearest ``reference`` row (L2) for every ``query`` row: ``(Q,)`` int64.

    Computed in float64 when either input is float64 (Brain-IT's transfer: ``torch.cdist`` on
    float64, which decides near-ties float32 cannot), else in float32. The distance matrix is
    built ``max_elements`` entries at a time (default 32M: 128 MB float32, 256 MB float64), so
    40k new × 160k reference voxels stay small in memory.
    """
    wide = np.float64 in (np.asarray(reference).dtype, np.asarray(query).dtype)
    dtype = np.float64 if wide else np.float32
    ref = np.asarray(reference, dtype=dtype)
    q = np.asarray(query, dtype=dtype)
    ref_sq = (ref.astype(np.float64) ** 2).sum(1).astype(dtype)
    chunk = max(1, max_elements // max(len(ref), 1))
    out = np.empty(len(q), dtype=np.int64)
    for a in range(0, len(q), chunk):
        block = q[a: a + chunk]
        # ||q - r||² = ||q||² - 2 q·r + ||r||²; ||q||² is the same for the whole row
        d = ref_sq[None, :] - 2.0 * (block @ ref.T)
        out[a: a + chunk] = d.argmin(1)
    return out


def assign_new_subject(clusters: VoxelClusters, subject: str, embeddings: Any, *,
                       max_elements: int = 1 << 25,
                       reference_embeddings: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Map a new subject onto the shared clusters (docs/methods/brainit.md §7): each voxel inherits the
    cluster of its nearest reference voxel in the normalised embedding space (L2), searched in
    float64 as Brain-IT's ``map_clusters_transfer.py`` does.

    embeddings: ``(V, e)`` new-subject voxel embeddings (from the reference encoder trained with
    only these embeddings free). reference_embeddings: the reference subjects' raw embeddings
    (subject -> ``(V_s, e)``), normalised in float64 as released; without them the stored float32
    normalised ones are used (near-ties within ~1e-7 may then resolve differently from the
    release). Returns ``labels`` ``(V,)`` int64 and ``nearest`` ``(V, 2)``
    int64 = (index into ``clusters.reference_subjects``, voxel index in that subject) — the
    ``nnvox`` used to initialise the decoder's new voxel embeddings. Both, and the normalised
    embeddings, are stored in ``clusters`` under ``subject``.
    """
    refs = clusters.reference_subjects
    if not refs:
        raise ConfigError("the clustering has no reference subjects")
    missing = [s for s in refs if s not in clusters.embeddings]
    if missing:
        raise ConfigError(f"the clustering lacks the embeddings of reference subject(s) {missing}")
    if subject in refs:
        raise ConfigError(f"subject {subject!r} is a reference subject of this clustering")
    raw = _as_numpy(embeddings)
    new = normalize_embeddings(raw)
    e = clusters.embeddings[refs[0]].shape[1]
    if new.shape[1] != e:
        raise ConfigError(f"subject {subject!r}: embeddings have width {new.shape[1]}, the clustering has {e}")
    if reference_embeddings is None:
        ref = np.concatenate([clusters.embeddings[s] for s in refs]).astype(np.float64)
    else:
        missing = [s for s in refs if s not in reference_embeddings]
        if missing:
            raise UnknownNameError(f"reference_embeddings lack reference subject(s) {missing}")
        raw_refs = [_as_numpy(reference_embeddings[s]) for s in refs]
        for s, x in zip(refs, raw_refs, strict=True):
            if x.shape != clusters.embeddings[s].shape:
                raise ConfigError(f"reference_embeddings[{s!r}] has shape {x.shape}, the clustering has "
                                 f"{clusters.embeddings[s].shape}")
        ref = normalize_embeddings(np.concatenate(raw_refs), np.float64)
    bounds = np.cumsum([0, *[len(clusters.embeddings[s]) for s in refs]])
    flat = nearest_reference(ref, normalize_embeddings(raw, np.float64), max_elements=max_elements)
    which = np.searchsorted(bounds, flat, side="right") - 1
    nearest = np.stack([which, flat - bounds[which]], axis=1).astype(np.int64)
    ref_labels = np.concatenate([clusters.labels[s] for s in refs])
    labels = ref_labels[flat].astype(np.int64)
    clusters.labels[subject] = labels
    clusters.embeddings[subject] = new
    clusters.nearest[subject] = nearest
    return labels, nearest


def functional_labels(simulator: Mapping[str, np.ndarray], rf_grid: int = 3, *, signed: bool = False) -> np.ndarray:
    """Ground-truth functional organisation of a synthetic subject (``simulator.npz`` arrays of
    :class:`~braindecode_fw.data.synthetic.fmri.SubjectSimulation`): ``(V,)`` int64.

    Early voxels (``population == 0``) get the cell ``iy * rf_grid + ix`` of their receptive-field
    centre ``rf_center = (x, y)`` on an ``rf_grid × rf_grid`` visual-field grid; higher voxels get
    ``rf_grid² + argmax_f |semantic_tuning[v, f]|`` (the feature they are most selective for), or
    with ``signed=True`` ``rf_grid² + f`` for a positive and ``rf_grid² + F + f`` for a negative
    preference (``2F`` semantic labels). Labels are comparable across subjects.
    """
    for key in ("population", "rf_center", "semantic_tuning"):
        if key not in simulator:
            raise UnknownNameError(f"simulator arrays lack {key!r} (have {sorted(simulator)})")
    if rf_grid < 1:
        raise ConfigError(f"rf_grid must be >= 1, got {rf_grid}")
    pop = np.asarray(simulator["population"])
    rf = np.asarray(simulator["rf_center"], dtype=np.float64)
    tuning = np.asarray(simulator["semantic_tuning"], dtype=np.float64)
    out = np.empty(len(pop), dtype=np.int64)
    early, higher = pop == 0, pop != 0
    if early.any():
        if np.isnan(rf[early]).any():
            raise ConfigError("early voxels with NaN rf_center")
        cells = np.clip(np.floor(rf[early] * rf_grid), 0, rf_grid - 1).astype(np.int64)
        out[early] = cells[:, 1] * rf_grid + cells[:, 0]
    if higher.any():
        if tuning.ndim != 2 or tuning.shape[1] == 0:
            raise ConfigError(f"higher voxels need semantic_tuning (V, F) with F >= 1, got shape {tuning.shape}")
        t = tuning[higher]
        out[higher] = rf_grid**2 + (np.concatenate([t, -t], axis=1).argmax(1) if signed else np.abs(t).argmax(1))
    return out


def cluster_agreement(clusters: VoxelClusters, truth: Mapping[str, np.ndarray], *,
                      coords: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> dict[str, Any]:
    """Adjusted Rand index between the clustering and ``truth`` (subject -> ``(V_s,)`` labels in
    a space shared by subjects, e.g. :func:`functional_labels`), pooled over ``truth``'s subjects
    and per subject.

    Baselines with the same K: ``random`` permutes the pooled cluster labels (same cluster sizes;
    chance level ≈ 0); ``anatomical`` (when ``coords`` subject -> ``(V_s, 3)`` voxel coordinates in
    a common space, e.g. ``voxel_ijk``, are given) is KMeans on the pooled coordinates.
    Returns ``{"ari", "ari_per_subject", "random_ari", "random_ari_per_subject"[,
    "anatomical_ari", "anatomical_ari_per_subject"]}``.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    subjects = list(truth)
    if not subjects:
        raise ConfigError("cluster_agreement: no subjects in truth")
    for s in subjects:
        if len(clusters._labels(s)) != len(truth[s]):
            raise ConfigError(f"subject {s!r}: {len(clusters.labels[s])} cluster labels but {len(truth[s])} truth labels")
    bounds = np.cumsum([0, *[len(truth[s]) for s in subjects]])
    true = np.concatenate([np.asarray(truth[s]) for s in subjects])

    def score(pred: np.ndarray) -> tuple[float, dict[str, float]]:
        per = {s: float(adjusted_rand_score(true[bounds[i]: bounds[i + 1]], pred[bounds[i]: bounds[i + 1]]))
               for i, s in enumerate(subjects)}
        return float(adjusted_rand_score(true, pred)), per

    out: dict[str, Any] = {}
    out["ari"], out["ari_per_subject"] = score(np.concatenate([clusters.labels[s] for s in subjects]))
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(np.concatenate([clusters.labels[s] for s in subjects]))
    out["random_ari"], out["random_ari_per_subject"] = score(shuffled)
    if coords is not None:
        missing = [s for s in subjects if s not in coords]
        if missing:
            raise UnknownNameError(f"coords lack subject(s) {missing}")
        xyz = np.concatenate([np.asarray(coords[s], dtype=np.float64) for s in subjects])
        if len(xyz) != len(true):
            raise ConfigError(f"coords have {len(xyz)} rows, truth has {len(true)} voxels")
        k = min(clusters.n_clusters, len(np.unique(xyz, axis=0)))
        anat = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(xyz)
        out["anatomical_ari"], out["anatomical_ari_per_subject"] = score(anat)
    return out
