"""Decoder: subject adapters -> shared encoder -> one head per target (docs/architecture.md §2, §4.4).

:class:`Decoder` also declares the optional hooks the tasks call on every decoder (data
configuration, artifacts of a run, voxel clusters and coordinates, adding a subject): each has a
documented default, and a method overrides the ones it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from braindecode_fw.contracts import LOWLEVEL_AUX_TOKENS, aux_loss_key, backbone_key, is_aux_loss
from braindecode_fw.errors import ConfigError
from braindecode_fw.models.adapters import SubjectLinearAdapter


class Decoder(nn.Module):
    """Composes the three parts; built from config with the data-dependent sizes injected.

    ``forward(responses, subjects)``: ``(B, F_max)`` -> ``{target_name: (B, *target_shape)}``.
    With ``responses`` of shape ``(B, R, F_max)`` and ``repeat_mask`` ``(B, R)``, every repetition
    goes through the network and the outputs are averaged over the real repetitions (MindEye2's
    test-time averaging in output space, docs/evaluation.md).

    Optional hooks (defaults here; a method overrides what it needs): :meth:`configure_from_data`,
    :meth:`use_saved_artifacts` / :meth:`save_artifacts` (``bdf-train``, Brain-IT's stage 0),
    :meth:`auxiliary_output_shapes`, :meth:`export_trained_parts` (NeuroPictor's ControlNet),
    :attr:`n_clusters` / :meth:`has_clusters` / :meth:`set_clusters` (Brain-IT's voxel clusters),
    :attr:`uses_voxel_coordinates` / :meth:`set_voxel_coordinates` (NeuroPictor's cortical map), and
    for ``bdf-adapt`` :meth:`add_subject`, :attr:`subject_adapter`, :attr:`linear_adapter` and
    :meth:`nearest_voxel_init` (Brain-IT's transfer).
    """

    def __init__(self, adapter: nn.Module, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.adapter = adapter
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, responses: torch.Tensor, subjects: Sequence[str], repeat_mask: torch.Tensor | None = None,
                targets: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``targets`` (training and validation only) lets a decoder compute auxiliary losses that
        need them (``outputs["loss/<name>"]``, e.g. a diffusion prior's); prediction passes none."""
        if repeat_mask is not None:
            b, r = responses.shape[:2]
            flat_subjects = [s for s in subjects for _ in range(r)]
            out = self.compute(responses.reshape(b * r, *responses.shape[2:]), flat_subjects, None)
            w = repeat_mask.to(responses.dtype)
            w = w / w.sum(1, keepdim=True).clamp(min=1)
            return {k: torch.einsum("br...,br->b...", v.reshape(b, r, *v.shape[1:]), w) for k, v in out.items()
                    if not is_aux_loss(k)}
        return self.compute(responses, subjects, targets)

    def configure_from_data(self, datamodule) -> None:
        """Take what the data knows beyond sizes (e.g. MEG sensor positions) once the datamodule is set
        up, before training; restored from the state dict afterwards. Nothing for fMRI decoders."""

    def compute(self, responses: torch.Tensor, subjects: Sequence[str],
                targets: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """One response per row: ``(B, F)`` -> outputs (subclasses add auxiliary losses)."""
        h = self.encoder(self.adapter(responses, subjects))
        return {name: head(h) for name, head in self.heads.items()}

    def auxiliary_output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-item shapes of outputs beyond the ones named after targets that a generator may read
        (e.g. NeuroPictor's ``control_map`` ``(C, h, w)``); checkpoints record them as
        ``auxiliary_output_shapes`` next to ``target_shapes``. None by default."""
        return {}

    def generation_output(self, name: str) -> str:
        """The output key that feeds a generator input called ``name`` (a target or auxiliary
        output name). By default the output of that name; a decoder with a separate head for
        generation says which (the MEG module's ``regression/<name>``)."""
        return name

    def export_trained_parts(self, run_dir: str | Path) -> dict[str, str]:
        """Called once after training (best checkpoint loaded, rank zero only): write trained parts
        that other tools load on their own into ``run_dir`` (e.g. NeuroPictor's ControlNet as a
        diffusers folder for ``generator=controlnet_modulated``). Returns name -> path written, which
        ``bdf-train`` records in ``result.json``. Nothing by default."""
        return {}

    # -- a run's artifacts (bdf-train) ----------------------------------------------------------

    def use_saved_artifacts(self, run_dir: str | Path) -> None:
        """Called by ``bdf-train`` when it continues a run, before :meth:`configure_from_data`, with the
        folder of the run the checkpoint belongs to: reuse what :meth:`save_artifacts` wrote when the
        run started instead of recomputing it differently (Brain-IT reloads its stage 0 clusters from
        ``<run_dir>/stage0``). Nothing by default."""

    def save_artifacts(self, run_dir: str | Path) -> list[Path]:
        """Called by ``bdf-train`` after :meth:`configure_from_data` (rank zero only): write what the
        data configuration made into ``run_dir`` (Brain-IT: stage 0's clustering, encoder and report in
        ``<run_dir>/stage0/``). Returns the paths written; nothing by default."""
        return []

    # -- voxel clusters and coordinates (set from the data, or at random by bdf-bench) ---------------

    @property
    def n_clusters(self) -> int | None:
        """The number of functional voxel clusters each subject's voxels are assigned to before the
        decoder can run (Brain-IT's stage 0, docs/methods/brainit.md §2.3); None: the decoder uses none."""
        return None

    def has_clusters(self) -> bool:
        """Whether every subject's voxels have their cluster (:meth:`set_clusters`). True for decoders
        without clusters (nothing to set)."""
        return True

    def set_clusters(self, labels: Mapping[str, torch.Tensor]) -> None:
        """Every subject's cluster labels ``labels[s]`` ``(V_s,)`` in ``[0, n_clusters)``; only decoders
        with :attr:`n_clusters` take them."""
        raise ConfigError(f"{type(self).__name__} has no voxel clusters to set")

    @property
    def uses_voxel_coordinates(self) -> bool:
        """Whether the decoder places each subject's voxels by their coordinates
        (:meth:`set_voxel_coordinates`; NeuroPictor's cortical map). False by default."""
        return False

    def set_voxel_coordinates(self, subject: str, coordinates: Any, **kwargs: Any) -> None:
        """Place ``subject``'s voxels by ``coordinates``: ``(V, 3)`` voxel indices or ``(V, 2)`` flat-map
        coordinates (NeuroPictor: :meth:`~braindecode_fw.models.cortical_map.CorticalProjection.set_coordinates`).
        Only decoders with :attr:`uses_voxel_coordinates` take them."""
        raise ConfigError(f"{type(self).__name__} does not place voxels by coordinates")

    # -- a new subject (bdf-adapt, tasks/adapt.py) -------------------------------------------------

    @property
    def subject_adapter(self) -> nn.Module | None:
        """The per-subject input part that :meth:`add_subject` extends (the ``adapter`` of the adapter ->
        encoder -> heads decoders); None where the subject-specific parts are not an adapter (MEG's
        subject layers, NeuroPictor's cortical projection, Brain-IT's voxel embeddings)."""
        return self._modules.get("adapter")

    @property
    def linear_adapter(self) -> SubjectLinearAdapter | None:
        """The adapter when it is one linear (ridge) map per subject (MindEye2's, docs/methods/mindeye2.md §2):
        what ``adaptation.init: ridge`` solves in closed form and ``adaptation.init_bias_from`` copies a
        bias of; None otherwise."""
        adapter = self.subject_adapter
        return adapter if isinstance(adapter, SubjectLinearAdapter) else None

    def add_subject(self, subject: str, n_features: int, init_bias_from: str | None = None) -> list[str]:
        """Fresh subject-specific parts for a new ``subject`` with ``n_features`` inputs (``bdf-adapt``);
        returns the parameter-name prefixes that belong to them (what ``adaptation.trainable:
        new_subject`` trains). ``init_bias_from``: a checkpoint subject whose adapter bias the new
        linear map starts from (MindEye2's adaptation). This default extends :attr:`subject_adapter`;
        MindBridge adds a builder (:class:`BridgeDecoder`), Brain-IT voxel embeddings."""
        adapter = self.subject_adapter
        if adapter is None:
            raise ConfigError(f"bdf-adapt: {type(self).__name__} has no subject adapter to extend (the MEG brain "
                             f"module's subject layers are trained jointly: bdf-train with the subject in data.subjects)")
        if not hasattr(adapter, "add_subject"):  # adapters are plain modules: the one duck-typed check left
            raise ConfigError(f"model.adapter: {type(adapter).__name__} cannot add subjects")
        adapter.add_subject(subject, n_features)
        prefixes = [f"adapter.{name}.{subject}." for name in ("linears", "embedders", "mlps")]
        if init_bias_from is not None:
            linear = self.linear_adapter
            if linear is None:
                raise ConfigError("adaptation.init_bias_from: only a linear (ridge) adapter has a bias to copy")
            with torch.no_grad():
                linear.linears[subject].bias.copy_(linear.linears[init_bias_from].bias)
        return prefixes

    def nearest_voxel_init(self, subject: str, datamodule: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``adaptation.init: nearest_voxel``, after :meth:`add_subject`: start the new subject's voxel
        parts from the nearest voxels of the checkpoint's subjects (Brain-IT's transfer,
        docs/methods/brainit.md §7; ``spec`` is ``adaptation.nearest_voxel``). Returns what was done;
        only Brain-IT implements it."""
        raise ConfigError(f"adaptation.init: nearest_voxel is Brain-IT's transfer (model=brainit); the "
                         f"checkpoint's decoder is {type(self).__name__}")


def build_decoder(
    n_features: Mapping[str, int],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    adapter: Callable[..., nn.Module],
    encoder: Callable[..., nn.Module],
    head: Callable[..., nn.Module],
    hidden: int,
) -> Decoder:
    """Build from partial constructors (Hydra ``_partial_: true`` nodes) and data-derived sizes."""
    return Decoder(
        adapter=adapter(n_features=n_features, hidden=hidden),
        encoder=encoder(hidden=hidden),
        heads={name: head(hidden=hidden, target_shape=shape) for name, shape in target_shapes.items()},
    )


class BridgeDecoder(Decoder):
    """MindBridge (docs/methods/mindbridge.md §2, §4): pooled per-subject embedders -> shared translator -> heads,
    plus per-subject builders that map the shared embedding back to a subject's pooled voxels.

    With ``targets`` given (training/validation) it adds two auxiliary losses:
    ``loss/reconstruction`` = MSE(x, B_s(E_s(x))) over the batch's pooled inputs, and ``loss/cycle``
    = MSE(e_a, E_b(B_b(e_a))) for one pair of distinct subjects (a, b) of the batch: a random pair
    (training from scratch), or ``cycle_target`` as b (adaptation: source -> new subject). A batch
    with one subject has no cycle term (0).

    ``builder=None`` is the single-subject model (the released ``MindSingle``): no builders, and both
    auxiliary losses are constant 0 (no gradient), so ``loss.terms.reconstruction``/``cycle`` add
    nothing whatever their weight.
    """

    def __init__(self, adapter: nn.Module, encoder: nn.Module, heads: Mapping[str, nn.Module], builder: nn.Module | None,
                 cycle_target: str | None = None):
        super().__init__(adapter, encoder, heads)
        self.builder = builder
        self.cycle_target = cycle_target

    def compute(self, responses, subjects, targets):
        pooled = self.adapter.pool(responses, subjects)
        embedded = self.adapter.embed(pooled, subjects)
        h = self.encoder(embedded)
        out = {name: head(h) for name, head in self.heads.items()}
        if targets is not None and self.builder is None:
            out[aux_loss_key("reconstruction")] = out[aux_loss_key("cycle")] = embedded.new_zeros(())
        elif targets is not None:
            out[aux_loss_key("reconstruction")] = nn.functional.mse_loss(self.builder(embedded, subjects), pooled)
            out[aux_loss_key("cycle")] = self.cycle_loss(embedded, subjects)
        return out

    def add_subject(self, subject: str, n_features: int, init_bias_from: str | None = None) -> list[str]:
        """:meth:`Decoder.add_subject` plus the new subject's builder, and the cycle loss runs toward the
        new subject (docs/methods/mindbridge.md §5, reset-tuning). A single-subject model (no builders)
        cannot be adapted this way."""
        if self.builder is None:
            # MindBridge adapts from a multi-subject model: the cycle loss needs a source subject's builder
            raise ConfigError("bdf-adapt: the MindBridge checkpoint has one subject and no builders; adapt "
                             "from a model trained on at least two subjects (data.subjects)")
        prefixes = super().add_subject(subject, n_features, init_bias_from)
        self.builder.add_subject(subject)
        self.cycle_target = subject
        return [*prefixes, f"builder.builders.{subject}."]

    def cycle_loss(self, embedded: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        present = list(dict.fromkeys(subjects))
        if len(present) < 2:
            return embedded.new_zeros(())
        if self.cycle_target is not None and self.cycle_target in present:
            b = self.cycle_target
            sources = [s for s in present if s != b]
            a = sources[int(torch.randint(len(sources), (), device="cpu"))]
        else:
            i, j = torch.randperm(len(present), device="cpu")[:2].tolist()
            a, b = present[i], present[j]
        rows = torch.tensor([k for k, s in enumerate(subjects) if s == a], device=embedded.device)
        e_a = embedded.index_select(0, rows)
        as_b = [b] * len(rows)
        e_b = self.adapter.embed(self.builder(e_a, as_b), as_b)
        return nn.functional.mse_loss(e_b, e_a)


def build_bridge_decoder(
    n_features: Mapping[str, int],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    adapter: Callable[..., nn.Module],
    encoder: Callable[..., nn.Module],
    head: Callable[..., nn.Module],
    builder: Callable[..., nn.Module],
    hidden: int,
) -> BridgeDecoder:
    """:func:`build_decoder` plus the per-subject builders (their pool size is the adapter's); with one
    subject no builders, as the released single-subject ``MindSingle`` has none."""
    adapter_module = adapter(n_features=n_features, hidden=hidden)
    return BridgeDecoder(
        adapter=adapter_module,
        encoder=encoder(hidden=hidden),
        heads={name: head(hidden=hidden, target_shape=shape) for name, shape in target_shapes.items()},
        builder=(builder(subjects=list(n_features), hidden=hidden, pool_size=adapter_module.pool_size)
                 if len(n_features) >= 2 else None),
    )


class TokenDecoder(Decoder):
    """Token-space decoders: adapter -> shared trunk -> token head -> per-token projector, with an
    optional low-level head and diffusion prior.

    - MindEye2 (docs/methods/mindeye2.md §2–4): ridge adapter, residual MLP, token head
      ``Linear(hidden -> T·W)`` (the "backbone" tokens the prior reads), 3-layer projector,
      VAE-latent low-level head, dalle2-style prior.
    - STTM (docs/methods/sttm.md §2): 2-layer MLP adapters, post-norm residual MLP, token-attention head
      (:class:`~braindecode_fw.models.heads.TokenAttentionHead`), ME1-style projector,
      ``nn.TransformerDecoder`` prior.

    Outputs: ``<target>`` (projected tokens ``(B, T, W)``), ``<target>/backbone``; with a low-level
    head ``<lowlevel_target>`` (predicted VAE latent) and ``lowlevel_aux_tokens``; with ``targets``
    and a prior, ``loss/prior``. :meth:`sample_prior` turns backbone tokens into predicted image
    tokens.
    """

    def __init__(self, adapter: nn.Module, encoder: nn.Module, token_head: nn.Module, projector: nn.Module, *,
                 target: str, target_shape: tuple[int, int], lowlevel: nn.Module | None = None,
                 lowlevel_target: str = "vae_latent", prior: nn.Module | None = None):
        heads: dict[str, nn.Module] = {"tokens": token_head, "projector": projector}
        if lowlevel is not None:
            heads["lowlevel"] = lowlevel
        super().__init__(adapter, encoder, heads)
        self.prior = prior
        self.target, self.target_shape, self.lowlevel_target = target, tuple(target_shape), lowlevel_target

    def compute(self, responses, subjects, targets):
        h = self.encoder(self.adapter(responses, subjects))
        backbone = self.heads["tokens"](h).view(len(h), *self.target_shape)
        out = {self.target: self.heads["projector"](backbone), backbone_key(self.target): backbone}
        if "lowlevel" in self.heads:
            low = self.heads["lowlevel"](h)
            out[self.lowlevel_target] = low["latent"]
            if "aux_tokens" in low:
                out[LOWLEVEL_AUX_TOKENS] = low["aux_tokens"]
        if targets is not None and self.prior is not None and self.target in targets:
            out[aux_loss_key("prior")] = self.prior.loss(backbone, targets[self.target].to(backbone.dtype))
        return out

    @torch.no_grad()
    def sample_prior(self, backbone: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.prior is None:
            raise ConfigError("model.prior: this decoder has no diffusion prior")
        return self.prior.sample(backbone, generator=generator)


def build_token_decoder(
    n_features: Mapping[str, int],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    adapter: Callable[..., nn.Module],
    encoder: Callable[..., nn.Module],
    projector: Callable[..., nn.Module],
    hidden: int,
    target: str = "clip_image_tokens",
    token_head: Callable[..., nn.Module] | None = None,
    lowlevel: Callable[..., nn.Module] | None = None,
    lowlevel_target: str = "vae_latent",
    lowlevel_teacher: str = "convnext_tokens",
    prior: Callable[..., nn.Module] | None = None,
) -> TokenDecoder:
    """Sizes from the data: the token head and prior from ``target_shapes[target]`` (T, W), the
    low-level head from ``target_shapes[lowlevel_target]`` when that target is trained, and its
    auxiliary token head (width ``C``) only when the teacher target ``lowlevel_teacher`` (N, C) is
    trained too. ``token_head`` (a partial taking ``hidden, n_tokens, width``) defaults to
    MindEye2's linear map."""
    if target not in target_shapes or len(target_shapes[target]) != 2:
        raise ConfigError(f"model.target: {target!r} must be a token target (T, W); targets {dict(target_shapes)}")
    n_tokens, width = (int(v) for v in target_shapes[target])
    low = None
    if lowlevel is not None and lowlevel_target in target_shapes:
        aux_dim = None
        if lowlevel_teacher in target_shapes:
            if len(target_shapes[lowlevel_teacher]) != 2:
                raise ConfigError(f"model.lowlevel_teacher: {lowlevel_teacher!r} must be tokens (N, C), got "
                                 f"{tuple(target_shapes[lowlevel_teacher])}")
            aux_dim = int(target_shapes[lowlevel_teacher][-1])
        low = lowlevel(hidden=hidden, latent_shape=tuple(target_shapes[lowlevel_target]), aux_dim=aux_dim)
        if aux_dim is not None and low.seed ** 2 != target_shapes[lowlevel_teacher][0]:
            raise ConfigError(f"model.lowlevel_teacher: the auxiliary head makes {low.seed ** 2} tokens "
                             f"({low.seed}×{low.seed}); the teacher {lowlevel_teacher!r} has "
                             f"{target_shapes[lowlevel_teacher][0]}")
    head = (token_head(hidden=hidden, n_tokens=n_tokens, width=width) if token_head is not None
            else nn.Linear(hidden, n_tokens * width))
    return TokenDecoder(
        adapter(n_features=n_features, hidden=hidden), encoder(hidden=hidden),
        head, projector(width=width), target=target, target_shape=(n_tokens, width),
        lowlevel=low, lowlevel_target=lowlevel_target,
        prior=prior(dim=width, n_tokens=n_tokens) if prior is not None else None)


# the name checkpoints written before STTM shared this builder carry as their model `_target_`
build_mindeye2_decoder = build_token_decoder
