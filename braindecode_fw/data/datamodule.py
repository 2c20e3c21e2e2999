"""BrainDataModule: prepared store + targets -> subject-balanced batches (docs/architecture.md §2, §4.2).

- Responses are read from the store's memory maps batch by batch (sorted fancy indexing) and
  z-scored per subject and session with statistics fitted on that session's *training* trials.
- Training batches hold ``batch_size // n_subjects`` trials of every subject
  (:class:`SubjectBalancedBatchSampler`), drawn from permutations seeded by ``(seed, epoch)`` so a
  resumed run replays exactly the same batches.
- Test items are (subject, image) pairs holding every repetition; they are averaged in input space
  (``repeat_averaging=inputs``) or passed as ``(repeats, features)`` with a ``repeat_mask`` so the
  model averages its outputs (``repeat_averaging=outputs``, MindEye2's choice, docs/evaluation.md).
- Batches mix subjects; ``responses`` are zero-padded to the largest feature count in the batch and
  adapters route rows by ``subject``.
- *Online targets* (``data.online_targets``) are not cached: their batches carry the stimulus images
  and the target encoder runs on them after the batch reached its device
  (:meth:`BrainDataModule.on_after_batch_transfer`), i.e. on the GPU inside the training step. This
  is for targets too large to store, such as Brain-IT's 7,190 × 512 VGG tokens per image (540 GB as
  float16 for NSD's 73k images).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from braindecode_fw.contracts import Batch  # re-exported: the batch contract lives in contracts.py
from braindecode_fw.data.budget import Budget, budget_mask, chronological_order
from braindecode_fw.data.normalization import SessionStats, fit_session_stats
from braindecode_fw.data.store import PreparedStore, open_store
from braindecode_fw.errors import DataError, UnknownNameError
from braindecode_fw.targets.cache import load_or_compute_targets
from braindecode_fw.targets.encoders import TargetEncoder

log = logging.getLogger(__name__)

REPEAT_AVERAGING = ("inputs", "outputs")
ZSCORE_MODES = (True, False, "auto")


def resolve_zscore(setting: bool | str, provenance: Mapping[str, Any]) -> bool:
    """``data.zscore``: ``true``/``false`` as given; ``auto`` z-scores unless the store's provenance
    says its responses are already normalised (``zscore_at_load: false``, e.g. MindEye2's release)."""
    if setting == "auto":
        return bool(provenance.get("zscore_at_load", True))
    return bool(setting)


class _LazyMemmap:
    """Memory-maps an ``.npy`` file on first use (memory maps must not be pickled into workers: a
    pickled map copies the whole array)."""

    def __init__(self, path: Path):
        self.path = path
        self._arr: np.ndarray | None = None

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}

    @property
    def array(self) -> np.ndarray:
        if self._arr is None:
            self._arr = np.load(self.path, mmap_mode="r")
        return self._arr


class _SubjectReader(_LazyMemmap):
    """One subject's responses, z-scored per session on read."""

    def __init__(self, path: Path, stats: SessionStats | None, session: np.ndarray):
        super().__init__(path)
        self.stats = stats
        self.session = session

    def read(self, rows: np.ndarray, zscore: bool) -> np.ndarray:
        """Rows (any order) -> float32 ``(len(rows), F)``, z-scored per session if asked."""
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.float32)
        sorted_rows = rows[order]
        block = np.asarray(self.array[sorted_rows], dtype=np.float32)
        if zscore:
            assert self.stats is not None, "z-scoring needs session statistics"
            block = self.stats.apply(block, self.session[sorted_rows])
        out[order] = block
        return out


class TrialDataset(torch.utils.data.Dataset):
    """Single trials of several subjects. Item ``i`` is trial ``rows[i]`` of ``subject_pos[i]``.

    Implements ``__getitems__`` so a whole batch is read with one sorted fancy index per subject.
    """

    def __init__(self, readers: list[_SubjectReader], subjects: list[str], subject_pos: np.ndarray,
                 rows: np.ndarray, image_index: np.ndarray, targets: dict[str, np.ndarray], zscore: bool,
                 stimuli: _LazyMemmap | None = None):
        self.readers, self.subjects = readers, subjects
        self.subject_pos, self.rows, self.image_index = subject_pos, rows, image_index
        self.targets, self.zscore = targets, zscore
        self.stimuli = stimuli  # the store's images: batches carry them for online targets

    def _batch_images(self, images: np.ndarray) -> torch.Tensor | None:
        return None if self.stimuli is None else torch.from_numpy(_gather_rows(self.stimuli.array, images, np.uint8))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def _padded_shape(self, pos: np.ndarray) -> tuple[int, ...]:
        """Per-row response shape of a batch mixing the subjects ``pos``: ``(F,)`` fMRI or ``(C, T)``
        MEG, with ``F``/``C`` the largest among them (rows zero-padded); ``T`` must agree."""
        shapes = [self.readers[p].array.shape[1:] for p in np.unique(pos)]
        rest = {s[1:] for s in shapes}
        if len(rest) > 1:
            raise DataError(f"subjects {[self.subjects[p] for p in np.unique(pos)]} have responses of different "
                             f"shapes {shapes}: only the first (feature/sensor) axis may differ")
        return (max(s[0] for s in shapes), *rest.pop())

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices)
        pos = self.subject_pos[idx]
        responses = np.zeros((len(idx), *self._padded_shape(pos)), dtype=np.float32)
        for p in np.unique(pos):
            sel = np.flatnonzero(pos == p)
            block = self.readers[p].read(self.rows[idx[sel]], self.zscore)
            responses[sel, : block.shape[1]] = block
        images = self.image_index[idx]
        return Batch(
            subject=[self.subjects[p] for p in pos],
            responses=torch.from_numpy(responses),
            image_index=torch.from_numpy(images),
            targets={k: _gather_targets(v, images) for k, v in self.targets.items()},
            images=self._batch_images(images),
        )


class RepeatedTrialDataset(TrialDataset):
    """Test items: all repetitions of one image for one subject. ``rows``: ``(n_items, R)`` with
    ``-1`` where an image has fewer than ``R`` repetitions."""

    def __init__(self, *args, average_inputs: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.average_inputs = average_inputs

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices)
        pos = self.subject_pos[idx]
        n_rep = self.rows.shape[1]
        responses = np.zeros((len(idx), n_rep, *self._padded_shape(pos)), dtype=np.float32)
        mask = self.rows[idx] >= 0
        for p in np.unique(pos):
            sel = np.flatnonzero(pos == p)
            rows = self.rows[idx[sel]]
            valid = rows >= 0
            block = self.readers[p].read(rows[valid], self.zscore)
            tmp = np.zeros((len(sel), n_rep, *block.shape[1:]), dtype=np.float32)
            tmp[valid] = block
            responses[sel, :, : block.shape[1]] = tmp
        mask_t = torch.from_numpy(mask)
        resp = torch.from_numpy(responses)
        if self.average_inputs:
            w = mask_t.to(resp.dtype).view(*mask_t.shape, *[1] * (resp.ndim - 2))
            resp = (resp * w).sum(1) / w.sum(1).clamp(min=1)
        images = self.image_index[idx]
        return Batch(
            subject=[self.subjects[p] for p in pos],
            responses=resp,
            image_index=torch.from_numpy(images),
            targets={k: _gather_targets(v, images) for k, v in self.targets.items()},
            repeat_mask=None if self.average_inputs else mask_t,
            images=self._batch_images(images),
        )


def _gather_rows(array: np.ndarray, rows: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``array[rows]`` as ``dtype``, read with a sorted index (fast on memory maps)."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *array.shape[1:]), dtype=dtype)
    out[order] = array[rows[order]]
    return out


def _gather_targets(targets: np.ndarray, images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(_gather_rows(targets, images))


def _identity(batch: Batch) -> Batch:
    return batch


class SubjectBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches with an equal share of every subject, reproducible from ``(seed, epoch)``.

    ``groups[s]`` lists the dataset indices of subject ``s``. Each batch takes
    ``batch_size // n_subjects`` indices per subject (the remainder goes to the first subjects)
    from a per-subject permutation that is re-drawn when exhausted, so subjects with fewer trials
    are cycled. An epoch has ``sum(len(g)) // batch_size`` batches. With several processes
    (``num_replicas``), rank ``r`` takes every ``num_replicas``-th batch. Lightning calls
    :meth:`set_epoch` (pass ``use_distributed_sampler=False`` to the Trainer).
    """

    def __init__(self, groups: list[np.ndarray], batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        if batch_size < len(groups):
            raise DataError(f"data.batch_size={batch_size} must be >= the number of subjects ({len(groups)})")
        self.groups = [np.asarray(g) for g in groups]
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        per = batch_size // len(groups)
        self.per_subject = [per + (1 if i < batch_size - per * len(groups) else 0) for i in range(len(groups))]
        total = sum(len(g) for g in self.groups)
        self.n_batches_total = max(total // batch_size, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches_total // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perms = [g[rng.permutation(len(g))] for g in self.groups]
        cursors = [0] * len(self.groups)
        n_keep = len(self) * self.num_replicas
        for b in range(n_keep):
            batch: list[int] = []
            for s, g in enumerate(self.groups):
                need = self.per_subject[s]
                while need:
                    if cursors[s] == len(g):
                        perms[s] = g[rng.permutation(len(g))]
                        cursors[s] = 0
                    take = min(need, len(g) - cursors[s])
                    batch.extend(perms[s][cursors[s] : cursors[s] + take].tolist())
                    cursors[s] += take
                    need -= take
            if b % self.num_replicas == self.rank:
                yield batch


class BrainDataModule(L.LightningDataModule):
    """Multi-subject fMRI/MEG data from a prepared store, with targets from a frozen encoder."""

    def __init__(
        self,
        store: str | Path,
        target_encoder: TargetEncoder | None = None,
        *,
        extra_target_encoders: list[TargetEncoder] | None = None,
        subjects: list[str] | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        zscore: bool | str = "auto",
        repeat_averaging: str = "inputs",
        seed: int = 0,
        cache_dir: str | Path | None = None,
        target_dtype: str = "float32",
        pin_memory: bool = False,
        check_finite: bool = True,
        train_budget: Mapping[str, Mapping[str, Any]] | None = None,
        trial_seconds: float = 4.0,
        eval_subjects: list[str] | None = None,
        online_targets: Sequence[str] | None = None,
    ):
        super().__init__()
        if zscore not in ZSCORE_MODES:
            raise DataError(f"data.zscore must be true, false or auto, got {zscore!r}")
        if repeat_averaging not in REPEAT_AVERAGING:
            raise DataError(f"data.repeat_averaging must be one of {REPEAT_AVERAGING}, got {repeat_averaging!r}")
        self.store_path = Path(store)
        self.target_encoder = target_encoder
        self.extra_target_encoders = list(extra_target_encoders or [])
        names = [e.feature_name for e in ([target_encoder] if target_encoder else []) + self.extra_target_encoders]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DataError(f"extra_targets: feature name(s) {duplicates} appear twice; every target needs its own")
        self.requested_subjects = list(subjects) if subjects is not None else None
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.zscore_setting = num_workers, zscore
        self.zscore = zscore is True  # resolved against the store's provenance in setup()
        self.repeat_averaging, self.seed = repeat_averaging, seed
        self.cache_dir = Path(cache_dir) if cache_dir else self.store_path.parent / "target_cache"
        self.target_dtype, self.pin_memory, self.check_finite = target_dtype, pin_memory, check_finite
        # budgets: subject -> {sessions|minutes|trials: amount}; only the training/validation trials
        # inside it are used (data/budget.py)
        self.train_budget = {str(s): Budget.parse(spec, f"data.train_budget.{s}")
                             for s, spec in (train_budget or {}).items()}
        self.trial_seconds = float(trial_seconds)
        self.eval_subjects = list(eval_subjects) if eval_subjects else None
        self.online_targets = list(online_targets or [])
        self.online_encoders: dict[str, TargetEncoder] = {}
        self._online_shapes: dict[str, tuple[int, ...]] = {}
        self.store: PreparedStore | None = None
        self._ready = False

    # ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        self.store = open_store(self.store_path, check_finite=self.check_finite)
        self.zscore = resolve_zscore(self.zscore_setting, self.store.meta.get("provenance", {}))
        if not self.zscore and self.zscore_setting == "auto":
            log.info("%s: responses already normalised (provenance %s); not z-scoring again",
                     self.store_path, self.store.meta["provenance"].get("normalisation", "zscore_at_load=false"))
        available = list(self.store.subjects)
        subjects = self.requested_subjects or available
        unknown = [s for s in subjects if s not in available]
        if unknown:
            raise DataError(
                f"data.subjects: unknown subject(s) {unknown}; the store {self.store_path} has {available}"
            )
        self.subjects = subjects
        for key, names in (("data.train_budget", list(self.train_budget)),
                           ("data.eval_subjects", self.eval_subjects or [])):
            stray = [s for s in names if s not in subjects]
            if stray:
                raise DataError(f"{key}: subject(s) {stray} are not among the data's subjects {subjects}")
        self.budget_masks = {}
        for s, budget in self.train_budget.items():
            try:
                self.budget_masks[s] = budget_mask(self.store.subjects[s].trials, budget, self.trial_seconds)
            except ValueError as err:
                raise DataError(f"data.train_budget.{s}: {err}") from None
        self.readers: list[_SubjectReader] = []
        self.stats: dict[str, SessionStats] = {}
        for s in subjects:
            sd = self.store.subjects[s]
            st = None
            if self.zscore:  # a full pass over the responses: only when they are z-scored
                st = fit_session_stats(sd.responses, sd.trials.session, sd.trials.split == "train")
                if st.fallback_sessions:
                    log.warning("%s: sessions %s have too few training trials; using subject-wide statistics",
                                s, st.fallback_sessions)
                self.stats[s] = st
            self.readers.append(_SubjectReader(sd.directory / "responses.npy", st, sd.trials.session))
        self.targets: dict[str, np.ndarray] = {}
        encoders = ([self.target_encoder] if self.target_encoder is not None else []) + self.extra_target_encoders
        self._check_online_targets(encoders)
        for encoder in encoders:
            if encoder.feature_name in self.online_targets:
                self.online_encoders[encoder.feature_name] = encoder
                self._online_shapes[encoder.feature_name] = tuple(encoder.output_shape)
                log.info("targets %s: online (encoded on the batch's device, shape %s)", encoder.feature_name,
                         self._online_shapes[encoder.feature_name])
                continue
            arr = load_or_compute_targets(self.store, encoder, self.cache_dir, dtype=self.target_dtype)
            # small target sets are loaded into RAM; large ones stay memory-mapped
            self.targets[encoder.feature_name] = np.asarray(arr) if arr.nbytes < 2**30 else arr
        self._ready = True

    def _check_online_targets(self, encoders: list[TargetEncoder]) -> None:
        names = [e.feature_name for e in encoders]
        unknown = sorted(set(self.online_targets) - set(names))
        if unknown:
            raise DataError(f"data.online_targets: {unknown} are not targets of this run; its targets are {names} "
                             f"(target.feature_name and extra_targets.*.feature_name)")
        if self.target_encoder is not None and self.target_encoder.feature_name in self.online_targets:
            raise DataError(f"data.online_targets: the primary target {self.target_encoder.feature_name!r} is "
                             f"scored by retrieval against stored targets, so it must be cached; put only "
                             f"extra_targets online")
        for e in encoders:
            if e.feature_name in self.online_targets and not hasattr(e, "encode_on_device"):
                raise DataError(f"data.online_targets: {e.feature_name!r} ({type(e).__name__}) is not an image "
                                 f"encoder; only image targets can be computed online")

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Lightning hook (batch already on its device): add the online targets."""
        return self.attach_online_targets(batch)

    def attach_online_targets(self, batch: Batch) -> Batch:
        """``batch.targets[name]`` for every online target, encoded from ``batch.images`` on their device."""
        if self.online_encoders:
            if batch.images is None:
                raise DataError(f"data.online_targets {sorted(self.online_encoders)}: the batch carries no images")
            for name, encoder in self.online_encoders.items():
                batch.targets[name] = encoder.encode_on_device(batch.images)
        return batch

    def _stimuli(self) -> _LazyMemmap | None:
        assert self.store is not None
        return _LazyMemmap(self.store.root / "images" / "images.npy") if self.online_encoders else None

    def _require_stored(self, name: str, what: str) -> None:
        if name in self.online_encoders:
            raise DataError(f"{what}: target {name!r} is computed online (data.online_targets), not stored; "
                             f"remove it from data.online_targets to cache it")

    @property
    def n_features(self) -> dict[str, int]:
        """Input size of every subject (voxels, or sensors for MEG)."""
        assert self.store is not None, "call setup() first"
        return {s: self.store.subjects[s].n_features for s in self.subjects}

    @property
    def response_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-trial response shape of every subject: ``(voxels,)`` fMRI, ``(sensors, times)`` MEG."""
        assert self.store is not None, "call setup() first"
        return {s: tuple(self.store.subjects[s].responses.shape[1:]) for s in self.subjects}

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**{k: tuple(v.shape[1:]) for k, v in self.targets.items()}, **self._online_shapes}

    def split_subjects(self, split: str) -> list[str]:
        """The subjects whose trials ``split`` reads: all for training, ``eval_subjects`` otherwise."""
        if split == "train" or self.eval_subjects is None:
            return list(self.subjects)
        return [s for s in self.subjects if s in self.eval_subjects]

    def _trial_dataset(self, split: str) -> tuple[TrialDataset, list[np.ndarray]]:
        """Single trials of ``split``; ``groups[i]`` indexes the trials of ``split_subjects(split)[i]``."""
        assert self.store is not None
        pos, rows, imgs, groups = [], [], [], []
        offset = 0
        for s in self.split_subjects(split):
            p = self.subjects.index(s)
            t = self.store.subjects[s].trials
            r = np.flatnonzero(t.split == split)
            if split in ("train", "val") and s in self.budget_masks:
                r = r[self.budget_masks[s][r]]
            pos.append(np.full(len(r), p))
            rows.append(r)
            imgs.append(t.image_index[r])
            groups.append(offset + np.arange(len(r)))
            offset += len(r)
        ds = TrialDataset(self.readers, self.subjects, np.concatenate(pos), np.concatenate(rows),
                          np.concatenate(imgs), self.targets, self.zscore, stimuli=self._stimuli())
        return ds, groups

    def trial_counts(self, split: str = "train") -> dict[str, int]:
        """Trials per subject in ``split`` after budgets (``train_budget``) and ``eval_subjects``."""
        _, groups = self._trial_dataset(split)
        return {s: len(g) for s, g in zip(self.split_subjects(split), groups, strict=True)}

    def subject_arrays(self, subject: str, target: str, split: str = "train", limit: int | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One subject's single trials of ``split`` (after budgets): responses ``(N, F_s)`` and the
        flattened ``target`` ``(N, D)``; at most ``limit`` trials, drawn at random with ``seed``."""
        self._require_stored(target, "subject_arrays")
        ds, groups = self._trial_dataset(split)
        kept = self.split_subjects(split)
        if subject not in kept:
            raise UnknownNameError(f"subject {subject!r} has no {split} trials here; subjects {kept}")
        index = groups[kept.index(subject)]
        if limit is not None and len(index) > limit:
            index = np.sort(np.random.default_rng(seed).choice(index, limit, replace=False))
        batch = ds.__getitems__(index.tolist())
        return batch.responses[:, : self.n_features[subject]], batch.targets[target].flatten(1)

    def target_statistics(self, name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation ``(*shape)`` of target ``name`` over the distinct images of
        ``split`` (all subjects): what regression outputs are calibrated to before generation."""
        assert self.store is not None, "call setup() first"
        self._require_stored(name, "target_statistics")
        if name not in self.targets:
            raise UnknownNameError(f"no target {name!r}; the run has {sorted(self.targets)}")
        images = np.unique(np.concatenate([self.store.subjects[s].trials.image_index[
            self.store.subjects[s].trials.split == split] for s in self.subjects]))
        values = np.asarray(self.targets[name][images], dtype=np.float64)
        return values.mean(0), values.std(0)

    def sensor_geometry(self, subject: str) -> dict[str, Any]:
        """MEG: the subject's sensor names, positions ``(C, 2)``, sampling rate and first sample time."""
        assert self.store is not None, "call setup() first"
        return self.store.subjects[subject].sensor_geometry()

    def describe_budgets(self) -> dict[str, str]:
        return {s: b.describe() for s, b in self.train_budget.items()}

    def budget_trials(self) -> dict[str, dict[str, np.ndarray]]:
        """Per budgeted subject, the trials the run may learn from (training and validation):
        ``trial_id``, ``row`` (in the store's trial table), ``session``, ``run``, ``image_index``,
        ``split``, in presentation order — saved with an adaptation run."""
        assert self.store is not None
        out = {}
        for s, inside in self.budget_masks.items():
            t = self.store.subjects[s].trials
            order = chronological_order(t)
            rows = order[inside[order] & np.isin(t.split[order], ("train", "val"))]
            out[s] = {"trial_id": t.trial_id[rows], "row": rows, "session": t.session[rows], "run": t.run[rows],
                      "image_index": t.image_index[rows], "split": t.split[rows]}
        return out

    def repeated_dataset(self, split: str = "test", average_inputs: bool | None = None) -> RepeatedTrialDataset:
        """(subject, image) items with every repetition of that image in ``split``, averaged in input
        space or not as ``data.repeat_averaging`` says (``average_inputs`` overrides it)."""
        assert self.store is not None
        pos, rows, imgs = [], [], []
        per_subject = []
        for p, s in enumerate(self.subjects):
            if self.eval_subjects is not None and s not in self.eval_subjects:
                continue
            t = self.store.subjects[s].trials
            r = np.flatnonzero(t.split == split)
            order = np.lexsort((t.repeat[r], t.image_index[r]))
            r = r[order]
            uniq, start, counts = np.unique(t.image_index[r], return_index=True, return_counts=True)
            per_subject.append((p, r, uniq, start, counts))
        n_rep = max((int(c.max()) for *_, c in per_subject if len(c)), default=1)
        for p, r, uniq, start, counts in per_subject:
            table = np.full((len(uniq), n_rep), -1, dtype=np.int64)
            for j, (st, c) in enumerate(zip(start, counts, strict=True)):
                table[j, :c] = r[st : st + c]
            pos.append(np.full(len(uniq), p))
            rows.append(table)
            imgs.append(uniq)
        return RepeatedTrialDataset(
            self.readers, self.subjects, np.concatenate(pos), np.concatenate(rows), np.concatenate(imgs),
            self.targets, self.zscore, stimuli=self._stimuli(),
            average_inputs=self.repeat_averaging == "inputs" if average_inputs is None else average_inputs,
        )

    def _loader(self, dataset, batch_sampler) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_identity,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        ds, groups = self._trial_dataset("train")
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = SubjectBalancedBatchSampler(groups, self.batch_size, self.seed, world, rank)
        return self._loader(ds, sampler)

    def _eval_loader(self, dataset) -> DataLoader:
        n = len(dataset)
        batches = [list(range(i, min(i + self.eval_batch_size, n))) for i in range(0, n, self.eval_batch_size)]
        return self._loader(dataset, batches)

    def val_dataloader(self) -> DataLoader:
        ds, _ = self._trial_dataset("val")
        if len(ds) == 0 and self.budget_masks:
            raise DataError(f"data.train_budget: the budgets {self.describe_budgets()} leave no validation trial, "
                             f"so model selection would read the test split; give a larger budget")
        if len(ds) == 0:  # no validation split: validate on the test repetitions
            return self._eval_loader(self.repeated_dataset("test"))
        return self._eval_loader(ds)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.repeated_dataset("test"))

    def eval_dataloader(self, split: str = "test") -> DataLoader:
        """(subject, image) items of any held-out ``split`` (``test``, ``test_large``), repetitions together."""
        return self._eval_loader(self.repeated_dataset(split))

    def has_split(self, split: str) -> bool:
        """Whether any evaluated subject has trials in ``split``."""
        assert self.store is not None, "call setup() first"
        return any((self.store.subjects[s].trials.split == split).any() for s in self.split_subjects(split))
