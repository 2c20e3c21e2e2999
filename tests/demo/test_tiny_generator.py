"""The tiny generator: its unCLIP label equals the pipeline's, a few training steps of each stage,
the saved folder loads through the generators' one loader, and the shipped model is what its card
says and draws the scene it is given."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from braindecode_fw.demo import generator_eval, retrain, tiny_clip, tiny_generator
from braindecode_fw.demo.corpus import build_corpus

SHIPPED = retrain.package_weights_dir()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random tiny CLIP of the shipped architecture at 32 px, saved the shipped way."""
    from tests.demo.test_corpus_and_clip import _tiny_clip_config

    cfg = _tiny_clip_config(steps=1)
    model, record = tiny_clip.train(cfg, progress=False)
    return tiny_clip.save(model, record, tmp_path_factory.mktemp("demo") / "clip")


def test_label_with_per_row_levels_equals_the_pipelines():
    torch.manual_seed(0)
    embeds = torch.randn(64, 16)
    pipe = tiny_generator.assemble_pipeline(tiny_generator.build_vae(32), tiny_generator.build_unet(32, (32, 32), 16),
                                            tiny_generator.build_normalizer(embeds))
    e, noise = torch.randn(3, 16), torch.randn(3, 16)
    for level in (0, 50, 299):
        expected = pipe.noise_image_embeddings(e, level, noise=noise)
        got = tiny_generator.unclip_class_labels(pipe.image_normalizer, pipe.image_noising_scheduler, e,
                                                 torch.full((3,), level), noise)
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(pipe.image_normalizer.mean[0], embeds.mean(0))
    mixed = tiny_generator.unclip_class_labels(pipe.image_normalizer, pipe.image_noising_scheduler, e,
                                               torch.tensor([0, 50, 299]), noise)
    torch.testing.assert_close(mixed[1], pipe.noise_image_embeddings(e, 50, noise=noise)[1])


def test_generator_trains_saves_and_reconstructs_through_the_loader(tmp_path, clip_folder):
    torch.set_num_threads(2)
    cfg = tiny_generator.TinyGeneratorConfig.from_mapping({
        "image_size": 32, "n_train_scenes": 96, "n_heldout_scenes": 6, "vae_steps": 25, "vae_batch_size": 16,
        "unet_steps": 4, "unet_batch_size": 8, "unet_channels": [32, 32], "log_every": 5, "sample_steps": 2})
    pipe, record = tiny_generator.train(cfg, clip_folder)
    mse = [p["mse"] for p in record["vae_curve"]]
    assert mse[-1] < mse[0]
    folder = tiny_generator.save(pipe, record, tmp_path / "gen")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableUnCLIPImg2ImgPipeline" and index["image_encoder"] == [None, None]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert record["vae_scaling_factor"] == pytest.approx(
        json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"])

    gen = generator_eval.reconstructor(folder, steps=2, guidance_scale=3.0)
    emb = torch.randn(3, 32)
    a = gen.reconstruct({"tiny_clip_image": emb}, [0, 1, 2])["final"]
    b = gen.reconstruct({"tiny_clip_image": 7.0 * emb}, [0, 1, 2])["final"]
    assert a.shape == (3, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b)  # condition_norm: only the direction of the prediction matters
    gen.check({"tiny_clip_image": (32,)})
    with pytest.raises(ValueError, match=r"needs tiny_clip_image \(32-d\)"):
        gen.check({"clip_image_tokens": (16, 32)})

    # UNet-only retraining keeps the saved VAE (reuse_vae)
    again, again_record = tiny_generator.train(cfg, clip_folder, vae_from=folder)
    assert again_record["vae_from"] == folder.name and again_record["vae_curve"] == record["vae_curve"]
    for (k, a), (_, b) in zip(pipe.vae.state_dict().items(), again.vae.state_dict().items(), strict=True):
        torch.testing.assert_close(a.half().float(), b, msg=k)  # saved in float16
    with pytest.raises(FileNotFoundError, match="reuse_vae: no saved generator with a VAE in"):
        tiny_generator.load_vae(tmp_path)

    # resume_unet continues the saved UNet: it starts from the saved weights, steps count on, and the
    # record keeps the earlier curve and time
    resumed_cfg = tiny_generator.TinyGeneratorConfig.from_mapping({**cfg.__dict__, "unet_steps": 2, "log_every": 1,
                                                                  "reuse_vae": True, "resume_unet": True})
    start_unet, _ = tiny_generator.load_unet(folder, resumed_cfg)
    resumed, resumed_record = tiny_generator.train(resumed_cfg, clip_folder, vae_from=folder, unet_from=folder)
    assert resumed_record["unet_total_steps"] == 6 and resumed_record["unet_resumed_from_step"] == 4
    assert [p["step"] for p in resumed_record["unet_curve"]] == [p["step"] for p in record["unet_curve"]] + [4, 5]
    assert resumed_record["earlier_train_seconds"] == pytest.approx(record["train_seconds"])
    moved = [float((a.detach() - b).abs().max()) for a, b in zip(start_unet.parameters(), resumed.unet.parameters(),
                                                         strict=True)]
    assert 0 < max(moved) < 0.1  # two small steps away from the saved weights, not a fresh network
    # every run is listed in the record and on the card (a record from before the list: the total)
    assert [run["steps"] for run in resumed_record["unet_segments"]] == [4, 2]
    assert ("6 steps in 2 runs, each a fresh cosine schedule: 4 at lr 0.001 with object weight 4.0 (bf16-mixed, "
            "cpu); 2 at lr 0.001 with object weight 4.0 (bf16-mixed, cpu)" in tiny_generator.model_card(resumed_record))
    budgeted = {**resumed_record, "unet_segments": [{**resumed_record["unet_segments"][0], "minutes": 3.0},
                                                    resumed_record["unet_segments"][1]]}
    assert "4 at lr 0.001 with object weight 4.0 (bf16-mixed, cpu, a 3-minute budget)" in tiny_generator.model_card(budgeted)
    unlisted = {k: v for k, v in resumed_record.items() if k != "unet_segments"}
    assert "6 steps (4, then 2 resumed" in tiny_generator.model_card(unlisted)
    saved = tiny_generator.save(resumed, resumed_record, tmp_path / "resumed")
    assert all("_name_or_path" not in json.loads(c.read_text()) for c in saved.glob("*/config.json"))
    with pytest.raises(ValueError, match="resume_unet: true needs reuse_vae: true"):
        tiny_generator.TinyGeneratorConfig.from_mapping({"resume_unet": True})
    with pytest.raises(ValueError, match=r"has channels \[32, 32\], the config asks for unet_channels \[64, 128\]"):
        tiny_generator.load_unet(folder, tiny_generator.TinyGeneratorConfig())
    with pytest.raises(FileNotFoundError, match="resume_unet: no saved generator with a UNet in"):
        tiny_generator.load_unet(tmp_path, resumed_cfg)

    heldout = build_corpus(6, seed=0, stream=5, image_size=32)
    metrics, grids = generator_eval.evaluate(folder, tiny_clip.load(clip_folder), heldout,
                                             build_corpus(64, seed=0, stream=6, image_size=32), steps=2, n_grid=4,
                                             classifier_steps=10)
    for key in ("two_way_clip", "category_accuracy", "colour_accuracy", "pixcorr", "vae_pixcorr"):
        assert np.isfinite(metrics[key]), key
    assert grids["samples_conditional"].shape[2] == 3 and grids["samples_unconditional"].dtype == np.uint8


def test_weighted_mse_matches_a_direct_computation():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(tiny_generator.weighted_mse(pred, target, None),
                               torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)))
    weights = 1 + 4 * (torch.rand(3, 5, 5) > 0.5).float()
    p, t, w = pred.double().numpy(), target.double().numpy(), weights.double().numpy()
    expected = [sum(w[i, y, x] * ((p[i, :, y, x] - t[i, :, y, x]) ** 2).mean() for y in range(5) for x in range(5))
                / w[i].sum() for i in range(3)]
    np.testing.assert_allclose(tiny_generator.weighted_mse(pred, target, weights).numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="object_loss_weight: must be >= 0"):
        tiny_generator.TinyGeneratorConfig.from_mapping({"object_loss_weight": -1.0})


def test_time_scale_shift_makes_the_label_scale_and_shift_every_block(tmp_path):
    """``unet_time_scale_shift: scale_shift`` (AdaGN): each residual block's embedding projection
    gives a scale and a shift per channel (twice the outputs), and at zero projection weights and
    bias the block equals its plain-norm path; a saved UNet resumes only under its own setting."""
    plain = tiny_generator.build_unet(32, (32, 32), 16)
    adagn = tiny_generator.build_unet(32, (32, 32), 16, "scale_shift")
    block_plain, block_adagn = plain.down_blocks[0].resnets[0], adagn.down_blocks[0].resnets[0]
    assert block_plain.time_emb_proj.out_features == 32 and block_adagn.time_emb_proj.out_features == 64
    # reference: norm2(h)·(1 + scale) + shift with (scale, shift) = chunks of the projected embedding
    torch.manual_seed(0)
    h, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    captured = {}
    block_adagn.norm2.register_forward_hook(lambda m, i, o: captured.setdefault("norm", o))
    block_adagn.nonlinearity.register_forward_hook(lambda m, i, o: captured.setdefault("act", []).append((i[0], o)))
    block_adagn.eval()(h, temb)
    scale, shift = block_adagn.time_emb_proj(block_adagn.nonlinearity(temb))[:, :, None, None].chunk(2, dim=1)
    expected = captured["norm"] * (1 + scale) + shift
    assert any(inp.shape == expected.shape and torch.allclose(inp, expected, atol=1e-5)
               for inp, _ in captured["act"])
    with pytest.raises(ValueError, match=r"unet_time_scale_shift: one of \['default', 'scale_shift'\], got 'ada'"):
        tiny_generator.TinyGeneratorConfig.from_mapping({"unet_time_scale_shift": "ada"})
    adagn.save_pretrained(tmp_path / "unet")
    cfg = tiny_generator.TinyGeneratorConfig.from_mapping({"unet_channels": [32, 32], "reuse_vae": True,
                                                           "resume_unet": True})
    with pytest.raises(ValueError, match="has time_scale_shift 'scale_shift', the config asks for "
                                         "unet_time_scale_shift 'default'"):
        tiny_generator.load_unet(tmp_path, cfg)


def test_unknown_generator_key_is_named():
    with pytest.raises(ValueError, match=r"demo_models.generator: unknown key\(s\) \['unet_step'\]"):
        tiny_generator.TinyGeneratorConfig.from_mapping({"unet_step": 3})


def test_shipped_generator_draws_the_scene_it_is_given():
    """Ground-truth tiny-CLIP embeddings of unseen scenes -> samples the tiny CLIP tells apart
    (two-way identification) well above chance; the card reports the full evaluation. The shipped
    generator (trained on a GPU, docs/demo_models.md) gets colour right in every one-object scene of
    the card and the shape in most (category 0.64, chance 0.10, the judge's own accuracy on the real
    images 0.87): these bounds hold what it does."""
    from braindecode_fw.metrics.identification import two_way_identification

    folder = SHIPPED / retrain.GENERATOR_FOLDER
    card = json.loads((folder / "training.json").read_text())
    m = card["metrics"]
    assert m["two_way_clip"] > 0.95 and m["colour_accuracy"] > 0.95 and m["category_accuracy"] > 0.6
    assert card["unet_total_steps"] == 8134 and m["guidance_scale"] == 5.0
    assert sum(run["steps"] for run in card["unet_segments"]) == 8134
    assert [run["device"] for run in card["unet_segments"]] == ["cuda", "cuda"]
    for config in folder.glob("*/config.json"):  # ships without the machine paths diffusers records
        assert "_name_or_path" not in json.loads(config.read_text()), config
    assert m["vae_pixcorr"] > 0.97 and m["category_accuracy_real"] > 0.8  # the VAE and the judge work
    assert (folder / "samples_conditional.png").is_file() and (folder / "samples_unconditional.png").is_file()
    clip = tiny_clip.load(SHIPPED / retrain.CLIP_FOLDER)
    scenes = build_corpus(24, seed=0, stream=7, image_size=64)
    emb = tiny_clip.encode_images(clip, scenes.images)
    gen = generator_eval.reconstructor(folder, steps=10, guidance_scale=5.0)
    samples = gen.reconstruct({"tiny_clip_image": emb}, list(range(24)))["final"]
    two_way = two_way_identification(emb, tiny_clip.encode_images(clip, generator_eval.to_uint8(samples)))
    assert float(two_way.mean()) > 0.75


@pytest.mark.parametrize("precision, forward_dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_unet_precision_sets_the_forward_dtype_and_keeps_float32_weights(precision, forward_dtype):
    """``unet_precision: bf16-mixed`` runs the UNet's convolutions in bfloat16 under autocast while
    the weights, and so the saved model, stay float32; training still lowers nothing to NaN."""
    cfg = tiny_generator.TinyGeneratorConfig.from_mapping({
        "image_size": 32, "unet_steps": 3, "unet_batch_size": 4, "unet_channels": [32, 32], "log_every": 1,
        "unet_precision": precision})
    torch.manual_seed(0)
    latents, embeds = torch.randn(8, 4, 8, 8), torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    unet = tiny_generator.build_unet(32, (32, 32), 16)
    seen = []
    unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trained, curve = tiny_generator.train_unet(cfg, latents, embeds, tiny_generator.build_normalizer(embeds),
                                               np.random.default_rng(0), unet=unet)
    assert seen == [forward_dtype] * 3
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert len(curve) == 3 and all(np.isfinite(point["loss"]) for point in curve)
    with pytest.raises(ValueError, match=r"unet_precision: one of \['32-true', 'bf16-mixed'\], got 'bf16'"):
        tiny_generator.TinyGeneratorConfig.from_mapping({"unet_precision": "bf16"})


def test_training_device_is_resolved_and_a_missing_gpu_is_named(monkeypatch):
    """``device: auto`` takes a GPU only when torch sees one; ``cuda`` without one is refused, naming the
    key, instead of quietly training for hours on the CPU; an unknown device is refused at load."""
    config = tiny_generator.TinyGeneratorConfig.from_mapping
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tiny_generator.training_device(config({"device": "auto"})) == torch.device("cpu")
    assert tiny_generator.training_device(config({})) == torch.device("cpu")  # the default stays the CPU
    with pytest.raises(RuntimeError, match="demo_models.generator.device: cuda was asked for, but torch sees no"):
        tiny_generator.training_device(config({"device": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tiny_generator.training_device(config({"device": "auto"})) == torch.device("cuda")
    with pytest.raises(ValueError, match=r"device: one of \['auto', 'cpu', 'cuda'\], got 'gpu'"):
        config({"device": "gpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_unet_trains_the_same_on_cuda_as_on_the_cpu():
    """The random draws are made on the CPU, so from one initial UNet a CUDA run sees the batches,
    timesteps and noise the CPU run sees: the loss curves agree up to floating-point order, and the
    returned EMA UNet is back on the CPU."""
    latents, embeds = torch.randn(16, 4, 8, 8), torch.nn.functional.normalize(torch.randn(16, 16), dim=1)
    boxes = (torch.rand(16, 8, 8) < 0.3).float()
    curves = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_generator.TinyGeneratorConfig.from_mapping({
            "image_size": 32, "unet_steps": 4, "unet_batch_size": 4, "unet_channels": [32, 32], "log_every": 1,
            "unet_precision": "32-true", "device": device})
        torch.manual_seed(0)
        unet = tiny_generator.build_unet(32, (32, 32), 16)
        trained, curves[device] = tiny_generator.train_unet(
            cfg, latents, embeds, tiny_generator.build_normalizer(embeds), np.random.default_rng(0), unet=unet,
            object_boxes=boxes)
        assert next(trained.parameters()).device.type == "cpu"
    np.testing.assert_allclose([p["loss"] for p in curves["cuda"]], [p["loss"] for p in curves["cpu"]],
                               rtol=1e-2)  # cuDNN may use TF32 for float32 convolutions


def test_unet_minutes_ends_training_when_the_budget_is_spent(monkeypatch):
    """``unet_minutes``: the loop stops once the wall-clock budget is spent, the curve's last point is
    the last step done, the learning rate follows the cosine of the elapsed fraction, and a
    non-positive budget is refused. The clock is simulated: each read advances 1 s."""
    clock = iter(range(10**6))
    monkeypatch.setattr(tiny_generator.time, "perf_counter", lambda: float(next(clock)))
    cfg = tiny_generator.TinyGeneratorConfig.from_mapping({
        "image_size": 32, "unet_steps": 1000, "unet_batch_size": 4, "unet_channels": [32, 32], "log_every": 100,
        "unet_precision": "32-true", "unet_minutes": 0.1})  # 6 s: reads at 0 (start), 1, 2, ..., 6 (stop)
    latents, embeds = torch.randn(8, 4, 8, 8), torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    _, curve = tiny_generator.train_unet(cfg, latents, embeds, tiny_generator.build_normalizer(embeds),
                                         np.random.default_rng(0), unet=tiny_generator.build_unet(32, (32, 32), 16))
    assert [point["step"] for point in curve] == [0, 4]  # steps 0-4 ran (elapsed 1-5 s), the 6th read stopped it
    assert tiny_generator._budgeted_cosine_lr(60, 0.5, 1e-3) == pytest.approx(0.5e-3)
    assert tiny_generator._budgeted_cosine_lr(9, 0.5, 1e-3) == pytest.approx(1e-3 * 10 / 50)  # warm-up by steps
    with pytest.raises(ValueError, match="unet_minutes: a positive budget in minutes or null"):
        tiny_generator.TinyGeneratorConfig.from_mapping({"unet_minutes": 0})
