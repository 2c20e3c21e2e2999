"""The denoising loop the custom-conditioned generators share (unCLIP with an initial image,
Versatile Diffusion dual guidance, ControlNet-style injection).

diffusers pipelines encode their own prompts; brain decoding passes *predicted* embeddings, extra
UNet inputs (control residuals) and optional SDEdit-style starts from a decoded low-level image,
which the stock ``__call__`` signatures do not all accept. This loop reproduces what the pipelines
do (per-sample seeded noise via ``randn_tensor``, ``init_noise_sigma``, ``scale_model_input``,
classifier-free guidance over a stacked ``[unconditional; conditional]`` batch, ``scheduler.step``)
and adds the img2img start of ``StableDiffusionImg2ImgPipeline.get_timesteps``: with
``strength`` s < 1 the loop begins at step ``steps − int(steps·s)`` from the initial latents
noised to that timestep. The tests check it against the pipelines' own loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from braindecode_fw.errors import ConfigError

# model(latent_input (2n or n, c, h, w), t, guided) -> prediction of the same shape; with
# guided=True the batch is [unconditional; conditional] and the model supplies both contexts.
ModelFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def seeded_generators(seeds: Sequence[int], device: str | torch.device) -> list[torch.Generator]:
    """One ``torch.Generator`` per image, so every image depends on its own seed only."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def start_timesteps(scheduler, steps: int, strength: float, device: str | torch.device) -> torch.Tensor:
    """``scheduler.set_timesteps(steps)``, then the last ``int(steps·strength)`` of them (all for
    strength 1), telling multistep schedulers where they begin."""
    if not 0 < strength <= 1:
        raise ConfigError(f"generator.strength: must be in (0, 1], got {strength}")
    scheduler.set_timesteps(steps, device=device)
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise ConfigError(f"generator.strength: {strength} × {steps} steps leaves no denoising step; raise either")
    t_start = steps - kept
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order:]


@torch.no_grad()
def denoise(
    model: ModelFn,
    scheduler,
    *,
    shape: tuple[int, int, int, int],
    generators: list[torch.Generator],
    steps: int,
    guidance_scale: float,
    device: str | torch.device,
    dtype: torch.dtype,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    noise_before: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run the sampler; returns latents ``shape`` = ``(n, c, h, w)``.

    ``init_latents`` (``(n, c, h, w)``, already multiplied by the VAE scaling factor) with
    ``strength`` < 1 gives img2img; without them sampling starts from ``init_noise_sigma``-scaled
    noise. ``noise_before`` runs just before the latent noise is drawn (unCLIP draws its embedding
    noise from the same generators first, as its pipeline does)."""
    from diffusers.utils.torch_utils import randn_tensor

    if noise_before is not None:
        noise_before()
    if init_latents is None or strength >= 1.0:
        timesteps = start_timesteps(scheduler, steps, 1.0, device)
        latents = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
    else:
        timesteps = start_timesteps(scheduler, steps, strength, device)
        noise = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)
        latents = scheduler.add_noise(init_latents.to(device, dtype), noise, timesteps[:1].repeat(shape[0]))
    guided = guidance_scale > 1.0
    for t in timesteps:
        x = torch.cat([latents] * 2) if guided else latents
        x = scheduler.scale_model_input(x, t)
        pred = model(x, t, guided)
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents
