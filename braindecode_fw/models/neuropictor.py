"""NeuroPictor (Huo et al., ECCV 2024; docs/methods/neuropictor.md) as a framework decoder.

``(B, V)`` responses -> :class:`~braindecode_fw.models.cortical_map.CorticalProjection` (the only
per-subject part) -> ``(B, 1, H, W)`` cortical map -> :class:`FMRIViTEncoder` (shared across
subjects) -> ``(B, 1 + (H/P)², D)`` tokens (real: 257 × 1024), then two mappers (§2):

- :class:`SemanticMapper` -> ``clip_txt`` ``(B, 77, D_text)`` (+ the zero-initialised extra branch of
  the fine-tune model): the tokens that replace SD 2.1's text conditioning;
- :class:`ControlMapper` -> ``control_map`` ``(B, C, h, w)`` (real: 320 × 64 × 64), added to the
  output of the ControlNet's first block (``generation/controlnet.py``, ``injection="first_block"``).

Training loss (§3): ``L = L_simple + w_sem·L_sem``. ``L_simple`` is the decoder's auxiliary output
``loss/diffusion`` (:class:`NeuroPictorDiffusionLoss`: ε-MSE of a locked SD UNet driven by a trainable
ControlNet copy), read by a TermsObjective ``aux`` term; ``L_sem`` is an ordinary ``mse`` term between
``<semantic_target>/main`` (``clip_txt``) and the final-layer text-token target.

After training, ``bdf-train`` calls :meth:`NeuroPictorDecoder.export_trained_parts`, which writes the
trained ControlNet to ``<run dir>/controlnet/`` (a diffusers folder); ``bdf-reconstruct
generator=controlnet_modulated generator.controlnet=<run dir>/controlnet`` then samples from the
decoder's ``<semantic_target>`` (the conditioning) and ``control_map`` outputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.contracts import CONTROL_MAP, MAIN_SUFFIX, aux_loss_key
from braindecode_fw.errors import ConfigError, MissingFileError, UnknownNameError
from braindecode_fw.io import atomic_write_dir
from braindecode_fw.models.brainit import SelfAttentionBlock
from braindecode_fw.models.cortical_map import CorticalProjection
from braindecode_fw.models.decoder import Decoder

log = logging.getLogger(__name__)

CONTROL_OUTPUT = CONTROL_MAP  # the old name of contracts.CONTROL_MAP; MAIN_SUFFIX is contracts.MAIN_SUFFIX
CONTROLNET_EXPORT = "controlnet"  # <run dir>/controlnet/: the trained ControlNet, exported after training

# ---------------------------------------------------------------------------------------------
# fMRI encoder (fMRI-PTE-style ViT, docs/methods/neuropictor.md §2)


def sincos_position_embedding_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of a ``grid × grid`` patch grid, ``(grid², dim)``: half the
    channels encode the row, half the column, each as ``[sin(p·ω_k), cos(p·ω_k)]`` with
    ``ω_k = 10000^(-k/(dim/4))`` (the MAE / fMRI-PTE construction; patches row-major)."""
    if dim % 4:
        raise ConfigError(f"model.dim: the 2-D sin-cos position embedding needs a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        phase = p.flatten()[:, None] * omega[None]
        return torch.cat([phase.sin(), phase.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class PatchEmbed2D(nn.Module):
    """``(B, 1, H, W)`` -> ``(B, (H/P)·(W/P), D)``: non-overlapping ``P×P`` patches, linearly embedded."""

    def __init__(self, patch: int, dim: int, in_channels: int = 1):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FMRIViTEncoder(nn.Module):
    """NeuroPictor's fMRI encoder (docs/methods/neuropictor.md §2, fMRI-PTE's ``forward_encoder_wo_pred``), shared
    across subjects: ``(B, 1, H, W)`` -> PatchEmbed2D -> + fixed 2-D sin-cos position embedding ->
    prepend CLS -> ``depth`` blocks -> LayerNorm -> ``(B, 1 + (H/P)², D)``.

    Real scale: ``H = 256``, ``P = 16``, ``D = 1024`` -> 257 × 1024 tokens (implied by the mappers);
    depth and heads of the UK-Biobank-pretrained checkpoint are **[unverified]** (24 / 16 by default
    in ``braindecode_fw/conf/model/neuropictor.yaml``). This module is trained from scratch; loading the fMRI-PTE
    checkpoint is not implemented.
    """

    def __init__(self, map_size: int = 256, patch: int = 16, dim: int = 1024, depth: int = 24, heads: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if map_size % patch:
            raise ConfigError(f"model.patch: {patch} must divide model.map_size={map_size}")
        self.grid = map_size // patch
        self.n_tokens = 1 + self.grid ** 2
        self.patch_embed = PatchEmbed2D(patch, dim)
        self.register_buffer("pos_embed", sincos_position_embedding_2d(dim, self.grid)[None], persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, heads, qkv_bias=True, mlp_ratio=mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(maps) + self.pos_embed.to(maps.dtype)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Mappers (docs/methods/neuropictor.md §2 table)


class TokenMixer(nn.Sequential):
    """Two 1×1 convolutions over the token axis, ``(B, N_in, D)`` -> ``(B, N_out, D)``."""

    def __init__(self, n_in: int, n_mid: int, n_out: int):
        super().__init__(nn.Conv1d(n_in, n_mid, 1), nn.Conv1d(n_mid, n_out, 1))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SemanticBranch(nn.Module):
    """``(B, N, D)`` -> Conv1d(N→M, k1) -> Conv1d(M→L, k1) -> Linear(D→D_text) -> LN -> ``(B, L, D_text)``
    (M = N // 2 as released, 128 at N = 257; ``SemanticMapper`` chooses it)."""

    def __init__(self, n_tokens: int, dim: int, text_tokens: int, text_dim: int, mid_tokens: int = 128):
        super().__init__()
        self.tokens = TokenMixer(n_tokens, mid_tokens, text_tokens)
        self.linear = nn.Linear(dim, text_dim)
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(self.tokens(x)))


class SemanticMapper(nn.Module):
    """NeuroPictor's ``FMRIToSemanticModel``: ``(B, N, D)`` -> ``(clip_txt, condition)``, both
    ``(B, L, D_text)`` (real: 257 × 1024 -> 77 × 1024).

    ``clip_txt`` = :class:`SemanticBranch`; with ``extra_branch`` (the fine-tune model) ``condition =
    clip_txt + zero_conv(SemanticBranch'(x))``, a second branch of the same structure (its LN
    included) followed by a zero-initialised Conv1d(L→L, k3) over the tokens, so at initialisation the
    conditioning equals ``clip_txt`` exactly. ``L_sem`` supervises ``clip_txt`` with final-layer text
    tokens; the extra branch lets the conditioning move towards SD 2.1's penultimate-layer space
    (docs/methods/neuropictor.md §3). Without it ``condition`` is ``clip_txt``.

    ``mid_tokens``: the token count between the two convolutions; None = ``n_tokens // 2``, the
    released rule (128 at 257 tokens).
    """

    def __init__(self, n_tokens: int, dim: int, text_tokens: int = 77, text_dim: int = 1024,
                 extra_branch: bool = False, mid_tokens: int | None = None):
        super().__init__()
        mid_tokens = n_tokens // 2 if mid_tokens is None else int(mid_tokens)
        self.main = SemanticBranch(n_tokens, dim, text_tokens, text_dim, mid_tokens)
        self.extra = SemanticBranch(n_tokens, dim, text_tokens, text_dim, mid_tokens) if extra_branch else None
        self.extra_out = _zero(nn.Conv1d(text_tokens, text_tokens, 3, padding=1)) if extra_branch else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clip_txt = self.main(x)
        if self.extra is None:
            return clip_txt, clip_txt
        return clip_txt, clip_txt + self.extra_out(self.extra(x))


class ControlMapper(nn.Module):
    """NeuroPictor's ``FMRIToControlModel``: ``(B, N, D)`` -> Conv1d(N→M, k1) -> Conv1d(M→C, k1) over
    tokens -> Linear(D→h·w) + SiLU -> zero-initialised Conv1d(C→C, k3) -> ``(B, C, h, w)`` (real:
    257 × 1024 -> 320 × 64 × 64, M = 514). The zero convolution makes the map exactly 0 at
    initialisation. ``mid_tokens`` M: None = ``2 · n_tokens``, the released rule."""

    def __init__(self, n_tokens: int, dim: int, channels: int = 320, size: int = 64, mid_tokens: int | None = None):
        super().__init__()
        self.channels, self.size = channels, size
        self.tokens = TokenMixer(n_tokens, 2 * n_tokens if mid_tokens is None else int(mid_tokens), channels)
        self.linear = nn.Linear(dim, size * size)
        self.out = _zero(nn.Conv1d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.linear(self.tokens(x)))
        return self.out(h).view(len(x), self.channels, self.size, self.size)


# ---------------------------------------------------------------------------------------------
# L_simple with a locked UNet and a trainable ControlNet (docs/methods/neuropictor.md §2–3)


class NeuroPictorDiffusionLoss(nn.Module):
    """``L_simple``: ``E_{t, ε} ‖ε − ε_θ(z_t, t, c, m)‖²`` with ``ε_θ`` a **locked** diffusers
    ``UNet2DConditionModel`` plus the residuals of a **trainable** ``ControlNetModel`` (a copy of the
    UNet encoder, zero output convolutions, ``ControlNetModel.from_unet``) whose conditioning
    embedding is the identity, so the control map ``m`` ``(B, C, h, w)`` is *added* to the ControlNet's
    first block output (``conv_in``), as :mod:`braindecode_fw.generation.controlnet` does at sampling
    (``injection="first_block"``); ``c`` ``(B, L, D_text)`` are the predicted tokens used as
    ``encoder_hidden_states``.

    Noise: a DDPM schedule with SD's scaled-linear betas (``beta_start`` 0.00085, ``beta_end`` 0.012,
    1000 steps), ε-prediction, ``t`` uniform. ``cond_dropout`` (training only): each sample's whole
    conditioning is replaced with probability ``p`` by ``uncond`` ``(L, D_text)`` (zeros by default;
    NeuroPictor uses SD 2.1's empty-prompt embedding with p = 0.05 in its CFG stage).

    The locked UNet's weights are not in this module's state dict (they are reloaded from
    ``model.diffusion.model`` when the decoder is rebuilt), so checkpoints hold only what trains.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module | None = None, *, num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, cond_dropout: float = 0.0,
                 uncond: torch.Tensor | None = None, control_scale: float = 1.0, text_tokens: int = 77):
        super().__init__()
        from diffusers import ControlNetModel, DDPMScheduler

        if not 0.0 <= cond_dropout <= 1.0:
            raise ConfigError(f"model.diffusion.cond_dropout: a probability in [0, 1], got {cond_dropout}")
        self.unet = unet.requires_grad_(False).eval()
        if controlnet is None:
            controlnet = ControlNetModel.from_unet(unet)
        controlnet.controlnet_cond_embedding = nn.Identity()
        dtype = next(unet.parameters()).dtype
        if next(controlnet.parameters()).dtype != dtype:
            controlnet = controlnet.to(dtype=dtype)
        self.controlnet = controlnet.requires_grad_(True)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                       beta_end=beta_end, beta_schedule="scaled_linear", prediction_type="epsilon")
        self.cond_dropout, self.control_scale = float(cond_dropout), float(control_scale)
        width = int(unet.config.cross_attention_dim)
        uncond = torch.zeros(text_tokens, width) if uncond is None else torch.as_tensor(uncond, dtype=torch.float32)
        if uncond.shape != (text_tokens, width):
            raise ConfigError(f"model.diffusion.uncond: expected ({text_tokens}, {width}), got {tuple(uncond.shape)}")
        self.register_buffer("uncond", uncond)
        self._unet_keys = {"unet." + k for k in unet.state_dict()}
        self.register_state_dict_post_hook(self._drop_unet_keys)
        self.register_load_state_dict_post_hook(self._ignore_missing_unet)

    # --- the locked UNet stays out of checkpoints and in eval mode
    @staticmethod
    def _drop_unet_keys(module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + "unet.")]:
            del state_dict[key]

    def _ignore_missing_unet(self, module, incompatible) -> None:
        keep = []
        for key in incompatible.missing_keys:
            pos = key.find("unet.")
            while pos >= 0 and key[pos:] not in self._unet_keys:
                pos = key.find("unet.", pos + 1)
            if pos < 0:
                keep.append(key)
        incompatible.missing_keys[:] = keep

    def train(self, mode: bool = True) -> NeuroPictorDiffusionLoss:
        super().train(mode)
        self.unet.eval()
        return self

    @property
    def control_channels(self) -> int:
        return int(self.controlnet.config.block_out_channels[0])

    @property
    def text_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def epsilon(self, noisy: torch.Tensor, t: torch.Tensor, condition: torch.Tensor,
                control: torch.Tensor) -> torch.Tensor:
        """``ε_θ(z_t, t, c, m)``: ControlNet residuals added to the locked UNet's skips and middle block."""
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=condition, controlnet_cond=control,
                                    conditioning_scale=self.control_scale, return_dict=False)
        return self.unet(noisy, t, encoder_hidden_states=condition, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def forward(self, latents: torch.Tensor, condition: torch.Tensor, control: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``latents`` ``(B, 4, h, w)`` (the scaled ``vae_latent`` target), ``condition`` ``(B, L, D_text)``,
        ``control`` ``(B, C, h, w)`` -> scalar ε-MSE."""
        dtype = next(self.unet.parameters()).dtype
        z0 = latents.to(dtype)
        b, device = len(z0), z0.device
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
        noise = torch.randn(z0.shape, generator=generator).to(device, dtype)
        noisy = self.scheduler.add_noise(z0, noise, t)
        condition = condition.to(dtype)
        if self.training and self.cond_dropout > 0:
            drop = (torch.rand(b, generator=generator) < self.cond_dropout).to(device)
            condition = torch.where(drop[:, None, None], self.uncond.to(dtype).expand_as(condition), condition)
        eps = self.epsilon(noisy, t, condition, control.to(dtype))
        return F.mse_loss(eps.float(), noise.float())

    def save_controlnet(self, folder: str | Path) -> Path:
        """The trained ControlNet as a diffusers folder (``save_pretrained``), for
        ``generator=controlnet_modulated`` (``generator.controlnet=<folder>``, ``injection=first_block``).
        The identity conditioning embedding is not saved; the reconstructor replaces it again."""
        from diffusers import ControlNetModel

        folder = Path(folder)
        copy = ControlNetModel.from_config(self.controlnet.config)
        state = {k: v for k, v in self.controlnet.state_dict().items()}
        copy.load_state_dict(state, strict=False)
        copy.save_pretrained(folder)
        return folder

    @classmethod
    def from_pretrained(cls, model: str, *, controlnet: str | None = None, dtype: str = "float32",
                        revision: str | None = None, uncond: str | Any | None = None, **kwargs: Any
                        ) -> NeuroPictorDiffusionLoss:
        """From a Stable Diffusion pipeline (hub id, e.g. ``stabilityai/stable-diffusion-2-1-base``, or a
        ``save_pretrained`` folder) through :func:`~braindecode_fw.generation.loading.load_model`: its
        ``unet`` (locked); the ControlNet from ``controlnet`` (hub id or folder) or a fresh copy of the
        UNet encoder. ``uncond``: a ``.npy``/``.pt`` file or array ``(L, D_text)``, or None for zeros."""
        from braindecode_fw.generation.loading import load_model

        unet = load_model("UNet2DConditionModel", model, subfolder="unet", config_key="model.diffusion.model",
                          dtype=dtype, revision=revision)
        net = (load_model("ControlNetModel", controlnet, config_key="model.diffusion.controlnet", dtype=dtype)
               if controlnet else None)
        if isinstance(uncond, str | Path):
            path = Path(uncond).expanduser()
            if not path.is_file():
                raise MissingFileError(f"model.diffusion.uncond: {path} does not exist (a .npy or .pt (L, D_text) array)")
            try:  # tensors and plain arrays only: nothing in the file is executed
                uncond = (torch.load(path, map_location="cpu", weights_only=True) if path.suffix == ".pt"
                          else torch.from_numpy(np.load(path, allow_pickle=False)))
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"model.diffusion.uncond: {path} is not a plain (L, D_text) tensor or array "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return cls(unet, net, uncond=uncond, **kwargs)


# ---------------------------------------------------------------------------------------------
# Decoder


class NeuroPictorDecoder(Decoder):
    """NeuroPictor behind the framework's decoder contract (docs/methods/neuropictor.md).

    ``forward(responses, subjects, repeat_mask=None, targets=None)``: ``(B, V_max)`` ->
    ``{<semantic_target>: condition (B, L, D_text), <semantic_target>/main: clip_txt (B, L, D_text),
    "control_map": (B, C, h, w)}``; with ``targets`` holding ``latent_target`` and a diffusion module
    attached, also ``loss/diffusion`` (:class:`NeuroPictorDiffusionLoss`). The conditioning (the
    output named after the target, which the ``controlnet_modulated`` generator reads) is
    ``clip_txt`` plus the extra branch; ``L_sem`` (docs/methods/neuropictor.md §3) reads ``.../main`` = ``clip_txt``.
    Without the extra branch both are the same tensor.

    Only the :class:`CorticalProjection` is per subject (each subject's voxel layout); the ViT, the
    mappers and the ControlNet are shared.
    """

    def __init__(self, projection: CorticalProjection, encoder: FMRIViTEncoder, semantic: SemanticMapper,
                 control: ControlMapper, *, semantic_target: str = "clip_text_tokens",
                 latent_target: str = "vae_latent", diffusion: NeuroPictorDiffusionLoss | None = None):
        nn.Module.__init__(self)
        self.projection, self.encoder = projection, encoder
        self.semantic, self.control = semantic, control
        self.diffusion = diffusion
        self.semantic_target, self.latent_target = semantic_target, latent_target

    def auxiliary_output_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{"control_map": (C, h, w), "<semantic_target>/main": (L, D_text)}``: the outputs not
        named after a target (the ``controlnet_modulated`` generator reads the control map)."""
        semantic = self.semantic.main
        return {CONTROL_OUTPUT: (self.control.channels, self.control.size, self.control.size),
                self.semantic_target + MAIN_SUFFIX: (semantic.tokens[-1].out_channels,
                                                     semantic.linear.out_features)}

    def export_trained_parts(self, run_dir: str | Path) -> dict[str, str]:
        """With a diffusion term: the trained ControlNet to ``<run_dir>/controlnet/`` as a diffusers
        folder (:meth:`NeuroPictorDiffusionLoss.save_controlnet`), for ``bdf-reconstruct
        generator=controlnet_modulated generator.controlnet=<run_dir>/controlnet``. Written to a
        temporary sibling and renamed (:func:`~braindecode_fw.io.atomic_write_dir`), so a failed
        export leaves no partial folder and an older export stays until the new one is complete.
        Returns ``{"controlnet": <folder>}``; ``{}`` without a diffusion term (``model.diffusion: null``:
        the ControlNet never trained)."""
        if self.diffusion is None:
            return {}
        folder = atomic_write_dir(Path(run_dir) / CONTROLNET_EXPORT, self.diffusion.save_controlnet)
        log.info("NeuroPictor: trained ControlNet exported to %s", folder)
        return {CONTROLNET_EXPORT: str(folder)}

    @property
    def uses_voxel_coordinates(self) -> bool:
        """True: each subject's voxels are placed on the cortical map by their coordinates."""
        return True

    def set_voxel_coordinates(self, subject: str, coordinates: np.ndarray, **kwargs: Any) -> None:
        """``subject``'s voxel -> pixel layout from ``(V, 3)`` voxel indices or ``(V, 2)`` flat-map
        coordinates (:meth:`CorticalProjection.set_coordinates`; ``kwargs``: ``margin``, ``affine``, ``midline``)."""
        self.projection.set_coordinates(subject, coordinates, **kwargs)

    def tokens(self, responses: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        """``(B, V)`` -> the encoder's ``(B, 1 + (H/P)², D)`` tokens."""
        return self.encoder(self.projection(responses, subjects))

    def compute(self, responses, subjects, targets):
        h = self.tokens(responses, subjects)
        clip_txt, condition = self.semantic(h)
        control = self.control(h)
        out = {self.semantic_target: condition, self.semantic_target + MAIN_SUFFIX: clip_txt, CONTROL_OUTPUT: control}
        if targets is not None and self.diffusion is not None:
            if self.latent_target not in targets:
                raise UnknownNameError(f"model.latent_target: the diffusion loss needs the {self.latent_target!r} target "
                               f"(VAE latents); the batch has {sorted(targets)}")
            out[aux_loss_key("diffusion")] = self.diffusion(targets[self.latent_target], condition, control)
        return out

    def configure_from_data(self, datamodule) -> None:
        """Each subject's voxel -> pixel layout from the store's ``geometry.npz`` (``voxel_ijk`` and
        ``affine``, :func:`~braindecode_fw.models.cortical_map.coordinates_from_geometry`), unless it
        was set already (``projection.set_coordinates`` with flat-map coordinates, or a checkpoint)."""
        store = datamodule.store
        if store is None or store.modality != "fmri":
            raise ConfigError(f"model: NeuroPictor needs an fMRI dataset with voxel geometry; "
                             f"{getattr(datamodule, 'store_path', '?')} holds {getattr(store, 'modality', 'no')} data")
        for s in self.projection.subjects:
            if self.projection.is_configured(s):
                continue
            if s not in store.subjects:
                raise UnknownNameError(f"model: subject {s!r} is not in {datamodule.store_path} (it has {sorted(store.subjects)})")
            path = store.subjects[s].directory / "geometry.npz"
            if not path.is_file():
                raise MissingFileError(f"{path}: missing; NeuroPictor's cortical map needs each subject's voxel_ijk "
                                        f"(or set flat-map coordinates with projection.set_coordinates)")
            with np.load(path) as g:
                if "voxel_ijk" not in g:
                    raise UnknownNameError(f"{path}: no voxel_ijk (fMRI voxel indices, (V, 3))")
                ijk, affine = g["voxel_ijk"], (g["affine"] if "affine" in g else None)
            if len(ijk) != self.projection.n_features[s]:
                raise ConfigError(f"{path}: {len(ijk)} voxels in voxel_ijk, the model was built for "
                                 f"{self.projection.n_features[s]}")
            self.projection.set_coordinates(s, ijk, affine=affine)
            log.info("NeuroPictor: %s's %d voxels on %d of %d map pixels", s, len(ijk),
                     int(self.projection.mask[self.projection.subject_index([s])[0]].sum()),
                     math.prod(self.projection.size))


def _shape(target_shapes: Mapping[str, Sequence[int]], name: str, key: str, ndim: int, what: str) -> tuple[int, ...]:
    if name not in target_shapes:
        raise ConfigError(f"{key}: {name!r} is not a target of the run; targets "
                         f"{({k: tuple(v) for k, v in target_shapes.items()})}")
    shape = tuple(int(d) for d in target_shapes[name])
    if len(shape) != ndim:
        raise ConfigError(f"{key}: {name!r} must be {what}, got shape {shape}")
    return shape


def build_neuropictor_decoder(
    n_features: Mapping[str, int],
    target_shapes: Mapping[str, Sequence[int]],
    *,
    map_size: int = 256,
    patch: int = 16,
    dim: int = 1024,
    depth: int = 24,
    heads: int = 16,
    mlp_ratio: float = 4.0,
    fill_radius: float = 0.0,
    semantic_target: str = "clip_text_tokens",
    latent_target: str = "vae_latent",
    text_tokens: int | None = 77,
    control_channels: int = 320,
    control_size: int | None = 64,
    extra_branch: bool = False,
    semantic_mid_tokens: int | None = None,
    control_mid_tokens: int | None = None,
    diffusion: Mapping[str, Any] | None = None,
) -> NeuroPictorDecoder:
    """Hydra entry point (``model=neuropictor``); sizes from the data.

    ``semantic_target`` (a token target ``(L, D_text)``, e.g. final-layer text tokens 77 × 1024) sets
    the semantic mapper's output (``text_tokens``, when given, must match ``L``); ``control_size``
    (None: from ``latent_target``'s ``(4, h, w)``) and ``control_channels`` the control map's.
    ``semantic_mid_tokens`` / ``control_mid_tokens``: the token counts between each mapper's two
    token convolutions; None = the released rules ``N // 2`` and ``2·N`` (128 and 514 at N = 257). With
    ``diffusion`` = ``{model, controlnet?, cond_dropout, uncond?, dtype?, num_train_timesteps?,
    beta_start?, beta_end?, control_scale?}`` (:meth:`NeuroPictorDiffusionLoss.from_pretrained`) the
    decoder adds ``loss/diffusion``; None = no diffusion term (regression only).
    """
    l_text, d_text = _shape(target_shapes, semantic_target, "model.semantic_target", 2, "text tokens (L, D_text)")
    if text_tokens is not None and int(text_tokens) != l_text:
        raise ConfigError(f"model.text_tokens: {text_tokens}, but the target {semantic_target!r} has {l_text} tokens")
    latent = None
    if latent_target in target_shapes:
        latent = _shape(target_shapes, latent_target, "model.latent_target", 3, "VAE latents (4, h, w)")
    if control_size is None:
        if latent is None:
            raise ConfigError(f"model.control_size: null takes the size from model.latent_target={latent_target!r}, "
                             f"which is not a target of the run")
        control_size = latent[1]
    if latent is not None and latent[1:] != (control_size, control_size):
        raise ConfigError(f"model.control_size: {control_size}, but the latents of {latent_target!r} are "
                         f"{latent[1]}×{latent[2]} (the control map is added at latent resolution)")
    projection = CorticalProjection(n_features, map_size, fill_radius=fill_radius)
    encoder = FMRIViTEncoder(map_size, patch, dim, depth, heads, mlp_ratio)
    semantic = SemanticMapper(encoder.n_tokens, dim, l_text, d_text, extra_branch=extra_branch,
                              mid_tokens=semantic_mid_tokens)
    control = ControlMapper(encoder.n_tokens, dim, control_channels, int(control_size), mid_tokens=control_mid_tokens)
    module = None
    if diffusion is not None:
        spec = dict(diffusion)
        if not spec.get("model"):
            raise ConfigError("model.diffusion.model: a Stable Diffusion pipeline (hub id or folder) is required; "
                             "set model.diffusion=null for no diffusion term")
        if latent is None:
            raise ConfigError(f"model.latent_target: the diffusion loss needs {latent_target!r} (VAE latents) "
                             f"among the run's targets; targets {sorted(target_shapes)}")
        module = NeuroPictorDiffusionLoss.from_pretrained(spec.pop("model"), text_tokens=l_text, **spec)
        if module.text_dim != d_text:
            raise ConfigError(f"model.diffusion.model: the UNet's cross_attention_dim is {module.text_dim}, the "
                             f"semantic target {semantic_target!r} has width {d_text}")
        if module.control_channels != control_channels:
            raise ConfigError(f"model.control_channels: {control_channels}, but the ControlNet's first block has "
                             f"{module.control_channels} channels")
        if int(module.unet.config.in_channels) != latent[0]:
            raise ConfigError(f"model.latent_target: {latent_target!r} has {latent[0]} channels, the UNet takes "
                             f"{module.unet.config.in_channels}")
    return NeuroPictorDecoder(projection, encoder, semantic, control, semantic_target=semantic_target,
                              latent_target=latent_target, diffusion=module)
