"""Datamodule and decoder from a composed config (``cfg.target``, ``cfg.extra_targets``,
``cfg.data``, ``cfg.model``)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.errors import ConfigError, is_signature_mismatch
from braindecode_fw.models.decoder import Decoder


def build_datamodule(cfg: DictConfig, store: Path | None = None) -> BrainDataModule:
    """Target encoders + datamodule from ``cfg.target`` (the primary target), ``cfg.extra_targets``
    (further targets some methods train on: text tokens, VAE latents, ...) and ``cfg.data``, set up
    (targets cached)."""
    encoder = instantiate(cfg.target)
    extras = [instantiate(node) for node in (cfg.get("extra_targets") or {}).values() if node is not None]
    dm = instantiate(cfg.data, store=str(store or cfg.dataset.store), target_encoder=encoder,
                     extra_target_encoders=extras, seed=cfg.seed)
    dm.setup()
    return dm


def build_model(cfg: DictConfig, n_features: dict[str, int], target_shapes: dict[str, tuple[int, ...]]) -> Decoder:
    """``cfg.model`` is a partial of :func:`build_decoder`; sizes come from the data."""
    build = instantiate(cfg.model)
    try:
        return build(n_features=dict(n_features), target_shapes=dict(target_shapes))
    except TypeError as e:
        if is_signature_mismatch(e):  # a key under model.* that its constructor does not take
            raise ConfigError(f"model: {e} (check the model.* keys against the model's config, "
                              f"bdf-train --cfg job --package model)") from e
        raise


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}

