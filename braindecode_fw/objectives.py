"""Training objectives: what one optimisation step computes from a decoder and a batch.

The LightningModule calls ``objective(decoder, batch, progress) -> (loss, parts, outputs)`` and never
branches on the method; a method is a model config plus an objective config.

- :class:`PairObjective`: one contrastive pair loss (InfoNCE, SoftCLIP) between the decoder's
  output for the primary target and that target (the foundation default).
- :class:`TermsObjective`: a weighted sum of named terms (docs/methods/mindeye2.md §4, docs/methods/mindbridge.md §4, docs/methods/sttm.md §4):
  contrastive terms (BiMixCo during the first ``mixco.until`` of training, SoftCLIP afterwards, with
  a fixed or cosine-scheduled temperature), token-level soft distillation (``token_contrast``:
  every token a row, the term's own τ), regression terms (normalised MSE, MSE, L1) and the
  decoder's auxiliary losses (``outputs["loss/<name>"]``: cycle, brain reconstruction, prior), and
  Brain-IT's multi-scale InfoNCE over the query subset a decoder sampled (``multiscale_infonce``:
  the decoder gives ``<output>/index`` and ``<output>/scale`` next to ``<output>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.contracts import (
    AUX_LOSS_PREFIX,
    SAMPLED_INDEX_SUFFIX,
    SAMPLED_SCALE_SUFFIX,
    Batch,
    aux_loss_key,
    is_aux_loss,
    regression_key,
)
from braindecode_fw.errors import ConfigError, UnknownNameError
from braindecode_fw.losses import (
    ClipMSELoss,
    bimixco_loss,
    cosine_temperature,
    mixco_inputs,
    mixco_permutation,
    mixco_soft_labels,
    multiscale_infonce,
    normalized_mse,
    soft_clip_loss,
    soft_token_contrast,
)
from braindecode_fw.ops.distributed import gather_block_diagonal, gather_rows

AUX_PREFIX = AUX_LOSS_PREFIX  # the old name of contracts.AUX_LOSS_PREFIX


class Objective(nn.Module):
    """``forward(decoder, batch, progress)`` -> (scalar loss, {part name: detached value}, the
    decoder's outputs). ``progress`` is the fraction of training done, in [0, 1] (epoch-based
    schedules). Validation reuses the returned outputs for retrieval instead of a second forward."""

    def forward(self, decoder: nn.Module, batch: Batch,
                progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError


class PairObjective(Objective):
    """A pair loss ``loss(pred, target)`` on the output named ``target``. While training under DDP
    the pairs of all ranks are gathered (:func:`~braindecode_fw.ops.distributed.gather_rows`), so a
    contrastive loss sees the global batch as candidates; ``negatives`` (logged as
    ``train/negatives``) is the number of negatives per row actually used."""

    def __init__(self, loss: nn.Module, target: str, gather: bool = True):
        super().__init__()
        self.loss = loss
        self.target = target
        self.gather = gather

    def forward(self, decoder, batch, progress):
        out = decoder(batch.responses, batch.subject, batch.repeat_mask)
        pred, y = out[self.target], batch.targets[self.target]
        if self.training and self.gather:
            pred, y = gather_rows(pred), gather_rows(y)
        loss = self.loss(pred, y)
        return loss, {"negatives": torch.tensor(float(len(pred) - 1))}, out


@dataclass
class Term:
    """One weighted term. ``output``: decoder output key; ``target``: batch target key (for
    ``aux`` terms: the name of the decoder's ``loss/<name>`` output). ``output_index`` /
    ``target_index`` pick one token of a token output/target (STTM's global terms use token 0, the
    class-token slot). ``mixco_weight``: the weight during the BiMixCo phase, if it differs (STTM:
    0.5 then 0.2). ``temperature``: a ``token_contrast`` term's own τ (MindEye2's ConvNeXt
    distillation: 0.2)."""

    kind: str
    weight: float = 1.0
    output: str | None = None
    target: str | None = None
    output_index: int | None = None
    target_index: int | None = None
    mixco_weight: float | None = None
    temperature: float = 0.2

    def weight_at(self, mixing: bool) -> float:
        return self.mixco_weight if mixing and self.mixco_weight is not None else self.weight


@dataclass
class StepContext:
    """What the terms of one training or validation step share: the decoder's ``outputs``, the
    (possibly MixCo-mixed) ``targets``, whether rows are gathered across DDP ranks, the SoftCLIP
    temperature at this step, the BiMixCo soft labels (None outside the mixing phase) and their
    temperature, and ``parts``, the logged values a kind may add to (e.g. ``negatives``)."""

    outputs: Mapping[str, torch.Tensor]
    targets: Mapping[str, torch.Tensor]
    training: bool
    gather: bool
    softclip_temperature: float
    soft_labels: torch.Tensor | None
    mixco_temperature: float
    parts: dict[str, torch.Tensor]


class TermKind:
    """One kind of loss term (``loss.terms.<name>.kind``): how its value is computed in a step.

    ``value(name, term, ctx)`` returns the unweighted scalar, or None to skip the term in this step.
    ``mixes_target``: the term reads a target that BiMixCo mixes along with the inputs when
    ``mixco.mix_regression_targets`` is true. A lab adds a kind with :func:`register_term_kind`.
    """

    name: ClassVar[str]
    needs_pair: ClassVar[bool] = True  # the term names a decoder ``output`` and a batch ``target``
    mixes_target: ClassVar[bool] = True

    def value(self, name: str, term: Term, ctx: StepContext) -> torch.Tensor | None:
        raise NotImplementedError


class PairTermKind(TermKind):
    """A term between the decoder output ``term.output`` and the batch target ``term.target``, both
    as float32 (``output_index``/``target_index`` pick one token first). ``gathered`` kinds see the
    rows of all DDP ranks while training (their negatives do not depend on the GPU count); the
    others stay per rank, where DDP's gradient average already makes them global means."""

    gathered: ClassVar[bool] = False

    def value(self, name, term, ctx):
        out, targets = ctx.outputs, ctx.targets
        if term.output not in out:
            raise UnknownNameError(f"loss.terms.{name}: the decoder has no output {term.output!r}; it provides "
                           f"{sorted(k for k in out if not is_aux_loss(k))} (drop the term with "
                           f"loss.terms.{name}=null, or train the target that head needs)")
        if term.target not in targets:
            raise UnknownNameError(f"loss.terms.{name}: no target {term.target!r} in the batch; the run trains "
                           f"{sorted(targets)} (add it under extra_targets)")
        pred, y = out[term.output].float(), self.select_target(targets[term.target].float(), name, term, ctx)
        if term.output_index is not None:
            pred = pred[:, term.output_index]
        if term.target_index is not None:
            y = y[:, term.target_index]
        if ctx.gather and self.gathered:
            pred, y = gather_rows(pred), gather_rows(y)
        return self.loss(pred, y, name, term, ctx)

    def select_target(self, y: torch.Tensor, name: str, term: Term, ctx: StepContext) -> torch.Tensor:
        """The target rows/tokens the prediction covers (all of them, unless a kind samples)."""
        return y

    def loss(self, pred: torch.Tensor, y: torch.Tensor, name: str, term: Term, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError


class ContrastiveKind(PairTermKind):
    """BiMixCo with the mixing's soft labels during the MixCo phase, SoftCLIP at the scheduled
    temperature afterwards (docs/methods/mindeye2.md §4)."""

    name = "contrastive"
    gathered = True
    mixes_target = False  # the contrastive pairs get the soft labels instead

    def loss(self, pred, y, name, term, ctx):
        ctx.parts.setdefault("negatives", torch.tensor(float(len(pred) - 1)))
        if ctx.soft_labels is not None:
            return bimixco_loss(pred, y, ctx.soft_labels, ctx.mixco_temperature)
        return soft_clip_loss(pred, y, ctx.softclip_temperature)


class TokenContrastKind(PairTermKind):
    """Token-level soft distillation: every token a row, at the term's own ``temperature``."""

    name = "token_contrast"
    gathered = True

    def loss(self, pred, y, name, term, ctx):
        return soft_token_contrast(pred, y, term.temperature)


class NormalizedMSEKind(PairTermKind):
    name = "normalized_mse"

    def loss(self, pred, y, name, term, ctx):
        return normalized_mse(pred, y)


class MSEKind(PairTermKind):
    name = "mse"

    def loss(self, pred, y, name, term, ctx):
        return F.mse_loss(pred, y)


class L1Kind(PairTermKind):
    name = "l1"

    def loss(self, pred, y, name, term, ctx):
        return F.l1_loss(pred, y)


class MultiscaleInfoNCEKind(PairTermKind):
    """Brain-IT's multi-scale InfoNCE over the queries the decoder sampled: the decoder gives
    ``<output>/index`` (which target tokens it predicted) and ``<output>/scale`` next to ``<output>``
    (docs/methods/brainit.md). Negatives stay per rank: a (B·S_i)² logit matrix per scale is large
    already."""

    name = "multiscale_infonce"

    def select_target(self, y, name, term, ctx):
        return y[:, self.sampled(ctx.outputs, term.output, name, SAMPLED_INDEX_SUFFIX).to(y.device)]

    def loss(self, pred, y, name, term, ctx):
        return multiscale_infonce(pred, y, self.sampled(ctx.outputs, term.output, name, SAMPLED_SCALE_SUFFIX))

    @staticmethod
    def sampled(out: Mapping[str, torch.Tensor], output: str, term: str, suffix: str) -> torch.Tensor:
        key = output + suffix
        if key not in out:
            raise UnknownNameError(f"loss.terms.{term}: a multiscale_infonce term needs the decoder's sampled queries "
                           f"{output + SAMPLED_INDEX_SUFFIX!r} and {output + SAMPLED_SCALE_SUFFIX!r} (model=brainit "
                           f"with token_sampling on the branch of {output!r})")
        return out[key]


class AuxKind(TermKind):
    """A loss the decoder computed itself, ``outputs["loss/<target or term name>"]`` (cycle, brain
    reconstruction, prior). Skipped in evaluation when absent: repeated test responses averaged in
    output space leave the decoder without its auxiliary losses."""

    name = "aux"
    needs_pair = False
    mixes_target = False

    def value(self, name, term, ctx):
        key = aux_loss_key(term.target or name)
        if key in ctx.outputs:
            return ctx.outputs[key]
        if not ctx.training:
            return None
        raise UnknownNameError(f"loss.terms.{name}: the decoder has no auxiliary output {key!r}; "
                       f"it provides {sorted(k for k in ctx.outputs if is_aux_loss(k))}")


TERM_KINDS: dict[str, TermKind] = {}


def register_term_kind(kind: TermKind) -> TermKind:
    """Make ``kind`` available as ``loss.terms.<name>.kind: <kind.name>`` (a lab's own term kind);
    refuses a name already taken."""
    if kind.name in TERM_KINDS:
        raise ConfigError(f"term kind {kind.name!r} is already registered ({type(TERM_KINDS[kind.name]).__name__})")
    TERM_KINDS[kind.name] = kind
    return kind


for _kind in (ContrastiveKind, TokenContrastKind, NormalizedMSEKind, MSEKind, L1Kind, MultiscaleInfoNCEKind, AuxKind):
    register_term_kind(_kind())

KINDS = tuple(TERM_KINDS)  # the shipped kinds, in their documented order
REGRESSION_KINDS = tuple(k for k, v in TERM_KINDS.items() if v.mixes_target)



class TermsObjective(Objective):
    """Weighted terms with MindEye2's contrastive schedule.

    ``mixco``: ``{until: 0.33, temperature: 0.006, beta_alpha: 0.15, select_prob: 0.5,
    original_label_bug: false, mix_regression_targets: true}`` or None (no BiMixCo phase).
    While ``progress < until`` the responses are MixCo-mixed within each subject before the
    decoder and contrastive terms use BiMixCo with the mixing's soft labels; the regression targets
    named by ``mix_regression_targets`` (:meth:`mixed_targets`: ``true`` all of them, token-contrast
    teachers included; a list, e.g. MindEye2's ``[vae_latent]``; ``false`` none) are mixed with the
    same β and partners. MindEye2 mixed its VAE targets only after the L1 had been computed, i.e.
    not at all: ``false`` reproduces that.
    ``softclip``: ``{temperature: 0.005}`` (fixed, MindBridge) or ``{start: 0.004, end: 0.0075}``
    (cosine over the SoftCLIP phase, MindEye2).
    ``random_weighting``: groups of term names, e.g. ``[[clip, global_image, global_text], [prior]]``;
    every training step the group sums are weighted by ``softmax(randn(n_groups))`` (STTM's loss,
    docs/methods/sttm.md §4), drawn from the objective's own seeded generator; terms outside every group
    keep weight 1. ``input_noise``: the standard deviation of Gaussian noise added to the responses
    while training (STTM: 0.01).
    ``gather``: under DDP, contrastive and token-contrast terms run over the rows of all ranks (the
    BiMixCo soft labels become block-diagonal: partners stay on their rank), so the negatives do
    not depend on the GPU count; regression terms stay per rank (DDP's gradient average already
    makes them global means). ``negatives`` is logged.
    """

    def __init__(self, terms: Mapping[str, Mapping[str, Any]], softclip: Mapping[str, float] | None = None,
                 mixco: Mapping[str, Any] | None = None, seed: int = 0,
                 random_weighting: list[list[str]] | None = None, input_noise: float = 0.0,
                 gather: bool = True):
        super().__init__()
        self.gather = gather
        self.terms: dict[str, Term] = {}
        dropped = {name for name, spec in terms.items() if spec is None}
        for name, spec in terms.items():
            if spec is None:
                continue
            term = Term(**dict(spec))
            if term.kind not in TERM_KINDS:
                raise ConfigError(f"loss.terms.{name}.kind: one of {tuple(TERM_KINDS)}, got {term.kind!r}")
            if TERM_KINDS[term.kind].needs_pair and (term.output is None or term.target is None):
                raise ConfigError(f"loss.terms.{name}: a {term.kind} term needs `output` and `target`")
            self.terms[name] = term
        if not self.terms:
            raise ConfigError("loss.terms: no terms configured")
        self.softclip = dict(softclip or {"temperature": 0.005})
        if "temperature" not in self.softclip and not {"start", "end"} <= set(self.softclip):
            raise ConfigError("loss.softclip: give `temperature`, or `start` and `end` for the cosine schedule")
        self.mixco = dict(mixco) if mixco else None
        # a term set to null leaves its group; a group left empty goes
        self.groups = [g for g in ([n for n in group if n not in dropped] for group in (random_weighting or [])) if g]
        grouped = [n for g in self.groups for n in g]
        unknown = sorted(set(grouped) - set(self.terms))
        if unknown or len(grouped) != len(set(grouped)):
            raise ConfigError(f"loss.random_weighting: every name once and among the terms {sorted(self.terms)}; "
                             f"got {self.groups}")
        self.input_noise = float(input_noise)
        self.generator = torch.Generator().manual_seed(seed)
        self.mixed_targets()  # refuse a malformed value before training starts

    def mixed_targets(self) -> list[str]:
        """The regression targets mixed with the inputs during BiMixCo (``mixco.mix_regression_targets``:
        ``true`` every target a regression or token-contrast term reads, ``false`` none, or a list
        of target names), each once however many terms read it."""
        spec = self.mixco.get("mix_regression_targets", True) if self.mixco else False
        read = list(dict.fromkeys(t.target for t in self.terms.values() if TERM_KINDS[t.kind].mixes_target))
        if spec is True:
            return read
        if spec is False or spec is None:
            return []
        names = [spec] if isinstance(spec, str) else list(spec)
        if not all(isinstance(n, str) for n in names):
            raise ConfigError(f"loss.mixco.mix_regression_targets: true, false or a list of target names, got {spec!r}")
        # a named target whose term a recipe switched off (e.g. `loss.terms.blur: null`) is skipped
        return [n for n in names if n in read]

    def softclip_temperature(self, progress: float) -> float:
        if "temperature" in self.softclip:
            return float(self.softclip["temperature"])
        until = self.mixco["until"] if self.mixco else 0.0
        phase = (progress - until) / max(1e-12, 1 - until)
        return cosine_temperature(phase, self.softclip["start"], self.softclip["end"])

    def forward(self, decoder, batch, progress):
        mixing = self.mixco is not None and progress < self.mixco["until"] and self.training
        responses, targets, soft_labels = self._inputs(batch, mixing)
        # repeated test responses (validation without a val split) are averaged in output space; the
        # decoder then has no auxiliary losses, and evaluation skips those terms
        out = decoder(responses, batch.subject, batch.repeat_mask, targets=targets)
        scales = self._group_scales()
        gather = self.gather and self.training
        if gather and soft_labels is not None:
            soft_labels = gather_block_diagonal(soft_labels)
        mixco_tau = self.mixco.get("temperature", 0.006) if self.mixco else 0.006
        ctx = StepContext(outputs=out, targets=targets, training=self.training, gather=gather,
                          softclip_temperature=self.softclip_temperature(progress), soft_labels=soft_labels,
                          mixco_temperature=mixco_tau, parts={})
        ctx.parts.update({f"group_weight/{g[0]}": torch.tensor(scales[g[0]]) for g in (self.groups if scales else [])})
        total = responses.new_zeros(())
        for name, term in self.terms.items():
            value = TERM_KINDS[term.kind].value(name, term, ctx)
            if value is None:
                continue
            ctx.parts[name] = value.detach()
            total = total + scales.get(name, 1.0) * term.weight_at(soft_labels is not None) * value
        ctx.parts["temperature"] = torch.tensor(ctx.softclip_temperature if soft_labels is None else mixco_tau)
        return total, ctx.parts, out

    def _inputs(self, batch: Batch, mixing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """The responses the decoder sees (training noise, MixCo mixing within each subject), the
        targets (those of :meth:`mixed_targets` mixed with the same β and partners) and the BiMixCo
        soft labels (None when not mixing)."""
        responses, targets = batch.responses, dict(batch.targets)
        if self.input_noise and self.training:
            noise = torch.randn(responses.shape, generator=self.generator)
            responses = responses + self.input_noise * noise.to(responses.device, responses.dtype)
        if not mixing:
            return responses, targets, None
        partner, label = mixco_permutation(batch.subject, generator=self.generator,
                                           original_label_bug=self.mixco.get("original_label_bug", False))
        responses, beta = mixco_inputs(responses, partner, beta_alpha=self.mixco.get("beta_alpha", 0.15),
                                       select_prob=self.mixco.get("select_prob", 0.5), generator=self.generator)
        for key in self.mixed_targets():
            if key in targets:
                y = targets[key]
                b = beta.view(-1, *[1] * (y.ndim - 1)).to(y.dtype)
                targets[key] = b * y + (1 - b) * y[partner.to(y.device)]
        return responses, targets, mixco_soft_labels(beta, label).to(responses.device)

    def _group_scales(self) -> dict[str, float]:
        """STTM's random weighting: each training step, term name -> its group's weight from
        ``softmax(randn(n_groups))`` (empty outside training or without groups)."""
        if not (self.groups and self.training):
            return {}
        weights = torch.softmax(torch.randn(len(self.groups), generator=self.generator), 0)
        return {n: float(w) for g, w in zip(self.groups, weights, strict=True) for n in g}


class ClipMSEObjective(Objective):
    """Benchetrit et al. 2023's objective (docs/methods/meg_brainmodule.md §5) for decoders with a contrastive and a
    regression head per target (:class:`~braindecode_fw.models.meg.MEGDecoder`):
    ``L = Σ_targets λ·L_CLIP(out[name], z) + (1 − λ)·L_MSE(out["regression/<name>"], z)``, with
    :class:`~braindecode_fw.losses.ClipMSELoss`'s learned scale ``exp(t)`` and ``symmetric`` flag.

    ``targets``: the target names to train (default: every output that has a batch target). Under DDP
    the contrastive term runs over the rows of all ranks (as :class:`PairObjective`); the MSE term
    stays per rank. Parts logged: ``clip``, ``mse`` (suffixed ``/<name>`` with several targets),
    ``scale`` (the current ``exp(t)``) and ``negatives``.
    """

    def __init__(self, lambda_clip: float = 0.75, init_log_scale: float = 5.0, learn_scale: bool = True,
                 symmetric: bool = True, targets: list[str] | None = None, gather: bool = True):
        super().__init__()
        self.loss = ClipMSELoss(lambda_clip, init_log_scale, learn_scale, symmetric)
        self.targets = list(targets) if targets else None
        self.gather = gather

    def forward(self, decoder, batch, progress):
        out = decoder(batch.responses, batch.subject, batch.repeat_mask)
        names = self.targets or [k for k in out if k in batch.targets]
        if not names:
            raise UnknownNameError(f"loss: no decoder output matches a batch target; outputs {sorted(out)}, "
                           f"targets {sorted(batch.targets)}")
        lam = self.loss.lambda_clip
        total = batch.responses.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for name in names:
            suffix = f"/{name}" if len(names) > 1 else ""
            if name not in out or name not in batch.targets:
                raise UnknownNameError(f"loss.targets: {name!r} needs a decoder output and a batch target of that name; "
                               f"outputs {sorted(out)}, targets {sorted(batch.targets)}")
            y = batch.targets[name]
            if lam > 0:
                pred, yy = out[name], y
                if self.training and self.gather:
                    pred, yy = gather_rows(pred), gather_rows(yy)
                parts.setdefault("negatives", torch.tensor(float(len(pred) - 1)))
                clip = self.loss.clip_loss(pred, yy)
                parts["clip" + suffix] = clip.detach()
                total = total + lam * clip
            if lam < 1:
                key = regression_key(name)
                if key not in out:
                    raise UnknownNameError(f"loss.lambda_clip={lam} needs the regression output {key!r}; the decoder has "
                                   f"{sorted(out)} (set model.regression_heads=true, or loss.lambda_clip=1)")
                mse = F.mse_loss(out[key].float(), y.float())
                parts["mse" + suffix] = mse.detach()
                total = total + (1 - lam) * mse
        parts["scale"] = self.loss.log_scale.detach().exp()
        return total, parts, out
