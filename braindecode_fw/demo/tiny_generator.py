"""The synthetic world's tiny generator (issue 10): a Stable unCLIP pipeline of the real diffusers
classes (``StableUnCLIPImg2ImgPipeline``: ``AutoencoderKL`` + ``UNet2DConditionModel``), trained on
rendered synthetic scenes and conditioned on the tiny CLIP's image embedding the way Stable unCLIP
is (Ramesh et al. 2022; Stable unCLIP 2.1): the embedding, noise-augmented to a sampled
``noise_level`` by the pipeline's image normaliser and noising scheduler and concatenated with that
level's timestep embedding, is the UNet's class label; a zero label is the unconditional one
(classifier-free guidance, ``condition_dropout`` of the training labels).

Stages (each one a function, run in order by :func:`train`):

1. **VAE**: ``AutoencoderKL`` 64 px -> 4×16×16 (factor 4, SD's latent layout at small size),
   reconstruction MSE + a small KL term; ``scaling_factor`` set to 1/sd of the training latents, as
   SD's 0.18215 was chosen.
2. **UNet**: v-prediction on the scaled latents (SD 2.x's parameterisation), SD's scaled-linear
   β schedule, EMA weights (diffusers' ``EMAModel``) are the ones saved.
3. **Pipeline**: ``save_pretrained`` with ``image_encoder``/``feature_extractor``/text parts absent;
   the reconstructor reads the embedding from the brain decoder, L2-normalised first
   (``condition_norm: 1.0`` in braindecode_fw/conf/generator/tiny.yaml): the generator was trained on unit-norm
   tiny-CLIP embeddings, and a contrastively trained decoder predicts directions, not norms.

VAE and UNet train on ``device`` (the CPU by default, a CUDA GPU with ``cuda``/``auto``; the
shipped generator was trained on one, docs/demo_models.md); the random draws stay on the CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from braindecode_fw.demo.corpus import HELDOUT_STREAM, SCENE_DEFAULTS, TRAIN_STREAM, build_corpus
from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.schema import FROM_YAML, check_keys, config_dataclass, setting

log = logging.getLogger(__name__)

EMBED_DIM = 128
# how the timestep + label embedding enters each residual block (diffusers' resnet_time_scale_shift):
# "default" adds it to the features, "scale_shift" scales and shifts the normalised features by it
# (adaptive group norm, Dhariwal & Nichol 2021 §3)
TIME_SCALE_SHIFTS = ("default", "scale_shift")
# UNet training precision, in Lightning's names: "bf16-mixed" runs the forward pass under bfloat16
# autocast (weights, optimiser state and the loss stay float32); 1.25-1.33x faster per training step
# on a CPU with native bf16 (AVX512-BF16, AMX; docs/benchmarks.md), slower where bf16 is emulated
UNET_PRECISIONS = ("32-true", "bf16-mixed")
# where VAE and UNet train and the card's samples are drawn: "auto" takes a CUDA GPU when there is one.
# Random draws are made on the CPU either way, so a run sees the same batches, timesteps and noise on
# every device (the results differ only by floating-point order).
TRAINING_DEVICES = ("auto", "cpu", "cuda")
# SD's sampling noise schedule (the one braindecode_fw/conf/generator/*.yaml pipelines ship with)
SCHEDULER_KWARGS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


@config_dataclass("demo_models/retrain.yaml", "generator", key="demo_models.generator",
                  also=SCENE_DEFAULTS)
class TinyGeneratorConfig:
    """How the tiny generator is trained: ``generator`` of braindecode_fw/conf/demo_models/retrain.yaml holds
    every default and describes every key; ``image_size`` and ``max_objects`` are the synthetic world's
    (``world`` of braindecode_fw/conf/dataset/synthetic.yaml), as ``bdf-prepare demo_models=retrain`` passes them."""

    seed: int = setting(min=0)
    image_size: int = setting(min=1)
    max_objects: int = setting(min=1)
    n_train_scenes: int = setting(min=1)
    n_heldout_scenes: int = setting(min=1)
    vae_steps: int = setting(min=0)
    vae_batch_size: int = setting(min=1)
    vae_lr: float = setting(gt=0)
    vae_kl_weight: float = setting(min=0)
    unet_steps: int = setting(min=0)
    unet_minutes: float | None = FROM_YAML  # wall-clock budget: the schedule runs on elapsed time, unet_steps caps it
    unet_batch_size: int = setting(min=1)
    unet_lr: float = setting(gt=0)
    unet_channels: tuple[int, ...] = setting(min=1)
    unet_time_scale_shift: str = FROM_YAML  # "scale_shift": the label modulates every block (AdaGN)
    unet_precision: str = FROM_YAML  # bfloat16 autocast forward; "32-true" on CPUs without native bf16
    device: str = FROM_YAML             # auto | cpu | cuda: where VAE and UNet train and the card samples
    condition_dropout: float = setting(min=0, max=1)
    snr_gamma: float | None = setting(gt=0)   # Min-SNR-γ loss weighting (Hang et al. 2023); null = plain MSE
    object_loss_weight: float = FROM_YAML  # latent cells in an object's bounding square weigh 1 + this (0: plain)
    reuse_vae: bool = FROM_YAML         # keep the VAE of the generator already in the output folder
    resume_unet: bool = FROM_YAML       # continue that generator's UNet for unet_steps more (needs reuse_vae)
    max_noise_level: int = setting(min=0)      # training embeddings are noise-augmented to levels in [0, this]
    ema_decay: float = setting(min=0, max=1)
    sample_steps: int = setting(min=1)
    guidance_scale: float = FROM_YAML
    log_every: int = setting(min=1)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> TinyGeneratorConfig:
        check_keys(cls, values, "demo_models.generator: unknown key(s)")
        cfg = cls(**values)
        if cfg.unet_time_scale_shift not in TIME_SCALE_SHIFTS:
            raise ConfigError(f"demo_models.generator.unet_time_scale_shift: one of {list(TIME_SCALE_SHIFTS)}, "
                             f"got {cfg.unet_time_scale_shift!r}")
        if cfg.unet_precision not in UNET_PRECISIONS:
            raise ConfigError(f"demo_models.generator.unet_precision: one of {list(UNET_PRECISIONS)}, "
                             f"got {cfg.unet_precision!r}")
        if cfg.device not in TRAINING_DEVICES:
            raise ConfigError(f"demo_models.generator.device: one of {list(TRAINING_DEVICES)}, got {cfg.device!r}")
        if cfg.object_loss_weight < 0:
            raise ConfigError(f"demo_models.generator.object_loss_weight: must be >= 0 (0 = every latent cell "
                             f"weighs the same), got {cfg.object_loss_weight}")
        if cfg.unet_minutes is not None and cfg.unet_minutes <= 0:
            raise ConfigError(f"demo_models.generator.unet_minutes: a positive budget in minutes or null (train "
                             f"unet_steps steps), got {cfg.unet_minutes}")
        if cfg.resume_unet and not cfg.reuse_vae:
            raise ConfigError("demo_models.generator.resume_unet: true needs reuse_vae: true (the saved UNet "
                             "denoises that VAE's latents)")
        return cfg


def training_device(cfg: TinyGeneratorConfig) -> torch.device:
    """``cfg.device`` resolved: "auto" is CUDA when available, else the CPU; "cuda" without a GPU is
    refused rather than silently run on the CPU (hours instead of minutes)."""
    from braindecode_fw.generation.diffusion import resolve_device

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("demo_models.generator.device: cuda was asked for, but torch sees no CUDA GPU "
                           "(use cpu or auto)")
    return torch.device(resolve_device(cfg.device))


def build_vae(image_size: int = 64):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=image_size)


def build_unet(image_size: int = 64, channels: tuple[int, ...] = (64, 128), embed_dim: int = EMBED_DIM,
               time_scale_shift: str = "default"):
    """A class-conditioned UNet on 16×16 latents: residual blocks, self-attention at the lower
    level and in the middle, the unCLIP label ([embedding, noise-level embedding], 2·``embed_dim``)
    projected into the timestep embedding, which enters every residual block as ``time_scale_shift``
    says (:data:`TIME_SCALE_SHIFTS`). No cross-attention: the tiny generator has no text
    context (the reconstructor's context tensor is ignored)."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), mid_block_type="UNetMidBlock2D",
        attention_head_dim=32, norm_num_groups=32, cross_attention_dim=embed_dim,
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * embed_dim,
        resnet_time_scale_shift=time_scale_shift)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, h, w, 3)`` -> float ``(n, 3, h, w)`` in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def unclip_class_labels(normalizer, noising_scheduler, embeds: torch.Tensor, levels: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
    """Stable unCLIP's UNet class label with a noise level per row: ``embeds`` ``(n, d)`` scaled by
    the image normaliser, noised to ``levels`` ``(n,)`` by the noising scheduler, unscaled, then
    concatenated with the sinusoidal embedding of the level -> ``(n, 2d)``. For a constant level
    this is ``StableUnCLIPImg2ImgPipeline.noise_image_embeddings`` (tested)."""
    from diffusers.models.embeddings import get_timestep_embedding

    x = normalizer.unscale(noising_scheduler.add_noise(normalizer.scale(embeds), noise, levels))
    t = get_timestep_embedding(levels, embeds.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([x, t.to(x.dtype)], dim=1)


def _cosine_lr(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _budgeted_cosine_lr(step: int, progress: float, lr: float, warmup: int = 50) -> float:
    """The cosine schedule over a wall-clock budget (budgeted training, Li et al. 2020): the same
    linear warm-up in steps, then the cosine of the elapsed fraction ``progress`` of the budget."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_vae(cfg: TinyGeneratorConfig, images: np.ndarray, rng: np.random.Generator) -> tuple[Any, list[dict]]:
    """Stage 1: the autoencoder, then its scaling factor. Returns (vae, loss curve)."""
    torch.manual_seed(cfg.seed)
    device = training_device(cfg)
    vae = build_vae(cfg.image_size).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    curve = []
    vae.train()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr)
        x = to_model_range(images[rng.choice(len(images), cfg.vae_batch_size, replace=False)]).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            curve.append({"step": step, "mse": mse.item()})
            log.info("tiny generator VAE step %d/%d mse %.4f", step, cfg.vae_steps, mse.item())
    vae.eval()
    with torch.no_grad():
        probe = to_model_range(images[:1024]).to(device)
        latents = torch.cat([vae.encode(probe[i:i + 256]).latent_dist.mode() for i in range(0, len(probe), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae.cpu().requires_grad_(False), curve


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 images -> scaled latent means ``(n, 4, h/4, w/4)`` (the UNet's training data), on the
    VAE's device."""
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(to_model_range(images[i:i + batch_size]).to(device)).latent_dist.mode()
                      for i in range(0, len(images), batch_size)]) * vae.config.scaling_factor


def build_normalizer(embeds: torch.Tensor):
    """Stable unCLIP's ``StableUnCLIPImageNormalizer`` holding the training embeddings' mean/sd."""
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embeds.shape[1])
    with torch.no_grad():
        normalizer.mean.copy_(embeds.mean(0, keepdim=True))
        normalizer.std.copy_(embeds.std(0, keepdim=True))
    return normalizer


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, cell_weights: torch.Tensor | None) -> torch.Tensor:
    """Per-sample squared error of ``(n, c, h, w)`` predictions: the mean over channels, then the
    ``cell_weights``-weighted mean over the ``(n, h, w)`` cells (None: the plain mean) -> ``(n,)``."""
    err = (pred.float() - target.float()).pow(2).mean(dim=1)
    if cell_weights is None:
        return err.mean(dim=(1, 2))
    return (err * cell_weights).sum(dim=(1, 2)) / cell_weights.sum(dim=(1, 2))


def train_unet(cfg: TinyGeneratorConfig, latents: torch.Tensor, embeds: torch.Tensor, normalizer,
               rng: np.random.Generator, *, unet=None, first_step: int = 0,
               object_boxes: torch.Tensor | None = None) -> tuple[Any, list[dict]]:
    """Stage 2: the class-conditioned UNet (v-prediction, EMA). ``latents`` ``(n, 4, 16, 16)``
    scaled; ``embeds`` ``(n, d)`` unit-norm tiny-CLIP image embeddings; ``unet``: continue this
    one (``resume_unet``; its curve's steps then count on from ``first_step``) instead of a new
    one. ``object_boxes`` ``(n, 16, 16)`` (:meth:`SceneCorpus.object_boxes` on the latent grid)
    with ``object_loss_weight`` > 0: the cells around objects weigh ``1 + object_loss_weight``,
    so that the loss is not spent on background texture alone (the scenes' shape is a small part
    of their pixels). Trains on ``training_device(cfg)``; the random draws are made on the CPU.
    With ``unet_minutes`` the cosine schedule runs on elapsed time and the loop ends when the budget
    is spent (at most ``unet_steps``); the curve's last point is the last step done. Returns (EMA
    UNet on the CPU, curve)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    torch.manual_seed(cfg.seed + 1 + first_step)
    device = training_device(cfg)
    if unet is None:
        unet = build_unet(cfg.image_size, cfg.unet_channels, embeds.shape[1], cfg.unet_time_scale_shift)
    unet = unet.to(device).requires_grad_(True)  # before the EMA copies the parameters
    latents, embeds = latents.to(device), embeds.to(device)
    normalizer = copy.deepcopy(normalizer).to(device)
    if object_boxes is not None:
        object_boxes = object_boxes.to(device)
    # foreach: one fused update for all parameters, not ~300 small ones (the GPU step is launch-bound)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
    train_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_KWARGS.items() if k not in ("set_alpha_to_one",
                                                                                            "steps_offset")})
    noising = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + 2 + first_step)  # a resumed run draws new noise
    curve = []
    unet.train()
    budget_s = None if cfg.unet_minutes is None else 60.0 * cfg.unet_minutes
    started = time.perf_counter()
    for step in range(cfg.unet_steps):
        if budget_s is None:
            lr = _cosine_lr(step, cfg.unet_steps, cfg.unet_lr)
        else:
            progress = (time.perf_counter() - started) / budget_s
            if progress >= 1.0 and step > 0:
                break
            lr = _budgeted_cosine_lr(step, progress, cfg.unet_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.choice(len(latents), cfg.unet_batch_size, replace=False)).to(device)
        x0, emb = latents[idx], embeds[idx]
        n = len(idx)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (n,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        xt = train_sched.add_noise(x0, noise, t)
        target = train_sched.get_velocity(x0, noise, t)
        # noise augmentation: half the labels clean, half at a level drawn up to max_noise_level
        levels = torch.randint(0, cfg.max_noise_level + 1, (n,), generator=gen)
        levels = torch.where(torch.rand(n, generator=gen) < 0.5, torch.zeros_like(levels), levels).to(device)
        with torch.no_grad():
            labels = unclip_class_labels(normalizer, noising, emb, levels,
                                         torch.randn(emb.shape, generator=gen).to(device))
            labels[(torch.rand(n, generator=gen) < cfg.condition_dropout).to(device)] = 0  # the unconditional label
        context = torch.zeros(n, 1, emb.shape[1], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.unet_precision == "bf16-mixed"):
            pred = unet(xt, t, encoder_hidden_states=context, class_labels=labels).sample
        per_sample = weighted_mse(pred, target, None if object_boxes is None
                                  else 1 + cfg.object_loss_weight * object_boxes[idx])
        if cfg.snr_gamma is None:
            loss = per_sample.mean()
        else:  # Min-SNR-γ for v-prediction: min(SNR, γ) / (SNR + 1) per sample
            snr = compute_snr(train_sched, t)
            loss = (per_sample * torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        last_step = first_step + step
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            curve.append({"step": first_step + step, "loss": loss.item()})
            log.info("tiny generator UNet step %d/%d loss %.4f", first_step + step, first_step + cfg.unet_steps,
                     loss.item())
    if curve[-1]["step"] != last_step:  # a spent budget ended the loop between two log points
        curve.append({"step": last_step, "loss": loss.item()})
    ema.copy_to(unet.parameters())
    return unet.cpu().eval().requires_grad_(False), curve


def assemble_pipeline(vae, unet, normalizer):
    """The ``StableUnCLIPImg2ImgPipeline`` of the trained parts (no image encoder or text tower:
    embeddings come from the brain decoder) with a DDIM sampler."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline

    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=None, image_encoder=None, image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=None,
        text_encoder=None, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_KWARGS), vae=vae)


def load_vae(folder: str | Path) -> tuple[Any, list[dict], float]:
    """A trained VAE from a saved generator folder (``reuse_vae``): (vae, its loss curve, seconds)."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not (folder / "vae" / "config.json").is_file():
        raise MissingFileError(f"demo_models.generator.reuse_vae: no saved generator with a VAE in {folder}; "
                                f"train one first (reuse_vae: false)")
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    record = _saved_record(folder)
    return vae, record.get("vae_curve", []), float(record.get("vae_seconds", 0.0))


def load_unet(folder: str | Path, cfg: TinyGeneratorConfig) -> tuple[Any, dict[str, Any]]:
    """The UNet of a saved generator folder to continue (``resume_unet``) and that folder's training
    record. Its architecture must be the configured one: resuming continues a run, it does not
    convert one."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    if not (folder / "unet" / "config.json").is_file():
        raise MissingFileError(f"demo_models.generator.resume_unet: no saved generator with a UNet in {folder}; "
                                f"train one first (resume_unet: false)")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    saved = tuple(unet.config.block_out_channels)
    if saved != tuple(cfg.unet_channels):
        raise ConfigError(f"demo_models.generator.resume_unet: the UNet in {folder} has channels {list(saved)}, "
                         f"the config asks for unet_channels {list(cfg.unet_channels)}")
    saved_shift = unet.config.resnet_time_scale_shift
    if saved_shift != cfg.unet_time_scale_shift:
        raise ConfigError(f"demo_models.generator.resume_unet: the UNet in {folder} has time_scale_shift "
                         f"{saved_shift!r}, the config asks for unet_time_scale_shift {cfg.unet_time_scale_shift!r}")
    return unet, _saved_record(folder)


def _saved_record(folder: Path) -> dict[str, Any]:
    path = folder / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def train(cfg: TinyGeneratorConfig, clip_folder: str | Path, *, vae_from: str | Path | None = None,
          unet_from: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Train VAE and UNet on ``cfg.n_train_scenes`` scenes conditioned on the tiny CLIP from
    ``clip_folder`` (``vae_from``: reuse the VAE of that saved generator instead; ``unet_from``:
    continue that saved generator's UNet for ``cfg.unet_steps`` more steps). Returns (pipeline,
    record); a resumed record keeps the earlier runs' curve and seconds."""
    from braindecode_fw.demo import tiny_clip

    start = time.perf_counter()
    corpus = build_corpus(cfg.n_train_scenes, seed=cfg.seed, stream=TRAIN_STREAM + 1, image_size=cfg.image_size,
                          max_objects=cfg.max_objects)
    rng = np.random.default_rng([cfg.seed, 11])
    clip = tiny_clip.load(clip_folder)
    embeds = tiny_clip.encode_images(clip, corpus.images)
    if vae_from is not None:
        vae, vae_curve, vae_seconds = load_vae(vae_from)
    else:
        vae, vae_curve = train_vae(cfg, corpus.images, rng)
        vae_seconds = time.perf_counter() - start
    device = training_device(cfg)
    latents = encode_latents(vae.to(device), corpus.images).cpu()
    vae.cpu()
    normalizer = build_normalizer(embeds)
    side = latents.shape[-1]
    # one latent cell of margin: a shape is told by the boundary, both sides of it
    boxes = torch.from_numpy(corpus.object_boxes(side, margin=1 / side)) if cfg.object_loss_weight > 0 else None
    earlier: dict[str, Any] = {}
    if unet_from is not None:
        unet, earlier = load_unet(unet_from, cfg)
        first_step = int(earlier.get("unet_total_steps", earlier.get("config", {}).get("unet_steps", 0)))
        unet, unet_curve = train_unet(cfg, latents, embeds, normalizer, rng, unet=unet, first_step=first_step,
                                      object_boxes=boxes)
    else:
        first_step = 0
        unet, unet_curve = train_unet(cfg, latents, embeds, normalizer, rng, object_boxes=boxes)
    steps_done = unet_curve[-1]["step"] + 1 - first_step  # with unet_minutes, fewer than unet_steps
    unet_curve = list(earlier.get("unet_curve", [])) + unet_curve
    pipe = assemble_pipeline(vae, unet, normalizer)
    seconds = round(time.perf_counter() - start, 1)
    segment = {"steps": steps_done, "minutes": cfg.unet_minutes, "batch_size": cfg.unet_batch_size, "lr": cfg.unet_lr, "snr_gamma": cfg.snr_gamma,
               "object_loss_weight": cfg.object_loss_weight, "precision": cfg.unet_precision, "device": device.type, "seconds": seconds}
    record = {"config": asdict(cfg), "train_seconds": seconds,
              "unet_total_steps": first_step + steps_done,
              # every run that made the UNet, in order (a resumed run appends its own)
              "unet_segments": list(earlier.get("unet_segments", [])) + [segment],
              "unet_resumed_from_step": first_step if unet_from is not None else None,
              "earlier_train_seconds": (round(float(earlier.get("train_seconds", 0))
                                              + float(earlier.get("earlier_train_seconds") or 0), 1)
                                        if unet_from is not None else None),
              "vae_seconds": round(vae_seconds, 1), "torch_threads": torch.get_num_threads(),
              "device": device.type,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "n_train_scenes": len(corpus), "vae_curve": vae_curve, "unet_curve": unet_curve,
              "vae_scaling_factor": vae.config.scaling_factor,
              "n_parameters": {"vae": sum(p.numel() for p in vae.parameters()),
                               "unet": sum(p.numel() for p in unet.parameters())},
              # folder names, not machine paths: the record ships with the model
              "clip": Path(clip_folder).name, "vae_from": None if vae_from is None else Path(vae_from).name}
    return pipe, record


def heldout_corpus(cfg: TinyGeneratorConfig):
    return build_corpus(cfg.n_heldout_scenes, seed=cfg.seed, stream=HELDOUT_STREAM + 1, image_size=cfg.image_size,
                        max_objects=cfg.max_objects)


def save(pipe, record: dict[str, Any], folder: str | Path, *, grids: dict[str, np.ndarray] | None = None) -> Path:
    """``save_pretrained`` (float16 safetensors) + ``training.json`` + ``MODEL_CARD.md`` (+ the
    evaluation's grids as ``<name>.png``) into ``folder``, atomically."""
    from braindecode_fw.demo.publish import publish_folder
    from braindecode_fw.viz.grids import save_png

    def write(tmp: Path) -> None:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
        drop_machine_paths(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
        (tmp / "MODEL_CARD.md").write_text(model_card(record))
        for name, image in (grids or {}).items():
            save_png(image, tmp / f"{name}.png")

    return publish_folder(folder, write)


def drop_machine_paths(folder: Path) -> None:
    """Remove diffusers' ``_name_or_path`` (the folder a component was loaded from, e.g. when resumed)
    from the saved component configs: the folder ships with the package and is loaded from elsewhere."""
    for path in Path(folder).glob("*/config.json"):
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_card(record: dict[str, Any]) -> str:
    cfg = record["config"]
    m = record.get("metrics", {})
    gamma = cfg.get("snr_gamma")
    weighting = "v-prediction" + ("" if gamma is None else f" with Min-SNR-γ {gamma} weighting")
    if cfg.get("object_loss_weight"):
        weighting += f", latent cells around objects weighted {1 + cfg['object_loss_weight']:g}×"
    if cfg.get("unet_time_scale_shift", "default") != "default":
        weighting += f", {cfg['unet_time_scale_shift']} blocks"
    if cfg.get("unet_precision", "32-true") != "32-true":
        weighting += f", {cfg['unet_precision']} precision"
    vae_note = f" (reused from {record['vae_from']})" if record.get("vae_from") else ""
    lines = [
        "# Tiny generator for the synthetic world", "",
        "A Stable unCLIP pipeline (`StableUnCLIPImg2ImgPipeline`: `AutoencoderKL` + class-conditioned "
        "`UNet2DConditionModel`, DDIM) trained on procedural synthetic-world scenes by `bdf-prepare "
        "demo_models=retrain` (`braindecode_fw/demo/tiny_generator.py`), conditioned on the tiny CLIP's "
        "unit-norm image embedding (`../tiny_clip`). It is the default `generator=tiny` of the synthetic "
        "world and loads through the same `load_pipeline` as `stabilityai/stable-diffusion-2-1-unclip`.", "",
        "## Training",
        f"- data: {record['n_train_scenes']:,} rendered scenes (seed {cfg['seed']}, 1–{cfg['max_objects']} objects, "
        f"{cfg['image_size']} px), their tiny-CLIP embeddings",
        f"- VAE: {record['n_parameters']['vae'] / 1e6:.2f} M parameters, 64 px -> 4×16×16, {cfg['vae_steps']} steps of "
        f"batch {cfg['vae_batch_size']}, MSE + {cfg['vae_kl_weight']}·KL, scaling factor "
        f"{record['vae_scaling_factor']:.4f}; final MSE {record['vae_curve'][-1]['mse']:.4f} (images in [-1, 1]){vae_note}",
        f"- UNet: {record['n_parameters']['unet'] / 1e6:.2f} M parameters, channels {list(cfg['unet_channels'])}, "
        f"{weighting}, {_unet_steps(record)} of batch {cfg['unet_batch_size']}, AdamW {cfg['unet_lr']}, EMA "
        f"{cfg['ema_decay']}, label dropout {cfg['condition_dropout']}, embedding noise augmentation up to level "
        f"{cfg['max_noise_level']}; final loss {record['unet_curve'][-1]['loss']:.4f}",
        f"- {record['train_seconds']:.0f} s on {_where(record)} "
        + (f"(the reused VAE took {record['vae_seconds']:.0f} s before)" if record.get("vae_from")
           else f"(VAE {record['vae_seconds']:.0f} s of it)")
        + (f"; the earlier UNet steps took {record['earlier_train_seconds']:.0f} s"
           if record.get("unet_resumed_from_step") else ""), "",
    ]
    if m:
        lines += [
            f"## Held-out evaluation ({m['n_heldout']} unseen scenes; {m['sample_steps']} DDIM steps, guidance "
            f"{m['guidance_scale']}, noise level 0)", "",
            "| measure | samples | ground-truth images | chance |", "|---|---|---|---|",
            f"| two-way identification (tiny CLIP) | {m['two_way_clip']:.3f} | 1.000 | 0.500 |",
            f"| category match (classifier; one-object scenes) | {m['category_accuracy']:.3f} | "
            f"{m['category_accuracy_real']:.3f} | {m['category_chance']:.3f} |",
            f"| colour match (classifier; one-object scenes) | {m['colour_accuracy']:.3f} | "
            f"{m['colour_accuracy_real']:.3f} | {m['colour_chance']:.3f} |",
            f"| predicted category among the scene's (all scenes) | {m['category_in_scene']:.3f} | "
            f"{m['category_in_scene_real']:.3f} | — |",
            f"| VAE round-trip PixCorr | — | {m['vae_pixcorr']:.3f} | — |", "",
            f"The classifier is a small CNN trained on {m['classifier_train_scenes']:,} other rendered scenes "
            f"(`braindecode_fw/demo/scene_classifier.py`); the ground-truth column is its accuracy on the "
            "held-out images themselves.", "",
            "Grids: `samples_conditional.png` (ground truth | sample from its embedding), "
            "`samples_unconditional.png` (zero label).",
        ]
    return "\n".join(lines) + "\n"


def _where(record: dict[str, Any]) -> str:
    if record.get("device") == "cuda":
        return f"one {record.get('gpu') or 'CUDA GPU'} ({record['torch_threads']} CPU threads for the data)"
    return f"{record['torch_threads']} CPU threads"


def _segment_setting(segment: dict[str, Any]) -> str:
    """A run's precision, device and budget, e.g. ``" (bf16-mixed, cuda, a 3-minute budget)"``; empty
    for records older than these fields."""
    setting = [segment[k] for k in ("precision", "device") if segment.get(k)]
    if segment.get("minutes"):
        setting.append(f"a {segment['minutes']:g}-minute budget")
    return f" ({', '.join(setting)})" if setting else ""


def _unet_steps(record: dict[str, Any]) -> str:
    before = record.get("unet_resumed_from_step")
    steps = record.get("unet_total_steps", record["config"]["unet_steps"]) - (before or 0)
    if not before:
        minutes = record["config"].get("unet_minutes")
        return f"{steps} steps" + (f" (a {minutes:g}-minute budget)" if minutes else "")
    segments = record.get("unet_segments", [])
    if len(segments) > 1 and sum(s["steps"] for s in segments) == before + steps:
        parts = [f"{s['steps']} at lr {s['lr']}" + (f" with object weight {s['object_loss_weight']}"
                                                     if s.get("object_loss_weight") else "") + _segment_setting(s)
                 for s in segments]
        return f"{before + steps} steps in {len(segments)} runs, each a fresh cosine schedule: {'; '.join(parts)}"
    return f"{before + steps} steps ({before}, then {steps} resumed with a fresh cosine schedule)"
