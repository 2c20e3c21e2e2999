"""Decoder: subject adapters -> shared encoder -> one head per target (docs/architecture.md §2, §4.4)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from braindecode_fw.contracts import LOWLEVEL_AUX_TOKENS, aux_loss_key, backbone_key, is_aux_loss


class Decoder(nn.Module):
    """Composes the three parts; built from config with the data-dependent sizes injected.

    ``forward(responses, subjects)``: ``(B, F_max)`` -> ``{target_name: (B, *target_shape)}``.
    With ``responses`` of shape ``(B, R, F_max)`` and ``repeat_mask`` ``(B, R)``, every repetition
    goes through the network and the outputs are averaged over the real repetitions (MindEye2's
    test-time averaging in output space, docs/evaluation.md).
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

    def export_trained_parts(self, run_dir: str | Path) -> dict[str, str]:
        """Called once after training (best checkpoint loaded, rank zero only): write trained parts
        that other tools load on their own into ``run_dir`` (e.g. NeuroPictor's ControlNet as a
        diffusers folder for ``generator=controlnet_modulated``). Returns name -> path written, which
        ``bdf-train`` records in ``result.json``. Nothing by default."""
        return {}


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
            raise ValueError("model.prior: this decoder has no diffusion prior")
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
        raise ValueError(f"model.target: {target!r} must be a token target (T, W); targets {dict(target_shapes)}")
    n_tokens, width = (int(v) for v in target_shapes[target])
    low = None
    if lowlevel is not None and lowlevel_target in target_shapes:
        aux_dim = None
        if lowlevel_teacher in target_shapes:
            if len(target_shapes[lowlevel_teacher]) != 2:
                raise ValueError(f"model.lowlevel_teacher: {lowlevel_teacher!r} must be tokens (N, C), got "
                                 f"{tuple(target_shapes[lowlevel_teacher])}")
            aux_dim = int(target_shapes[lowlevel_teacher][-1])
        low = lowlevel(hidden=hidden, latent_shape=tuple(target_shapes[lowlevel_target]), aux_dim=aux_dim)
        if aux_dim is not None and low.seed ** 2 != target_shapes[lowlevel_teacher][0]:
            raise ValueError(f"model.lowlevel_teacher: the auxiliary head makes {low.seed ** 2} tokens "
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
