"""``bdf-bench``: throughput and memory of the training pipeline on synthetic worlds.

For each configured world (default and NSD-scale shapes) it measures: data-loader samples/s (the
training loader alone), training samples/s (loader + forward + backward + optimiser step of the
configured decoder), test evaluation time (prediction + retrieval report) and the process's peak
RSS. Results go to ``<output_dir>/benchmarks.json`` and a table in ``<output_dir>/benchmarks.md``
between markers, with machine information. Speed is never asserted in tests.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from braindecode_fw.errors import ConfigError
from braindecode_fw.io import atomic_write_json, atomic_write_text
from braindecode_fw.ops.faults import fault_point

log = logging.getLogger(__name__)
BEGIN, END = "<!-- bdf-bench:begin -->", "<!-- bdf-bench:end -->"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _train_config(world: DictConfig, device: str) -> DictConfig:
    overrides = [f"dataset={world.dataset}", f"model={world.model}", f"data.batch_size={world.batch_size}"]
    overrides += list(world.get("overrides") or [])
    cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        if world.get("n_subjects"):
            cfg.dataset.world.voxels_per_subject = cfg.dataset.world.voxels_per_subject[: world.n_subjects]
            cfg.dataset.name = f"{cfg.dataset.name}_{world.n_subjects}subj"
        cfg.target.device = device
    return cfg


def bench_world(name: str, world: DictConfig, device: str) -> dict[str, Any]:
    from braindecode_fw.data.prepare import ensure_store
    from braindecode_fw.lit import DecoderModule
    from braindecode_fw.pipeline.build import build_datamodule, build_model, count_parameters
    from braindecode_fw.pipeline.evaluation import evaluate_predictions

    cfg = _train_config(world, device)
    L.seed_everything(0, verbose=False)
    t0 = time.perf_counter()
    store = ensure_store(cfg.dataset)
    t_prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    dm = build_datamodule(cfg, store)
    t_setup = time.perf_counter() - t0

    loader = dm.train_dataloader()
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        n += len(batch)
        if i + 1 >= world.loader_batches:
            break
    loader_sps = n / (time.perf_counter() - t0)

    decoder = build_model(cfg, dm.n_features, dm.target_shapes).to(device)
    module = DecoderModule(decoder, loss=instantiate(cfg.loss), target=cfg.target.feature_name,
                           optimizer=instantiate(cfg.optim.optimizer)).to(device).train()
    optimizer = module.configure_optimizers()

    def step(batch) -> None:
        batch.responses = batch.responses.to(device)
        batch.targets = {k: v.to(device) for k, v in batch.targets.items()}
        loss, _, _ = module.objective(module.decoder, batch, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    # model step alone: batches pre-loaded, warm-up steps (allocator, kernels) excluded
    batches = []
    for i, batch in enumerate(loader):
        batches.append(batch)
        if i + 1 >= world.warmup_steps + world.train_steps:
            break
    for batch in batches[: world.warmup_steps]:
        step(batch)
    t0 = time.perf_counter()
    for batch in batches[world.warmup_steps :]:
        step(batch)
    step_sps = sum(len(b) for b in batches[world.warmup_steps :]) / (time.perf_counter() - t0)
    del batches

    # the training loop as bdf-train runs it: loader + step
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        step(batch)
        n += len(batch)
        if i + 1 >= world.train_steps:
            break
    train_sps = n / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    report = evaluate_predictions(cfg, dm, module.decoder)
    t_eval = time.perf_counter() - t0
    assert dm.store is not None
    result = {
        "world": name,
        "dataset": cfg.dataset.name,
        "subjects": len(dm.subjects),
        "voxels": dm.n_features,
        "trials_per_subject": {s: len(dm.store.subjects[s].trials) for s in dm.subjects},
        "test_images": report["rows"][0]["n_test_images"],
        "model": world.model,
        "parameters": count_parameters(decoder)["total"],
        "batch_size": world.batch_size,
        "device": device,
        "prepare_s": round(t_prepare, 2),
        "datamodule_setup_s": round(t_setup, 2),
        "loader_samples_per_s": round(loader_sps, 1),
        "train_step_samples_per_s": round(step_sps, 1),
        "train_samples_per_s": round(train_sps, 1),
        "eval_s": round(t_eval, 4),  # tiny worlds evaluate in milliseconds
        "peak_rss_mb": round(peak_rss_mb(), 0),
    }
    log.info("%s: %s", name, result)
    return result


def render_markdown(results: list[dict[str, Any]], machine: dict[str, Any], command: str) -> str:
    cols = ["world", "subjects", "voxels (min-max)", "trials/subject", "model params", "batch", "device",
            "loader samples/s", "train samples/s", "train step samples/s", "eval s", "peak RSS MB"]
    lines = [BEGIN, "", f"Measured {time.strftime('%Y-%m-%d')} with `{command}` on: {machine['cpu']}, "
             f"{machine['cores']} cores, {machine['ram_gb']} GB RAM, GPU: {machine['gpu'] or 'none'}, "
             f"Python {machine['python']}, torch {machine['torch']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        vox = list(r["voxels"].values())
        trials = list(r["trials_per_subject"].values())
        lines.append("| " + " | ".join(str(x) for x in [
            r["world"], r["subjects"], f"{min(vox)}-{max(vox)}", max(trials), f"{r['parameters'] / 1e6:.1f} M",
            r["batch_size"], r["device"], r["loader_samples_per_s"], r["train_samples_per_s"],
            r["train_step_samples_per_s"], r["eval_s"], r["peak_rss_mb"]]) + " |")
    lines += ["", END]
    return "\n".join(lines)


def bench_evaluation(ev: DictConfig, device: str) -> dict[str, Any]:
    """The image-metric suite on ``n_images`` random 256×256 image pairs with the real
    architectures and feature sizes (random weights), plus the chunked correlation/retrieval at
    NSD sizes (AlexNet features.4 184,512-d; bigG tokens 256×1664 = 425,984-d)."""
    from braindecode_fw.metrics.identification import two_way_identification
    from braindecode_fw.metrics.retrieval import retrieval_accuracy
    from braindecode_fw.metrics.suite import ImageMetricSuite

    metrics_cfg = compose("evaluate", overrides=[f"metrics={ev.metrics}", *(ev.get("overrides") or [])]).metrics
    with open_dict(metrics_cfg):
        metrics_cfg.device = device
    gen = torch.Generator().manual_seed(0)
    n = ev.n_images
    gts = torch.rand(n, 3, 32, 32, generator=gen)
    gts = torch.nn.functional.interpolate(gts, size=(ev.image_size, ev.image_size), mode="bilinear")
    recons = (0.6 * gts + 0.4 * torch.rand(gts.shape, generator=gen)).clamp(0, 1)
    suite = ImageMetricSuite(metrics_cfg)
    t0 = time.perf_counter()
    values = suite(recons, gts)
    total = time.perf_counter() - t0
    del recons, gts
    timings = {k: round(v, 2) for k, v in suite.timings.items()}
    feats = torch.randn(n, ev.identification_dim, generator=gen)
    noisy = feats + torch.randn(feats.shape, generator=gen)
    t0 = time.perf_counter()
    two_way_identification(feats, noisy)
    timings["two_way_identification_only"] = round(time.perf_counter() - t0, 2)
    del feats, noisy
    brain = torch.randn(n, ev.retrieval_dim, generator=gen)
    image = brain + 2 * torch.randn(brain.shape, generator=gen)
    t0 = time.perf_counter()
    retrieval_accuracy(brain, image, subset_size=300, n_subsets=30, seed=42)
    timings["retrieval_30x300"] = round(time.perf_counter() - t0, 2)
    result = {"n_images": n, "image_size": ev.image_size, "metrics_config": ev.metrics, "device": device,
              "metrics": list(values), "suite_total_s": round(total, 1), "timings_s": timings,
              "identification_dim": ev.identification_dim, "retrieval_dim": ev.retrieval_dim,
              "peak_rss_mb": round(peak_rss_mb(), 0)}
    log.info("evaluation: %s", result)
    return result


def render_evaluation_markdown(result: dict[str, Any], machine: dict[str, Any], command: str) -> str:
    t = result["timings_s"]
    feature_rows = [(k.removeprefix("features_"), v) for k, v in t.items() if k.startswith("features_")]
    lines = [BEGIN, "", f"Measured {time.strftime('%Y-%m-%d')} with `{command}` on: {machine['cpu']}, "
             f"{machine['cores']} cores, GPU: {machine['gpu'] or 'none'}, torch {machine['torch']}. "
             f"{result['n_images']} random image pairs at {result['image_size']}×{result['image_size']}, "
             f"metric config `{result['metrics_config']}` (real architectures and feature sizes, random weights), "
             f"device {result['device']}.", "",
             "| step | seconds |", "|---|---|",
             f"| PixCorr (425², {result['n_images']:,} pairs) | {t.get('pixcorr', '—')} |",
             f"| SSIM (425², Gaussian σ 1.5) | {t.get('ssim', '—')} |"]
    lines += [f"| {name}: build + features of both image sets | {t.get('build_' + name, 0)} + {v} |"
              for name, v in feature_rows]
    lines += [f"| two-way identification, {result['n_images']} × {result['identification_dim']:,}-d "
              f"(chunked correlation) | {t['two_way_identification_only']} |",
              f"| retrieval 30 × 300, {result['n_images']} × {result['retrieval_dim']:,}-d | "
              f"{t['retrieval_30x300']} |",
              f"| **whole image-metric suite** | **{result['suite_total_s']}** |",
              "", f"Peak RSS of the benchmark process: {result['peak_rss_mb']:.0f} MB.", "", END]
    return "\n".join(lines)


def _bench_model_case(name: str, case: DictConfig, n_features: dict[str, int], mc: DictConfig,
                      device: str) -> dict[str, Any]:
    from braindecode_fw.contracts import Batch
    from braindecode_fw.lit import DecoderModule

    cfg = compose("train", overrides=[f"model={case.model}", f"loss={case.loss}", *(case.get("overrides") or [])])
    shapes = {k: tuple(int(x) for x in v) for k, v in case.targets.items()}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    decoder = instantiate(cfg.model)(n_features=n_features, target_shapes=shapes).to(device)
    _stand_in_data_configuration(decoder, n_features)
    module = DecoderModule(decoder, loss=instantiate(cfg.loss), target=next(iter(shapes)),
                           optimizer=instantiate(cfg.optim.optimizer)).to(device).train()
    optimizer = module.configure_optimizers()
    b, subjects = mc.batch_size, list(n_features)
    times = (int(mc.n_times),) if mc.get("n_times") else ()  # MEG: (sensors, times) per trial
    batch = Batch(subject=[subjects[i % len(subjects)] for i in range(b)],
                  responses=torch.randn(b, max(n_features.values()), *times, device=device),
                  image_index=torch.arange(b), targets={k: torch.randn(b, *v, device=device) for k, v in shapes.items()})

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, _, _ = module.objective(decoder, batch, 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, optimiser state)
    t0 = time.perf_counter()
    for _ in range(mc.steps):
        step()
    train_sps = mc.steps * b / (time.perf_counter() - t0)
    decoder.eval()
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        decoder(batch.responses, batch.subject)  # warm-up
        t0 = time.perf_counter()
        for _ in range(mc.steps):
            decoder(batch.responses, batch.subject)
        if device == "cuda":
            torch.cuda.synchronize()
    infer_sps = mc.steps * b / (time.perf_counter() - t0)
    return {"case": name, "model": case.model, "params_m": round(sum(p.numel() for p in decoder.parameters()) / 1e6, 1),
            "targets": {k: list(v) for k, v in shapes.items()}, "batch_size": b,
            "samples_per_s": round(train_sps, 2), "inference_samples_per_s": round(infer_sps, 2),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
            "peak_rss_mb": round(peak_rss_mb())}


def _stand_in_data_configuration(decoder, n_features: dict[str, int]) -> None:
    """What ``configure_from_data`` would take from a store, drawn at random (timing only): Brain-IT's
    voxel clusters (stage 0), NeuroPictor's voxel positions (an NSD-sized 81 × 104 × 83 volume)."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    if not decoder.has_clusters():
        decoder.set_clusters({s: torch.randint(0, decoder.n_clusters, (n,), generator=gen)
                              for s, n in n_features.items()})
    if decoder.uses_voxel_coordinates:
        rng = np.random.default_rng(0)
        for s, n in n_features.items():
            flat = rng.choice(81 * 104 * 83, n, replace=False)
            decoder.set_voxel_coordinates(s, np.stack(np.unravel_index(flat, (81, 104, 83)), -1))


def bench_models(mc: DictConfig, device: str) -> dict[str, Any]:
    """Training steps of the method decoders at NSD shapes without a store: random responses with
    each subject's real voxel count, random targets of the real shapes, the method's objective,
    AdamW. Reports parameters, samples/s (forward + backward + optimiser step) and peak memory
    (peak RSS is the process's, so it only grows from case to case)."""
    n_features = {str(k): int(v) for k, v in mc.n_features.items()}
    rows = []
    for name, case in mc.cases.items():
        if case is not None:
            rows.append(_bench_model_case(name, case, n_features, mc, device))
            log.info("models: %s", rows[-1])
    return {"device": device, "n_features": n_features, "n_times": mc.get("n_times"), "rows": rows}


def render_models_markdown(result: dict[str, Any], machine: dict[str, Any], command: str) -> str:
    counts = ", ".join(f"{s} {n:,}" for s, n in result["n_features"].items())
    shape = (f"MEG windows of {result['n_times']} samples, sensors per subject: {counts}" if result.get("n_times")
             else f"subjects with NSD voxel counts ({counts})")
    lines = [BEGIN, "", f"Measured {time.strftime('%Y-%m-%d')} with `{command}` on: {machine['cpu']}, "
             f"{machine['cores']} cores, GPU: {machine['gpu'] or 'none'}, torch {machine['torch']}; device "
             f"{result['device']}; {shape}; random data of the real shapes; one training step = forward + "
             f"backward + the optimiser step; inference = forward without gradients.", "",
             "| case | model | parameters (M) | targets | batch | train samples/s | inference samples/s | "
             "peak GPU MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        targets = ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in r["targets"].items())
        lines.append(f"| {r['case']} | {r['model']} | {r['params_m']:,} | {targets} | {r['batch_size']} | "
                     f"{r['samples_per_s']} | {r.get('inference_samples_per_s', '—')} | "
                     f"{r['peak_gpu_mb'] if r['peak_gpu_mb'] is not None else '—'} | {r['peak_rss_mb']:,} |")
    lines += ["", END]
    return "\n".join(lines)


def _fill_shape(name: str, shape: tuple[int | None, ...] | None, gen, token_lengths: dict[str, int]) -> tuple:
    """A concrete decoder-output shape for a generator's declared need (open sizes filled in)."""
    if shape is None:
        raise ConfigError(f"generation: generator {gen.name} accepts any shape for {name}; nothing to benchmark")
    if len(shape) == 2 and shape[0] is None:
        return (int(token_lengths.get(name, 77)), shape[1])
    if len(shape) == 3 and shape[1] is None:  # low-level latent or image
        side = gen.image_size // gen.vae_scale if shape[0] != 3 else gen.image_size
        return (shape[0], side, side)
    return tuple(shape)


def bench_generation(gc: DictConfig, device: str, cache_dir: Path) -> dict[str, Any]:
    """Seconds per image and peak memory of each configured generator on random decoder outputs of
    the shapes it needs (tokens of ``token_lengths``). Real weights by default (their hub cache or
    local folders); ``tiny`` builds each generator's tiny pipeline instead (CPU smoke numbers)."""
    from braindecode_fw.pipeline.generation import build_generator

    rows = []
    for name, spec in gc.generators.items():
        if spec is None:
            continue
        overrides = [f"generator={name}", f"generator.device={device}", f"generator.batch_size={gc.batch_size}",
                     *(spec.get("overrides") or [])]
        if gc.tiny:
            tiny = ",".join(f"{k}:{v}" for k, v in {"kind": spec.kind, **gc.tiny}.items())
            overrides += [f"generator.build_tiny={{{tiny}}}", f"generator.model={cache_dir}/bench_{name}_{spec.kind}",
                          *(spec.get("tiny_overrides") or [])]
        cfg = compose("reconstruct", overrides=overrides)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        gen = build_generator(cfg.generator)
        load_s = time.perf_counter() - t0
        needs = {**gen.needs(), **gen.optional()}
        gen_rng = torch.Generator().manual_seed(0)
        outputs = {k: torch.randn(gc.batch_size, *_fill_shape(k, v, gen, gc.token_lengths), generator=gen_rng)
                   for k, v in needs.items()}
        gen.reconstruct(outputs, list(range(gc.batch_size)))  # warm-up (kernels, allocator)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in range(gc.timed_batches):
            gen.reconstruct(outputs, [gc.batch_size * (b + 1) + i for i in range(gc.batch_size)])
        if device == "cuda":
            torch.cuda.synchronize()
        per_image = (time.perf_counter() - t0) / (gc.timed_batches * gc.batch_size)
        params = sum(p.numel() for c in gen.pipe.components.values() if isinstance(c, torch.nn.Module)
                     for p in c.parameters())
        rows.append({"generator": name, "class": type(gen).__name__, "model": str(cfg.generator.model),
                     "image_size": gen.image_size, "steps": gen.steps, "guidance_scale": gen.guidance_scale,
                     "dtype": str(gen.dtype).removeprefix("torch."), "params_m": round(params / 1e6, 2),
                     "inputs": {k: list(v.shape[1:]) for k, v in outputs.items()}, "load_s": round(load_s, 2),
                     "s_per_image": round(per_image, 3),
                     "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
                     "peak_rss_mb": round(peak_rss_mb())})
        log.info("generation: %s", rows[-1])
        del gen
    return {"device": device, "batch_size": gc.batch_size, "timed_batches": gc.timed_batches,
            "tiny": OmegaConf.to_container(gc.tiny) if gc.tiny else None, "rows": rows}


def render_generation_markdown(result: dict[str, Any], machine: dict[str, Any], command: str) -> str:
    weights = (f"tiny pipelines built from each config's `build_tiny` ({result['tiny']}), random weights: the "
               f"sampling loop's cost at small size, not the real models'" if result["tiny"] else "real weights")
    lines = [BEGIN, "", f"Measured {time.strftime('%Y-%m-%d')} with `{command}` on: {machine['cpu']}, "
             f"{machine['cores']} cores, GPU: {machine['gpu'] or 'none'}, torch {machine['torch']}; device "
             f"{result['device']}, batch {result['batch_size']}, {weights}.", "",
             "| generator | model | params (M) | dtype | image | steps | inputs | load s | s / image | "
             "peak GPU MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        inputs = ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in r["inputs"].items())
        lines.append(f"| {r['generator']} | `{Path(r['model']).name if result['tiny'] else r['model']}` | "
                     f"{r['params_m']} | {r['dtype']} | {r['image_size']}² | {r['steps']} | {inputs} | {r['load_s']} | "
                     f"{r['s_per_image']} | {r['peak_gpu_mb'] if r['peak_gpu_mb'] is not None else '—'} | "
                     f"{r['peak_rss_mb']} |")
    lines += ["", END]
    return "\n".join(lines)


def bench_demo_training(dc: DictConfig, device: str) -> dict[str, Any]:
    """The embedded tiny generator's UNet training step (``tiny_generator.train_unet`` itself: data
    draw, unCLIP labels, forward, object-weighted Min-SNR loss, backward, AdamW, EMA) at the shipped
    sizes on random latents, once per ``precisions`` entry: seconds per step, and what
    ``projected_steps`` steps would take, on ``device`` (``demo_models.generator.device``)."""
    import dataclasses

    import numpy as np

    from braindecode_fw.demo import tiny_generator

    unknown = [p for p in dc.precisions if p not in tiny_generator.UNET_PRECISIONS]
    if unknown:
        raise ConfigError(f"demo_training.precisions: each one of {list(tiny_generator.UNET_PRECISIONS)}, "
                         f"got {unknown}")
    base = tiny_generator.TinyGeneratorConfig.from_mapping(OmegaConf.to_container(dc.config) if dc.config else {})
    side, dim = base.image_size // 4, tiny_generator.EMBED_DIM
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(dc.n_scenes, 4, side, side, generator=gen)
    embeds = torch.nn.functional.normalize(torch.randn(dc.n_scenes, dim, generator=gen), dim=1)
    boxes = (torch.rand(dc.n_scenes, side, side, generator=gen) < 0.3).float()
    normalizer = tiny_generator.build_normalizer(embeds)
    rows = []
    for precision in dc.precisions:
        cfg = dataclasses.replace(base, unet_precision=precision, log_every=10**9, device=device)
        unet = tiny_generator.build_unet(cfg.image_size, cfg.unet_channels, dim, cfg.unet_time_scale_shift)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm = dataclasses.replace(cfg, unet_steps=2)
        tiny_generator.train_unet(warm, latents, embeds, normalizer, np.random.default_rng(0), unet=unet,
                                  object_boxes=boxes)  # warm-up: oneDNN primitives, allocator
        timed = dataclasses.replace(cfg, unet_steps=dc.steps)
        t0 = time.perf_counter()
        tiny_generator.train_unet(timed, latents, embeds, normalizer, np.random.default_rng(1), unet=unet,
                                  object_boxes=boxes)
        seconds = (time.perf_counter() - t0) / dc.steps
        rows.append({"precision": precision, "batch_size": cfg.unet_batch_size,
                     "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
                     "seconds_per_step": round(seconds, 3),
                     "projected_minutes": round(seconds * dc.projected_steps / 60, 1),
                     "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
                     "peak_rss_mb": round(peak_rss_mb())})
        log.info("demo_training: %s", rows[-1])
    return {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "channels": list(base.unet_channels), "latent": [4, side, side],
            "steps": dc.steps, "projected_steps": dc.projected_steps, "rows": rows}


def render_demo_training_markdown(result: dict[str, Any], machine: dict[str, Any], command: str) -> str:
    lines = [BEGIN, "", f"Measured {time.strftime('%Y-%m-%d')} with `{command}` on: {machine['cpu']}, "
             f"{machine['cores']} cores, GPU: {machine['gpu'] or 'none'}, torch {machine['torch']} "
             f"({machine['torch_threads']} threads); device {result['device']}; the tiny "
             f"generator's UNet (channels {result['channels']}, latents {'×'.join(map(str, result['latent']))}), "
             f"{result['steps']} timed `train_unet` steps after 2 of warm-up, random data.", "",
             "| precision | parameters (M) | batch | s / step | vs 32-true | "
             f"{result['projected_steps']:,} steps (min) | peak GPU MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    ref = next((r["seconds_per_step"] for r in result["rows"] if r["precision"] == "32-true"), None)
    for r in result["rows"]:
        ratio = f"{ref / r['seconds_per_step']:.2f}×" if ref else "—"
        lines.append(f"| {r['precision']} | {r['params_m']} | {r['batch_size']} | {r['seconds_per_step']} | {ratio} | "
                     f"{r['projected_minutes']} | {r.get('peak_gpu_mb') or '—'} | {r['peak_rss_mb']:,} |")
    lines += ["", END]
    return "\n".join(lines)


def _write_section(md: Path, tag: str, section: str) -> None:
    begin, end = BEGIN.replace("begin", f"{tag}-begin"), END.replace("end", f"{tag}-end")
    section = section.replace(BEGIN, begin).replace(END, end)
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(md, text)
    print(section)


def bench(cfg: DictConfig) -> list[dict[str, Any]]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tag = "gpu" if device == "cuda" else "cpu"
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "benchmarks.md"
    machine = machine_info()
    results: list[dict[str, Any]] = []
    if cfg.run_worlds:
        results = [bench_world(name, world, device) for name, world in cfg.worlds.items() if world is not None]
        json_path = out / f"benchmarks_{tag}.json"
        fault_point("bench.json", json_path)
        atomic_write_json(json_path, {"machine": machine, "results": results,
                                      "config": OmegaConf.to_container(cfg.worlds)})
        _write_section(md, tag, render_markdown(results, machine, cfg.command_label))
        print(f"wrote {json_path} and {md}")

    def publish(section: str, result: dict[str, Any], render) -> None:
        """``benchmarks_<section>_<tag>.json`` + the ``<section>-<tag>`` part of benchmarks.md."""
        json_path = out / f"benchmarks_{section}_{tag}.json"
        fault_point("bench.json", json_path)
        atomic_write_json(json_path, {"machine": machine, "result": result})
        _write_section(md, f"{section.replace('_', '-')}-{tag}", render(result, machine, cfg.command_label))
        print(f"wrote {json_path} and {md}")
        results.append(result)

    if cfg.evaluation.enabled:
        publish("evaluation", bench_evaluation(cfg.evaluation, device), render_evaluation_markdown)
    if cfg.models.enabled:
        publish("models", bench_models(cfg.models, device), render_models_markdown)
    if cfg.get("meg") is not None and cfg.meg.enabled:
        publish("meg", bench_models(cfg.meg, device), render_models_markdown)
    if cfg.get("demo_training") is not None and cfg.demo_training.enabled:
        publish("demo_training", bench_demo_training(cfg.demo_training, device), render_demo_training_markdown)
    if cfg.generation.enabled:
        result = bench_generation(cfg.generation, device, Path(cfg.paths.cache_dir) / "generators")
        publish("generation_tiny" if cfg.generation.tiny else "generation", result, render_generation_markdown)
    return results
