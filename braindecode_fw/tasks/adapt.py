"""``bdf-adapt ckpt=<checkpoint> subject=<new> budget.sessions=<k>``: a new subject from a small budget.

The decoder, its targets, loss and evaluation protocol come from the checkpoint's config; the
adaptation preset (``braindecode_fw/conf/adaptation/``) decides what is trained (the new subject's parts only, or
everything), whether the source subjects share the batches (MindBridge's reset-tuning with its
cycle loss toward the new subject) and how the new parts start (MindEye2 copies a pretrained ridge
bias; ``init: ridge`` solves the new linear adapter in closed form). Only the new subject's trials
inside ``budget`` (sessions, minutes of scanning or training trials; data/budget.py) are learned
from, and their list is saved with the run (``adaptation_trials.tsv``); validation and test use the
new subject only. The result is an ordinary checkpoint that ``bdf-evaluate``/``bdf-reconstruct``
read, with the new subject added, and ``adaptation_report.{json,md}`` compares the new subject's
retrieval with the pretrained subjects' (the same decoder on their test sets).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from braindecode_fw.data.budget import Budget
from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.errors import ConfigError
from braindecode_fw.io import atomic_write_json, atomic_write_text
from braindecode_fw.models.decoder import Decoder
from braindecode_fw.models.ridge import fit_ridge
from braindecode_fw.pipeline.build import build_datamodule, build_model
from braindecode_fw.pipeline.checkpoint import load_checkpoint
from braindecode_fw.pipeline.evaluation import evaluate_predictions
from braindecode_fw.pipeline.fitting import fit_and_evaluate, save_config, start_run

log = logging.getLogger(__name__)

TRAINABLE = ("new_subject", "all")
SOURCES = ("none", "all")
INITS = (None, "ridge", "nearest_voxel")


def add_subject(decoder: Decoder, subject: str, n_features: int, init_bias_from: str | None) -> list[str]:
    """Give ``decoder`` fresh subject-specific parts for ``subject``; returns the parameter-name
    prefixes that belong to it (:meth:`~braindecode_fw.models.decoder.Decoder.add_subject`, which
    each method's decoder overrides as it needs)."""
    return decoder.add_subject(subject, n_features, init_bias_from=init_bias_from)


def freeze_except(decoder: Decoder, prefixes: list[str]) -> int:
    """``requires_grad=False`` for every parameter outside ``prefixes``; returns the trainable count."""
    n = 0
    for name, p in decoder.named_parameters():
        p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
        n += p.numel() if p.requires_grad else 0
    return n


def ridge_initialise(decoder: Decoder, subject: str, new_dm: BrainDataModule, source_dm: BrainDataModule,
                     target: str, spec: DictConfig) -> dict[str, Any]:
    """Closed-form start for a new subject's linear adapter (``adaptation.init: ridge``).

    The frozen shared part expects, for an image, the hidden vectors the source subjects' adapters
    produce for it. (1) A ridge map from target embeddings to those hidden vectors is fitted on the
    source subjects' training trials (up to ``max_source_trials``); (2) it gives "pseudo-hidden"
    vectors for the new subject's budget images; (3) the new adapter is the ridge solution from the
    new subject's responses to them. Penalties are chosen by leave-one-out error (models/ridge.py).
    """
    adapter = decoder.linear_adapter
    if adapter is None:
        raise ConfigError(f"adaptation.init: ridge needs a linear (ridge) adapter, the model has "
                         f"{type(decoder.subject_adapter).__name__}")
    seed = int(spec.get("seed", 0))
    xs, ys = [], []
    with torch.no_grad():
        sources = source_dm.subjects
        per_source = max(1, int(spec.max_source_trials) // len(sources))
        for i, s in enumerate(sources):
            x, y = source_dm.subject_arrays(s, target, limit=per_source, seed=seed + i)
            xs.append(adapter(x, [s] * len(x)))
            ys.append(y)
        to_hidden = fit_ridge(torch.cat(ys), torch.cat(xs), list(spec.target_alphas))
        x_new, y_new = new_dm.subject_arrays(subject, target)
        pseudo_hidden = to_hidden.predict(y_new)
        voxel_map = fit_ridge(x_new, pseudo_hidden, list(spec.voxel_alphas))
        linear = adapter.linears[subject]
        linear.weight.copy_(voxel_map.weight.T.to(linear.weight.dtype))
        linear.bias.copy_(voxel_map.bias.to(linear.bias.dtype))
    for name, fit in (("target_alphas", to_hidden), ("voxel_alphas", voxel_map)):
        if fit.still_improving_at_edge():
            log.warning("adaptation.ridge.%s: the leave-one-out error still falls at the end of the grid %s "
                        "(chosen %g); widen it", name, fit.alphas, fit.alpha)
    info = {"source_trials": int(sum(len(x) for x in xs)), "target_alpha": to_hidden.alpha,
            "voxel_alpha": voxel_map.alpha, "budget_trials": len(x_new)}
    log.info("ridge initialisation of %s: target->hidden alpha %g (%d source trials), voxels->hidden alpha %g "
             "(%d trials)", subject, to_hidden.alpha, info["source_trials"], voxel_map.alpha, len(x_new))
    return info


def comparison_report(cfg: DictConfig, decoder: Decoder, new_report: dict[str, Any], source_dm: BrainDataModule,
                      subject: str, budget: str, run_dir: Path) -> dict[str, Any]:
    """The adapted subject next to the pretrained subjects, all through the adapted decoder
    (with ``trainable: all`` this also shows what the source subjects lost)."""
    source_rows = evaluate_predictions(cfg, source_dm, decoder)["rows"][:-1]
    new_rows = [r for r in new_report["rows"] if r["subject"] == subject]
    rows = [{**r, "role": "pretrained", "training_data": "all"} for r in source_rows]
    rows += [{**r, "role": "adapted", "training_data": budget} for r in new_rows]
    out = {"subject": subject, "rows": rows}
    atomic_write_json(run_dir / "adaptation_report.json", out)
    lines = ["| subject | role | training data | brain→image top-1 | image→brain top-1 | oracle b→i |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['subject']} | {r['role']} | {r['training_data']} | {r['brain_to_image_top1']:.3f} | "
                     f"{r['image_to_brain_top1']:.3f} | {r['oracle_brain_to_image_top1']:.3f} |")
    atomic_write_text(run_dir / "adaptation_report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def _save_trials(dm: BrainDataModule, subject: str, path: Path) -> None:
    table = dm.budget_trials().get(subject)
    if table is None:  # no budget: every training/validation trial
        return
    cols = list(table)
    rows = ["\t".join(cols)] + ["\t".join(str(table[c][i]) for c in cols) for i in range(len(table["row"]))]
    atomic_write_text(path, "\n".join(rows) + "\n")


def adapt(cfg: DictConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    ad = cfg.adaptation
    if ad.trainable not in TRAINABLE:
        raise ConfigError(f"adaptation.trainable: one of {TRAINABLE}, got {ad.trainable!r}")
    if ad.sources not in SOURCES:
        raise ConfigError(f"adaptation.sources: one of {SOURCES}, got {ad.sources!r}")
    if ad.get("init") not in INITS:
        raise ConfigError(f"adaptation.init: one of {INITS}, got {ad.get('init')!r}")
    budget = {k: v for k, v in OmegaConf.to_container(cfg.budget).items() if v is not None} if cfg.budget else {}
    if budget:
        Budget.parse(budget, "budget")  # fail before loading anything, naming this task's key
    run_dir = start_run(cfg)

    ckpt = load_checkpoint(cfg.ckpt)
    extra = ckpt["braindecode_fw"]
    train_cfg = OmegaConf.create(extra["config"])
    old = dict(extra["n_features"])
    subject = str(cfg.subject)
    if subject in old:
        raise ConfigError(f"subject: {subject} is already in the checkpoint (subjects {sorted(old)}); "
                         f"adaptation adds a new one")
    sources = list(old) if ad.sources == "all" else []
    init_from = ad.get("init_bias_from")
    if init_from == "first":
        init_from = next(iter(old))
    if init_from is not None and init_from not in old:
        raise ConfigError(f"adaptation.init_bias_from: {init_from!r} is not a checkpoint subject {sorted(old)}")

    # the training config, with this run's optimiser/trainer/loggers/paths and the budgeted data
    run_cfg = OmegaConf.merge(train_cfg, {k: cfg[k] for k in ("optim", "trainer", "logger", "callbacks", "paths",
                                                              "seed", "reconstruction", "generator", "fast_path")})
    with open_dict(run_cfg):
        run_cfg.data.pop("train_sessions", None)  # checkpoints before budgets had this key
        run_cfg.data.subjects = [*sources, subject]
        run_cfg.data.train_budget = {subject: budget} if budget else None
        run_cfg.data.eval_subjects = [subject]
        if cfg.get("trial_seconds"):
            run_cfg.data.trial_seconds = cfg.trial_seconds
        if cfg.batch_size:
            run_cfg.data.batch_size = cfg.batch_size
        run_cfg.adaptation = {**OmegaConf.to_container(ad), "from": str(cfg.ckpt), "subject": subject,
                              "budget": budget or "all", "sources": sources}
    store = Path(cfg.store or train_cfg.dataset.store)
    dm = build_datamodule(run_cfg, store)
    if subject not in dm.n_features:
        raise ConfigError(f"subject: {subject} is not in the store {store}")
    source_cfg = run_cfg.copy()
    with open_dict(source_cfg):
        source_cfg.data.subjects, source_cfg.data.train_budget, source_cfg.data.eval_subjects = list(old), None, None
    source_dm = build_datamodule(source_cfg, store)
    shapes = {k: tuple(v) for k, v in extra["target_shapes"].items()}
    decoder = build_model(train_cfg, old, shapes)
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items()
                             if k.startswith("decoder.")})
    prefixes = add_subject(decoder, subject, dm.n_features[subject], init_from)
    init_info = None
    if ad.get("init") == "ridge":
        init_info = ridge_initialise(decoder.eval(), subject, dm, source_dm, train_cfg.target.feature_name, ad.ridge)
    elif ad.get("init") == "nearest_voxel":
        init_info = decoder.nearest_voxel_init(subject, dm, OmegaConf.to_container(ad.nearest_voxel))
    trainable = freeze_except(decoder, prefixes) if ad.trainable == "new_subject" else \
        sum(p.numel() for p in decoder.parameters())
    n_train = dm.trial_counts("train")[subject]
    budget_text = dm.describe_budgets().get(subject, "all data")
    log.info("adapting to %s: %d training trials (%s), sources %s, %s trainable parameters",
             subject, n_train, budget_text, sources or "none", f"{trainable:,}")
    _save_trials(dm, subject, run_dir / "adaptation_trials.tsv")
    resolved = OmegaConf.to_container(run_cfg, resolve=True)
    save_config(resolved, run_dir / "config_resolved.yaml")
    # the checkpoint lists every subject the decoder has (sources and the new one), so that
    # bdf-evaluate / bdf-reconstruct / a further bdf-adapt rebuild the same modules
    result = fit_and_evaluate(run_cfg, dm, decoder, run_dir=run_dir, checkpoint_config=resolved, t_start=t_start,
                              n_features={**old, subject: dm.n_features[subject]})
    comparison_report(run_cfg, decoder, result["report"], source_dm, subject, budget_text, run_dir)
    result["adaptation"] = {"subject": subject, "budget": budget_text, "train_trials": n_train,
                            "trainable_parameters": trainable, "sources": sources, "init": init_info}
    return result
