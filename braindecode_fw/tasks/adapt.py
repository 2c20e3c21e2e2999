"""``bdf-adapt ckpt=<checkpoint> subject=<new> sessions=<k>``: a new subject from a small budget.

The decoder, its targets, loss and evaluation protocol come from the checkpoint's config; the
adaptation preset (``conf/adaptation/``) decides what is trained (the new subject's parts only, or
everything), whether the source subjects share the batches (MindBridge's reset-tuning with its
cycle loss toward the new subject) and how the new parts start (MindEye2 copies a pretrained ridge
bias). Only the new subject's first ``sessions`` training sessions are used; validation and test use
the new subject only. The result is an ordinary checkpoint that ``bdf-evaluate``/``bdf-reconstruct``
read, with the new subject added.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from braindecode_fw.models.decoder import BridgeDecoder, Decoder
from braindecode_fw.tasks.evaluate import load_checkpoint
from braindecode_fw.tasks.train import (
    _save_config,
    build_datamodule,
    build_model,
    fit_and_evaluate,
    start_run,
)

log = logging.getLogger(__name__)

TRAINABLE = ("new_subject", "all")
SOURCES = ("none", "all")


def add_subject(decoder: Decoder, subject: str, n_features: int, init_bias_from: str | None) -> list[str]:
    """Give ``decoder`` fresh subject-specific parts for ``subject``; returns the parameter-name
    prefixes that belong to it."""
    adapter = decoder.adapter
    if not hasattr(adapter, "add_subject"):
        raise ValueError(f"model.adapter: {type(adapter).__name__} cannot add subjects")
    adapter.add_subject(subject, n_features)
    prefixes = [f"adapter.linears.{subject}.", f"adapter.embedders.{subject}."]
    if isinstance(decoder, BridgeDecoder):
        decoder.builder.add_subject(subject)
        decoder.cycle_target = subject
        prefixes.append(f"builder.builders.{subject}.")
    if init_bias_from is not None:
        if not hasattr(adapter, "linears"):
            raise ValueError("adaptation.init_bias_from: only a linear (ridge) adapter has a bias to copy")
        with torch.no_grad():
            adapter.linears[subject].bias.copy_(adapter.linears[init_bias_from].bias)
    return prefixes


def freeze_except(decoder: Decoder, prefixes: list[str]) -> int:
    """``requires_grad=False`` for every parameter outside ``prefixes``; returns the trainable count."""
    n = 0
    for name, p in decoder.named_parameters():
        p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
        n += p.numel() if p.requires_grad else 0
    return n


def adapt(cfg: DictConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    ad = cfg.adaptation
    if ad.trainable not in TRAINABLE:
        raise ValueError(f"adaptation.trainable: one of {TRAINABLE}, got {ad.trainable!r}")
    if ad.sources not in SOURCES:
        raise ValueError(f"adaptation.sources: one of {SOURCES}, got {ad.sources!r}")
    run_dir = start_run(cfg)

    ckpt = load_checkpoint(cfg.ckpt)
    extra = ckpt["braindecode_fw"]
    train_cfg = OmegaConf.create(extra["config"])
    old = dict(extra["n_features"])
    subject = str(cfg.subject)
    if subject in old:
        raise ValueError(f"subject: {subject} is already in the checkpoint (subjects {sorted(old)}); "
                         f"adaptation adds a new one")
    sources = list(old) if ad.sources == "all" else []
    init_from = ad.get("init_bias_from")
    if init_from == "first":
        init_from = next(iter(old))
    if init_from is not None and init_from not in old:
        raise ValueError(f"adaptation.init_bias_from: {init_from!r} is not a checkpoint subject {sorted(old)}")

    # the training config, with this run's optimiser/trainer/loggers/paths and the budgeted data
    run_cfg = OmegaConf.merge(train_cfg, {k: cfg[k] for k in ("optim", "trainer", "logger", "callbacks", "paths",
                                                              "seed", "reconstruction", "generator")})
    with open_dict(run_cfg):
        run_cfg.data.subjects = [*sources, subject]
        run_cfg.data.train_sessions = {subject: cfg.sessions} if cfg.sessions else None
        run_cfg.data.eval_subjects = [subject]
        if cfg.batch_size:
            run_cfg.data.batch_size = cfg.batch_size
        run_cfg.adaptation = {**OmegaConf.to_container(ad), "from": str(cfg.ckpt), "subject": subject,
                              "sessions": cfg.sessions, "sources": sources}
    store = Path(cfg.store or train_cfg.dataset.store)
    dm = build_datamodule(run_cfg, store)
    if subject not in dm.n_features:
        raise ValueError(f"subject: {subject} is not in the store {store}")
    shapes = {k: tuple(v) for k, v in extra["target_shapes"].items()}
    decoder = build_model(train_cfg, old, shapes)
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items()
                             if k.startswith("decoder.")})
    prefixes = add_subject(decoder, subject, dm.n_features[subject], init_from)
    trainable = freeze_except(decoder, prefixes) if ad.trainable == "new_subject" else \
        sum(p.numel() for p in decoder.parameters())
    n_train = dm.trial_counts("train")[subject]
    log.info("adapting to %s: %d training trials (%s sessions), sources %s, %s trainable parameters",
             subject, n_train, cfg.sessions or "all", sources or "none", f"{trainable:,}")
    resolved = OmegaConf.to_container(run_cfg, resolve=True)
    _save_config(resolved, run_dir / "config_resolved.yaml")
    # the checkpoint lists every subject the decoder has (sources and the new one), so that
    # bdf-evaluate / bdf-reconstruct / a further bdf-adapt rebuild the same modules
    result = fit_and_evaluate(run_cfg, dm, decoder, run_dir=run_dir, checkpoint_config=resolved, t_start=t_start,
                              n_features={**old, subject: dm.n_features[subject]})
    result["adaptation"] = {"subject": subject, "sessions": cfg.sessions, "train_trials": n_train,
                            "trainable_parameters": trainable, "sources": sources}
    return result
