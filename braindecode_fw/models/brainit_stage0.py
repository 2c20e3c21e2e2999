"""Brain-IT stage 0 inside a training run (docs/methods/brainit.md §2): give every voxel its functional cluster
before the BIT decoder trains.

With ``model.stage0.load_from`` unset, :func:`configure` trains the decoder's universal encoder
(:mod:`~braindecode_fw.models.universal_encoder`) on the run's training split — image features
from the target named ``model.stage0.features`` (e.g. DINOv2 ViT-L/14 tokens; the synthetic recipe
uses the random tiny ViT's tokens) -> every voxel of every subject — then fits the shared V2C
clustering (:mod:`~braindecode_fw.models.voxel_clusters`) on all subjects' voxel embeddings
jointly and sets each BIT branch's cluster labels. On a synthetic world it also scores the clusters
against the simulator's functional organisation (adjusted Rand index next to a random and an
anatomical baseline). :func:`save_artifacts` writes ``stage0/`` into the run directory:
``voxel_clusters.npz``, ``universal_encoder.safetensors`` and ``report.json``; a later run reuses
them with ``model.stage0.load_from=<run>/stage0`` (the universal encoder is needed again to map a
new subject's voxels, ``bdf-adapt adaptation=brainit_transfer``).

A resumed run reuses the ``stage0/`` it wrote when it started (the checkpoint holds the same
labels and encoder in the decoder's state dict).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braindecode_fw.errors import ConfigError, UnknownNameError
from braindecode_fw.io import atomic_write_bytes, atomic_write_json
from braindecode_fw.models.universal_encoder import (
    fit_universal_encoder,
    mean_correlation,
    voxel_correlations,
)
from braindecode_fw.models.voxel_clusters import (
    VoxelClusters,
    cluster_agreement,
    fit_voxel_clusters,
    functional_labels,
    nearest_reference,
    normalize_embeddings,
)

log = logging.getLogger(__name__)

CLUSTERS_FILE, ENCODER_FILE, REPORT_FILE = "voxel_clusters.npz", "universal_encoder.safetensors", "report.json"


def configure(decoder, datamodule, cfg: dict[str, Any]) -> dict[str, Any]:
    """Set ``decoder``'s (a :class:`~braindecode_fw.models.brainit.BrainITDecoder`) cluster labels
    from a saved stage 0 (``cfg["load_from"]``) or a fresh one. Returns ``{"clusters", "report",
    "encoder"}`` for :func:`save_artifacts`."""
    load_from = cfg.get("load_from")
    if load_from:
        clusters = load(decoder, load_from)
        return {"clusters": clusters, "report": {"loaded_from": str(load_from)}, "encoder": decoder.universal_encoder}
    encoder = decoder.universal_encoder
    if encoder is None:
        raise ConfigError("model.stage0: the decoder has no universal encoder (model.universal_encoder) and no "
                         "saved clustering (model.stage0.load_from)")
    feature = cfg["features"]
    if feature not in datamodule.target_shapes:
        raise UnknownNameError(f"model.stage0.features: {feature!r} is not a target of this run; it trains "
                       f"{sorted(datamodule.target_shapes)} (add it under extra_targets)")
    if feature in getattr(datamodule, "online_targets", ()):
        raise ConfigError(f"model.stage0.features: {feature!r} is computed online (data.online_targets); stage 0 "
                         f"reads stored targets: remove it from data.online_targets")
    start = time.perf_counter()
    has_val = datamodule.has_split("val")
    history = fit_universal_encoder(
        encoder, datamodule.train_dataloader, feature=feature, epochs=int(cfg.get("epochs", 30)),
        lr=float(cfg.get("lr", 1e-3)), voxels_per_sample=int(cfg.get("voxels_per_sample", 5000)),
        seed=int(cfg.get("seed", 0)), max_steps=cfg.get("max_steps"),
        val_batches=datamodule.val_dataloader if has_val else None)
    encoder.requires_grad_(False).eval()
    fit_seconds = time.perf_counter() - start
    clusters = fit_voxel_clusters(encoder.embeddings(), n_clusters=decoder.n_clusters, seed=int(cfg.get("seed", 0)),
                                  covariance_type=str(cfg.get("covariance_type", "full")),
                                  max_iter=int(cfg.get("gmm_max_iter", 100)))
    decoder.set_clusters({s: torch.from_numpy(v) for s, v in clusters.labels.items()})
    sizes = clusters.cluster_sizes()
    report: dict[str, Any] = {
        "features": feature, "history": history, "encoder_seconds": round(fit_seconds, 1),
        "cluster_seconds": round(time.perf_counter() - start - fit_seconds, 1),
        "n_clusters": clusters.n_clusters, "cluster_size": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                                              "max": int(sizes.max()), "empty": int((sizes == 0).sum())},
    }
    if has_val:
        corr = voxel_correlations(encoder, datamodule.val_dataloader(), feature)
        report["val_voxel_r"] = {s: float(np.nanmean(r)) for s, r in corr.items()}
        report["val_voxel_r_mean"] = mean_correlation(corr)
    agreement = synthetic_agreement(clusters, datamodule.store, seed=int(cfg.get("seed", 0)))
    if agreement is not None:
        report["functional_agreement"] = agreement
        log.info("stage 0 clusters vs the simulator's functional labels: ARI %.3f (random %.3f, anatomical %.3f)",
                 agreement["ari"], agreement["random_ari"], agreement.get("anatomical_ari", float("nan")))
    log.info("stage 0: universal encoder %.0f s (val voxel r %.3f), %d clusters (sizes %d–%d)", fit_seconds,
             report.get("val_voxel_r_mean", float("nan")), clusters.n_clusters, sizes.min(), sizes.max())
    return {"clusters": clusters, "report": report, "encoder": encoder}


def synthetic_agreement(clusters: VoxelClusters, store, seed: int = 0) -> dict[str, Any] | None:
    """ARI of the clusters against the synthetic world's functional labels (early voxels by their
    receptive-field cell, higher voxels by their preferred semantic feature;
    :func:`~braindecode_fw.models.voxel_clusters.functional_labels`), with random and anatomical
    (KMeans on voxel coordinates) baselines. None for stores without simulator ground truth."""
    if store is None:
        return None
    truth, coords = {}, {}
    for s in clusters.subjects:
        subject = store.subjects.get(s)
        path = None if subject is None else subject.directory / "simulator.npz"
        if path is None or not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as sim:
            truth[s] = functional_labels({k: sim[k] for k in sim.files})
            coords[s] = sim["voxel_ijk"]
    return cluster_agreement(clusters, truth, coords=coords, seed=seed)


def load(decoder, folder: str | Path) -> VoxelClusters:
    """Labels (and, when saved, the universal encoder) from a ``stage0/`` folder of an earlier run."""
    folder = Path(folder)
    clusters = VoxelClusters.load(folder / CLUSTERS_FILE)
    for s in decoder.subjects:
        if s not in clusters.labels:
            raise UnknownNameError(f"model.stage0.load_from: {folder / CLUSTERS_FILE} has no clusters for subject {s!r}; "
                           f"it covers {clusters.subjects}")
    if clusters.n_clusters != decoder.n_clusters:
        raise ConfigError(f"model.stage0.load_from: {folder / CLUSTERS_FILE} has {clusters.n_clusters} clusters, "
                         f"model.n_clusters is {decoder.n_clusters}")
    decoder.set_clusters({s: torch.from_numpy(clusters.labels[s]) for s in decoder.subjects})
    weights = folder / ENCODER_FILE
    if decoder.universal_encoder is not None and weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
        missing, unexpected = decoder.universal_encoder.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not k.startswith("voxel_embeddings.")] + list(unexpected)
        if wrong:
            raise ConfigError(f"model.stage0.load_from: {weights} does not fit model.universal_encoder "
                             f"(mismatched keys {wrong[:5]})")
    if decoder.universal_encoder is not None:
        decoder.universal_encoder.requires_grad_(False).eval()
    return clusters


def save_artifacts(result: dict[str, Any] | None, run_dir: str | Path) -> list[Path]:
    """``<run_dir>/stage0/{voxel_clusters.npz, universal_encoder.safetensors, report.json}``."""
    if not result:
        return []
    from safetensors.torch import save

    folder = Path(run_dir) / "stage0"
    loaded = result["report"].get("loaded_from")
    if loaded and Path(loaded).resolve() == folder.resolve():
        return []  # a resumed run: its stage 0 is already there
    folder.mkdir(parents=True, exist_ok=True)
    written = [result["clusters"].save(folder / CLUSTERS_FILE)]
    encoder = result.get("encoder")
    if encoder is not None:
        state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
        # a crash never leaves a half-written file under the real name
        written.append(atomic_write_bytes(folder / ENCODER_FILE, save(state)))
    written.append(atomic_write_json(folder / REPORT_FILE, result["report"]))
    return written


def transfer_initialise(decoder, subject: str, datamodule, spec: dict[str, Any]) -> dict[str, Any]:
    """Brain-IT's transfer to a new subject (docs/methods/brainit.md §7, ``adaptation.init: nearest_voxel``),
    after :meth:`~braindecode_fw.models.brainit.BrainITDecoder.add_subject`:

    1. train only the new subject's universal-encoder voxel embeddings on its budget data
       (``spec.encoder_epochs``, Adam ``spec.encoder_lr``), the shared encoder frozen;
    2. map each new voxel to its nearest reference voxel (L2 on the normalised embeddings, among
       all the checkpoint's subjects) and give it that voxel's cluster;
    3. start each BIT branch's new voxel embeddings as copies of those reference voxels'.

    Only the new subject's rows of ``datamodule``'s training batches are used. Returns what was
    done (epochs, validation voxel r, how the new voxels spread over the reference subjects)."""
    encoder = decoder.universal_encoder
    if encoder is None:
        raise ConfigError("adaptation.init: nearest_voxel needs the checkpoint's universal encoder (Brain-IT stage 0); "
                         "this decoder has none")
    feature = decoder.stage0.get("features")
    references = [s for s in decoder.subjects if s != subject]

    def own_rows(loader):
        for batch in loader:
            keep = [i for i, s in enumerate(batch.subject) if s == subject]
            if keep:
                rows = torch.tensor(keep)
                yield type(batch)(subject=[subject] * len(keep), responses=batch.responses[rows],
                                  image_index=batch.image_index[rows],
                                  targets={k: v[rows] for k, v in batch.targets.items()})

    start = time.perf_counter()
    encoder.requires_grad_(False)
    params = encoder.voxel_parameters([subject])
    for p in params:
        p.requires_grad_(True)
    has_val = datamodule.has_split("val")
    history = fit_universal_encoder(
        encoder, lambda: own_rows(datamodule.train_dataloader()), feature=feature,
        epochs=int(spec.get("encoder_epochs", 30)), lr=float(spec.get("encoder_lr", 1e-3)),
        voxels_per_sample=int(decoder.stage0.get("voxels_per_sample", 5000)), seed=int(spec.get("seed", 0)),
        parameters=params, val_batches=(lambda: own_rows(datamodule.val_dataloader())) if has_val else None,
        scheduler_patience=int(spec.get("encoder_patience", 4)))
    encoder.requires_grad_(False).eval()
    embeddings = encoder.embeddings()
    # float64, as Brain-IT's map_clusters_transfer.py searches (float32 resolves near-ties differently)
    reference = normalize_embeddings(np.concatenate([embeddings[s] for s in references]), np.float64)
    nearest = nearest_reference(reference, normalize_embeddings(embeddings[subject], np.float64))
    bounds = np.cumsum([0] + [encoder.n_voxels[s] for s in references])
    first_bit = next(iter(decoder.branches.values()))
    ref_labels = torch.cat([first_bit.cluster_labels(s) for s in references])
    index = torch.from_numpy(nearest).long()
    with torch.no_grad():
        for bit in decoder.branches.values():
            bit.set_cluster_labels(subject, ref_labels[index])
            ref_emb = torch.cat([bit.voxels.weight(s) for s in references])
            bit.voxels.weight(subject).copy_(ref_emb[index])
    owner = np.searchsorted(bounds, nearest, side="right") - 1
    info = {"encoder_epochs": len(history), "encoder_seconds": round(time.perf_counter() - start, 1),
            "encoder_val_r": history[-1].get("val_r") if history else None,
            "nearest_subject_share": {s: float(np.mean(owner == i)) for i, s in enumerate(references)}}
    log.info("Brain-IT transfer of %s: universal-encoder embeddings in %.0f s (val voxel r %s), voxels mapped to "
             "nearest reference voxels %s", subject, info["encoder_seconds"], info["encoder_val_r"],
             info["nearest_subject_share"])
    return info
