"""DecoderModule: the generic LightningModule (steps, optimiser, schedule, retrieval validation).

Methods differ only by the decoder, loss and optimiser objects they are given (all from config);
this module never branches on the method.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from braindecode_fw.contracts import Batch
from braindecode_fw.errors import ConfigError, UnknownNameError, UserError
from braindecode_fw.metrics.retrieval import DIRECTIONS, retrieval_accuracy
from braindecode_fw.models.decoder import Decoder
from braindecode_fw.objectives import Objective, PairObjective

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN/Inf; the message names the batch (subjects, image indices)."""


class DecoderModule(L.LightningModule):
    """Trains a :class:`Decoder` with an :class:`~braindecode_fw.objectives.Objective` (a plain pair
    loss such as InfoNCE is wrapped into a :class:`PairObjective` on ``target``). ``target`` is the
    primary target: validation retrieval and checkpoint selection use it.

    optimizer: partial ``torch.optim`` constructor (Hydra ``_partial_``); ``weight_decay_groups``
    (``optim.weight_decay_groups``) chooses which parameters get its weight decay
    (:func:`weight_decay_groups`); ``scale_lr_by_devices`` (``optim.scale_lr_by_devices``) multiplies
    the learning rate (and OneCycle's ``max_lr``) by the trainer's world size, as MindBridge does.
    scheduler: partial LR scheduler; ``OneCycleLR`` gets ``total_steps`` from the trainer.
    nan_check: when the non-finite-loss guard looks (``fast_path.nan_check``,
    braindecode_fw/pipeline/fast_path.py): ``step`` every step, naming the batch (a host
    synchronisation per step); ``deferred`` at logging steps and epoch ends, naming the first bad
    step; ``auto`` is ``step`` on a CPU and ``deferred`` on accelerators.
    """

    def __init__(
        self,
        decoder: Decoder,
        loss: nn.Module,
        target: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        *,
        val_subset_size: int = 300,
        val_n_subsets: int = 1,
        checkpoint_extra: dict[str, Any] | None = None,
        weight_decay_groups: str = "adapters_and_matrices",
        scale_lr_by_devices: bool = False,
        nan_check: str = "step",
    ):
        super().__init__()
        if nan_check not in ("auto", "step", "deferred"):
            raise ConfigError(f"fast_path.nan_check: expected auto, step or deferred, got {nan_check!r}")
        self.nan_check = nan_check
        self._first_nonfinite_step: torch.Tensor | None = None  # deferred check: -1 or the first bad step
        if weight_decay_groups not in WEIGHT_DECAY_RULES:
            raise ConfigError(f"optim.weight_decay_groups: one of {list(WEIGHT_DECAY_RULES)}, got "
                             f"{weight_decay_groups!r}")
        self.weight_decay_groups = weight_decay_groups
        self.scale_lr_by_devices = scale_lr_by_devices
        self.decoder = decoder
        self.objective = loss if isinstance(loss, Objective) else PairObjective(loss, target)
        self.target = target
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_subset_size = val_subset_size
        self.val_n_subsets = val_n_subsets
        self.checkpoint_extra = checkpoint_extra or {}
        self._val_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.decoder(batch.responses, batch.subject, batch.repeat_mask)

    def _check_finite(self, loss: torch.Tensor, stage: str, batch: Batch, batch_idx: int) -> None:
        """NaN guard: stop at the first non-finite loss, naming the batch (subjects, image indices)."""
        if not torch.isfinite(loss):
            subjects = ", ".join(f"{s}×{batch.subject.count(s)}" for s in dict.fromkeys(batch.subject))
            images = batch.image_index.tolist()
            shown = ", ".join(map(str, images[:8])) + (", ..." if len(images) > 8 else "")
            bad_inputs = sorted({s for s, row in zip(batch.subject, batch.responses, strict=True)
                                 if not torch.isfinite(row).all()})
            raise NonFiniteLossError(
                f"{stage} loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(batch {batch_idx}: subjects {subjects}; images {shown}"
                + (f"; non-finite inputs from {bad_inputs}" if bad_inputs else "")
                + "); lower optim.optimizer.lr, use trainer.precision=32-true, or rerun with debug=anomaly "
                "to find the operation"
            )

    def _checks_every_step(self) -> bool:
        return self.nan_check == "step" or (self.nan_check == "auto" and self.device.type == "cpu")

    def _track_finite(self, loss: torch.Tensor) -> None:
        """Deferred guard: remember the first step whose loss is not finite, on the device (no sync)."""
        if self._first_nonfinite_step is None:
            self._first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        seen = self._first_nonfinite_step
        bad = ~torch.isfinite(loss.detach()) & (seen < 0)
        self._first_nonfinite_step = torch.where(bad, torch.full_like(seen, self.global_step), seen)

    def _raise_if_nonfinite_seen(self) -> None:
        if self._first_nonfinite_step is None:
            return
        step = int(self._first_nonfinite_step)  # the one synchronisation, every logging interval
        if step >= 0:
            raise NonFiniteLossError(
                f"train loss became non-finite at step {step} (epoch {self.current_epoch}; found by the deferred "
                "check, fast_path.nan_check=deferred); rerun with fast_path.nan_check=step to name the batch, "
                "lower optim.optimizer.lr, or use trainer.precision=32-true")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = self._trainer
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) if trainer is not None else 1
        if self._first_nonfinite_step is not None and self.global_step % every == 0:
            self._raise_if_nonfinite_seen()

    def on_train_epoch_end(self) -> None:
        self._raise_if_nonfinite_seen()

    def progress(self, batch_idx: int) -> float:
        """Fraction of training done (epochs, fractional within an epoch), for loss schedules."""
        trainer = self._trainer
        if trainer is None or not trainer.max_epochs or trainer.max_epochs < 1:
            return 0.0
        n = trainer.num_training_batches
        within = batch_idx / n if isinstance(n, int | float) and 0 < n < float("inf") else 0.0
        return min(1.0, (self.current_epoch + within) / trainer.max_epochs)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, parts, _ = self.objective(self.decoder, batch, self.progress(batch_idx))
        if self._checks_every_step():
            self._check_finite(loss, "train", batch, batch_idx)
        else:
            self._track_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, _, out = self.objective(self.decoder, batch, 1.0)
        self.log("val/loss", loss, batch_size=len(batch))
        pred, tgt = out[self.target].float(), batch.targets[self.target].float()
        for s in dict.fromkeys(batch.subject):
            rows = torch.tensor([i for i, x in enumerate(batch.subject) if x == s], device=pred.device)
            self._val_outputs[s].append((pred[rows].cpu(), tgt[rows].cpu()))

    def on_validation_epoch_end(self) -> None:
        per_direction: dict[str, list[float]] = {d: [] for d in DIRECTIONS}
        for s, chunks in sorted(self._val_outputs.items()):
            pred = torch.cat([c[0] for c in chunks])
            tgt = torch.cat([c[1] for c in chunks])
            res = retrieval_accuracy(pred, tgt, subset_size=self.val_subset_size, n_subsets=self.val_n_subsets)
            for d in DIRECTIONS:
                per_direction[d].append(res.mean(d))
                self.log(f"val/{d}_top1/{s}", res.mean(d))
        for d, values in per_direction.items():
            if values:
                self.log(f"val/{d}_top1", float(np.mean(values)), prog_bar=d == "brain_to_image")
        self._val_outputs.clear()

    def _param_groups(self) -> list[dict[str, Any]]:
        # the objective's parameters too (a learned temperature, if any), as before
        return weight_decay_groups(self, self.weight_decay_groups, adapter_prefix="decoder.adapter.")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self._param_groups())
        # optim.scale_lr_by_devices: the linear scaling rule of MindBridge's main.py (max_lr times the
        # number of processes), applied to the optimiser's lr and to OneCycle's max_lr alike
        factor = self.trainer.world_size if self.scale_lr_by_devices else 1
        for group in optimizer.param_groups:
            group["lr"] *= factor
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        if factor != 1 and "max_lr" in getattr(self.scheduler_factory, "keywords", {}):
            kwargs["max_lr"] = self.scheduler_factory.keywords["max_lr"] * factor
        if getattr(self.scheduler_factory, "func", None) is torch.optim.lr_scheduler.OneCycleLR:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # epoch-wise on a validation metric (Brain-IT's WarmupPlateau; braindecode_fw/schedules.py)
            monitor = getattr(scheduler, "monitor", "val/loss")
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch",
                                                             "monitor": monitor}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain containers and tensors only, so the checkpoint loads with torch.load(weights_only=True)
        checkpoint["braindecode_fw"] = self.checkpoint_extra
        # RNG state (dropout) so that a resumed run continues bitwise like an uninterrupted one;
        # batch order is already reproducible from (seed, epoch) by the sampler
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        generator = getattr(self.objective, "generator", None)
        if isinstance(generator, torch.Generator):  # the objective's own draws (MixCo) resume too
            checkpoint["rng_state"]["objective"] = generator.get_state()
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng_state")
        if rng:
            torch.set_rng_state(rng["torch"])
            generator = getattr(self.objective, "generator", None)
            if "objective" in rng and isinstance(generator, torch.Generator):
                generator.set_state(rng["objective"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


#: ``optim.weight_decay_groups`` values: which parameters of a decoder are decayed
WEIGHT_DECAY_RULES = {
    # adapters entirely (MindEye2's ridge, bias included), elsewhere weight matrices only: biases,
    # LayerNorm/GroupNorm weights and gains are not decayed (the framework default)
    "adapters_and_matrices": "subject adapters (all parameters) and parameters with >= 2 dimensions",
    # MindEye2's Train.ipynb: the ridge entirely; in the backbone and prior every parameter whose name
    # has no "bias". Its exemption list also names "LayerNorm.weight", which matches none of its
    # modules (they sit in nn.Sequential), so norm weights and the prior's gains are decayed.
    "mindeye2": "subject adapters (all parameters) and every other non-bias parameter",
    # MindBridge's trainer: names without "bias", "Norm" or "temperature"; in its model only the
    # biases match (adapters' biases included), so norm weights are decayed.
    "mindbridge": "every non-bias parameter",
    # Brain-IT's train script: AdamW(model.parameters()), one group, biases and norms included
    "all": "every parameter",
    # STTM's training script: names without the substring "bias" (its "LayerNorm.*" entries match
    # nothing, as in MindEye2's), so nn.MultiheadAttention's in_proj_bias is not decayed either
    "sttm": "every parameter whose name does not contain 'bias'",
}


def _is_bias(name: str) -> bool:
    return name.rpartition(".")[2] == "bias"


def weight_decay_groups(module: nn.Module, rule: str = "adapters_and_matrices",
                        adapter_prefix: str = "adapter.") -> list[dict[str, Any]]:
    """Two optimiser parameter groups of ``module``'s trainable parameters (a decoder, or a
    module holding one): decayed (the optimizer's ``weight_decay``) and not (``weight_decay`` 0),
    by ``rule`` (one of :data:`WEIGHT_DECAY_RULES`); parameters named ``adapter_prefix...`` are the
    subject adapters."""
    if rule not in WEIGHT_DECAY_RULES:
        raise ConfigError(f"optim.weight_decay_groups: one of {list(WEIGHT_DECAY_RULES)}, got {rule!r}")
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        in_adapter = name.startswith(adapter_prefix)
        if rule == "adapters_and_matrices":
            decayed = in_adapter or p.ndim >= 2
        elif rule == "mindeye2":
            decayed = in_adapter or not _is_bias(name)
        elif rule == "all":
            decayed = True
        elif rule == "sttm":
            decayed = "bias" not in name
        else:
            decayed = not _is_bias(name)
        (decay if decayed else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


#: extra per-item prediction outputs: (decoder outputs of a batch, the batch) -> ``(B, *shape)``
DerivedOutput = Callable[[dict[str, torch.Tensor], Batch], torch.Tensor]


def select_rows(batch: Batch, rows: Sequence[int]) -> Batch:
    """The items ``rows`` of ``batch``: every per-item field (lists, tensors and arrays with one row
    per item, and dicts of them such as ``targets``) indexed; other fields kept."""
    n, index = len(batch), np.asarray(rows, dtype=np.int64)

    def take(value: Any) -> Any:
        if isinstance(value, list) and len(value) == n:
            return [value[i] for i in index]
        if isinstance(value, torch.Tensor | np.ndarray) and value.ndim and value.shape[0] == n:
            return value[torch.from_numpy(index)] if isinstance(value, torch.Tensor) else value[index]
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        return value

    return dataclasses.replace(batch, **{f.name: take(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


@torch.no_grad()
def predict(decoder: Decoder, batches: Iterable[Batch], target: str,
            device: str | torch.device | None = None,
            outputs: Sequence[str] = (), *, derived: Mapping[str, DerivedOutput] | None = None,
            items: Collection[tuple[str, int]] | None = None) -> dict[str, dict[str, Any]]:
    """Run the decoder over ``batches`` (on ``device``, default: where its parameters are); per
    subject: ``pred`` ``(n, *shape)`` (the ``target`` output), ``target`` (its true value) and
    ``image_index``, in loader order; plus ``outputs[name]`` for every other requested decoder
    output (e.g. the embeddings a generator needs).

    ``derived``: name -> ``fn(decoder outputs, batch)`` giving ``(B, *shape)`` per batch, stored as
    ``outputs[name]`` in place of the decoder outputs it is computed from, which are dropped with
    the batch: what keeps large outputs out of memory (Brain-IT's predicted VGG tokens are
    7,190 × 512 floats per item; its low-level image is inverted from them here, docs/methods/brainit.md §6).
    ``items``: ``(subject, image index)`` pairs; only those items of each batch go through the
    decoder (the other rows are dropped before it), e.g. the ones a resumed reconstruction still needs.
    """
    device = device or next(decoder.parameters()).device
    decoder.eval().to(device)
    derived = dict(derived or {})
    wanted = None if items is None else {(str(s), int(i)) for s, i in items}
    acc: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for batch in batches:
        if wanted is not None:
            rows = [r for r, (s, i) in enumerate(zip(batch.subject, batch.image_index.tolist(), strict=True))
                    if (s, int(i)) in wanted]
            if not rows:
                continue
            if len(rows) < len(batch):
                batch = select_rows(batch, rows)
        mask = batch.repeat_mask.to(device) if batch.repeat_mask is not None else None
        out = decoder(batch.responses.to(device), batch.subject, mask)
        missing = [n for n in (target, *outputs) if n not in out]
        if missing:
            raise UnknownNameError(f"decoder outputs {sorted(out)}; requested {missing}")
        pred = out[target].float().cpu()
        extra = {n: out[n].float().cpu() for n in outputs}
        for name, fn in derived.items():
            value = fn(out, batch)
            if value.shape[0] != len(batch):
                raise ConfigError(f"predict: derived output {name!r} has {value.shape[0]} rows for a batch of "
                                 f"{len(batch)}")
            extra[name] = value.float().cpu()
        del out  # the decoder outputs the derived ones were computed from go here, per batch
        for i, s in enumerate(batch.subject):
            acc[s]["pred"].append(pred[i])
            acc[s]["target"].append(batch.targets[target][i])
            acc[s]["image_index"].append(int(batch.image_index[i]))
            for n, v in extra.items():
                acc[s][f"output:{n}"].append(v[i])
    names = [*outputs, *derived]
    return {s: {"pred": torch.stack(v["pred"]).numpy(), "target": torch.stack(v["target"]).numpy(),
                "image_index": np.asarray(v["image_index"]),
                "outputs": {n: torch.stack(v[f"output:{n}"]).numpy() for n in names}}
            for s, v in acc.items()}
