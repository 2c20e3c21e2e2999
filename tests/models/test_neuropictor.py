"""NeuroPictor (docs/methods/neuropictor.md): real-scale shapes, zero initialisation, the locked-UNet diffusion loss,
building from a saved tiny UNet, configuration from the store's geometry."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from braindecode_fw.data.datamodule import Batch
from braindecode_fw.models.neuropictor import (
    ControlMapper,
    FMRIViTEncoder,
    NeuroPictorDiffusionLoss,
    SemanticMapper,
    build_neuropictor_decoder,
)
from braindecode_fw.objectives import TermsObjective

TEXT = (5, 16)  # tiny text tokens (L, D_text) = the tiny UNet's cross-attention width
LATENT = (4, 8, 8)


def _unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT[1], attention_head_dim=8, norm_num_groups=8)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "tiny_sd"
    _unet().save_pretrained(folder / "unet")  # the pipeline layout load_model reads (unet/config.json)
    return folder


def _tiny_decoder(sd_folder, **kw):
    n_features = {"a": 30, "b": 20}
    dec = build_neuropictor_decoder(n_features, {"clip_text_tokens": TEXT, "vae_latent": LATENT}, map_size=16, patch=4,
                                    dim=32, depth=1, heads=4, control_channels=32, control_size=None,
                                    text_tokens=TEXT[0], diffusion={"model": str(sd_folder), **kw})
    rng = np.random.default_rng(0)
    for s, n in n_features.items():
        dec.projection.set_coordinates(s, rng.integers(0, 10, (n, 3)))
    return dec


def test_real_scale_shapes_backward_and_mapper_parameter_counts():
    torch.manual_seed(0)
    enc = FMRIViTEncoder(map_size=256, patch=16, dim=1024, depth=1, heads=16)  # real widths, shallow
    sem = SemanticMapper(enc.n_tokens, 1024, 77, 1024, extra_branch=True)
    ctl = ControlMapper(enc.n_tokens, 1024, 320, 64)
    tokens = enc(torch.randn(1, 1, 256, 256))
    assert tokens.shape == (1, 257, 1024)
    clip_txt, condition = sem(tokens)
    control = ctl(tokens)
    assert clip_txt.shape == condition.shape == (1, 77, 1024) and control.shape == (1, 320, 64, 64)
    (clip_txt.square().mean() + condition.mean() + control.mean()).backward()
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0 and enc.cls_token.grad.abs().sum() > 0
    assert ctl.out.weight.grad.abs().sum() > 0 and sem.extra_out.weight.grad.abs().sum() > 0

    def n_params(m):
        return sum(p.numel() for p in m.parameters())

    branch = (257 * 128 + 128) + (128 * 77 + 77) + (1024 * 1024 + 1024) + 2 * 1024  # convs, linear, LN
    assert n_params(sem) == 2 * branch + (77 * 77 * 3 + 77)
    # the released middle widths: 257 // 2 = 128 (semantic), 2 · 257 = 514 (control)
    assert n_params(ctl) == (257 * 514 + 514) + (514 * 320 + 320) + (1024 * 4096 + 4096) + (320 * 320 * 3 + 320)


def test_zero_initialised_parts_contribute_exactly_zero():
    torch.manual_seed(0)
    sem = SemanticMapper(17, 32, 5, 16, extra_branch=True)
    ctl = ControlMapper(17, 32, 8, 4)
    x = torch.randn(3, 17, 32)
    clip_txt, condition = sem(x)
    assert torch.equal(condition, clip_txt) and clip_txt.abs().sum() > 0
    assert torch.equal(ctl(x), torch.zeros(3, 8, 4, 4))
    plain = SemanticMapper(17, 32, 5, 16, extra_branch=False)
    main, cond = plain(x)
    assert plain.extra is None and cond is main


def test_sincos_position_embedding_is_fixed_and_distinct():
    enc = FMRIViTEncoder(map_size=16, patch=4, dim=8, depth=0, heads=2)
    pe = enc.pos_embed[0]
    assert pe.shape == (16, 8) and "pos_embed" not in dict(enc.named_parameters())
    assert torch.unique(pe, dim=0).shape[0] == 16  # every patch position has its own code


def test_diffusion_gradients_reach_encoder_and_controlnet_not_the_locked_unet(sd_folder):
    dec = _tiny_decoder(sd_folder)
    unet_before = {k: v.clone() for k, v in dec.diffusion.unet.state_dict().items()}
    cn_zero_before = dec.diffusion.controlnet.controlnet_mid_block.weight.clone()
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-2, weight_decay=0.1)  # the locked UNet included
    out = dec(torch.randn(4, 30), ["a", "b", "a", "b"], targets={"vae_latent": torch.randn(4, *LATENT)})
    assert set(out) == {"clip_text_tokens", "clip_text_tokens/main", "control_map", "loss/diffusion"}
    assert out["control_map"].shape == (4, 32, 8, 8)
    loss = out["loss/diffusion"]
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    assert dec.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert dec.semantic.main.linear.weight.grad.abs().sum() > 0
    assert dec.diffusion.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in dec.diffusion.unet.parameters())
    opt.step()
    assert all(torch.equal(v, unet_before[k]) for k, v in dec.diffusion.unet.state_dict().items())
    assert not torch.equal(dec.diffusion.controlnet.controlnet_mid_block.weight, cn_zero_before)
    dec.train()
    assert not dec.diffusion.unet.training  # stays in eval mode


def test_fresh_controlnet_leaves_the_unet_output_unchanged():
    unet = _unet()
    loss = NeuroPictorDiffusionLoss(unet, text_tokens=TEXT[0])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, *LATENT, generator=g)
    cond = torch.randn(2, *TEXT, generator=g)
    control = torch.randn(2, 32, 8, 8, generator=g)  # even a non-zero map: the zero convolutions block it
    t = torch.tensor([10, 900])
    with torch.no_grad():
        down, mid = loss.controlnet(z, t, encoder_hidden_states=cond, controlnet_cond=control, return_dict=False)
        assert all(torch.equal(r, torch.zeros_like(r)) for r in [*down, mid])
        torch.testing.assert_close(loss.epsilon(z, t, cond, control), unet(z, t, encoder_hidden_states=cond).sample,
                                   rtol=0, atol=1e-6)


def test_cond_dropout_replaces_the_whole_conditioning(monkeypatch):
    unet = _unet()
    loss = NeuroPictorDiffusionLoss(unet, text_tokens=TEXT[0], cond_dropout=1.0, uncond=torch.full(TEXT, 0.5))
    seen = []
    monkeypatch.setattr(loss, "epsilon", lambda z, t, c, m: (seen.append(c), torch.zeros_like(z))[1])
    cond = torch.randn(3, *TEXT)
    loss(torch.randn(3, *LATENT), cond, torch.zeros(3, 32, 8, 8))
    assert torch.equal(seen[-1], torch.full((3, *TEXT), 0.5))
    loss.eval()  # never at evaluation
    loss(torch.randn(3, *LATENT), cond, torch.zeros(3, 32, 8, 8))
    assert torch.equal(seen[-1], cond)
    with pytest.raises(ValueError, match="model.diffusion.cond_dropout"):
        NeuroPictorDiffusionLoss(unet, cond_dropout=1.5)


def test_checkpoint_excludes_the_locked_unet_and_reloads_strictly(sd_folder):
    dec = _tiny_decoder(sd_folder)
    state = dec.state_dict()
    assert not any(k.startswith("diffusion.unet.") for k in state)
    assert any(k.startswith("diffusion.controlnet.") for k in state) and "projection.pixel_index" in state
    other = _tiny_decoder(sd_folder, cond_dropout=0.05)
    other.projection.configured.zero_()
    other.load_state_dict(state)  # strict: the unet's keys are not reported missing
    assert other.projection.is_configured("a")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**state, "diffusion.bogus": torch.zeros(1)})


def test_terms_objective_reads_the_aux_diffusion_loss_and_the_semantic_term(sd_folder):
    import yaml

    conf = yaml.safe_load((Path(__file__).parents[2] / "braindecode_fw/conf/loss/neuropictor.yaml").read_text())
    obj = TermsObjective(conf["terms"])
    dec = _tiny_decoder(sd_folder)
    batch = Batch(subject=["a", "b"], responses=torch.randn(2, 30), image_index=torch.arange(2),
                  targets={"clip_text_tokens": torch.randn(2, *TEXT), "vae_latent": torch.randn(2, *LATENT)})
    total, parts, _ = obj(dec, batch, 0.0)
    assert torch.isfinite(total)
    torch.testing.assert_close(total.detach(), parts["diffusion"] + 0.1 * parts["semantic"])


def test_configure_from_data_uses_the_store_geometry(tiny_store):
    from braindecode_fw.data.store import open_store

    store = open_store(tiny_store)
    n_features = {s: store.subjects[s].n_features for s in store.subjects}
    dec = build_neuropictor_decoder(n_features, {"clip_text_tokens": TEXT}, map_size=32, patch=8, dim=16, depth=1,
                                    heads=2, control_channels=8, control_size=4, text_tokens=None, diffusion=None)
    dm = SimpleNamespace(store=store, store_path=tiny_store)
    first = sorted(n_features)[0]
    dec.projection.set_pixels(first, np.zeros((n_features[first], 2), dtype=int))  # user-given: kept
    dec.configure_from_data(dm)
    assert all(dec.projection.is_configured(s) for s in n_features)
    assert int(dec.projection.mask[0].sum()) == 1
    assert int(dec.projection.mask[1].sum()) > 10
    s = sorted(n_features)[1]
    out = dec(torch.randn(2, max(n_features.values())), [s, s], targets={"clip_text_tokens": torch.zeros(2, *TEXT)})
    assert "loss/diffusion" not in out and out["clip_text_tokens"].shape == (2, *TEXT)


def test_configure_errors(tmp_path):
    dec = build_neuropictor_decoder({"a": 4}, {"clip_text_tokens": TEXT}, map_size=16, patch=8, dim=16, depth=0,
                                    heads=2, control_channels=8, control_size=4, text_tokens=5, diffusion=None)
    with pytest.raises(ValueError, match="needs an fMRI dataset"):
        dec.configure_from_data(SimpleNamespace(store=SimpleNamespace(modality="meg"), store_path="meg_store"))
    store = SimpleNamespace(modality="fmri", subjects={"a": SimpleNamespace(directory=tmp_path)})
    with pytest.raises(FileNotFoundError, match="geometry.npz: missing"):
        dec.configure_from_data(SimpleNamespace(store=store, store_path=tmp_path))
    np.savez(tmp_path / "geometry.npz", voxel_ijk=np.zeros((3, 3), dtype=int))
    with pytest.raises(ValueError, match="3 voxels in voxel_ijk, the model was built for 4"):
        dec.configure_from_data(SimpleNamespace(store=store, store_path=tmp_path))


def test_build_errors_name_the_config_keys(sd_folder, tmp_path):
    shapes = {"clip_text_tokens": TEXT, "vae_latent": LATENT}
    kw = dict(map_size=16, patch=4, dim=32, depth=0, heads=4, control_channels=32, control_size=8, text_tokens=5)

    def build(shapes=shapes, **over):
        return build_neuropictor_decoder({"a": 4}, shapes, **{**kw, **over})

    with pytest.raises(ValueError, match="model.semantic_target: 'clip_image_tokens' is not a target"):
        build(semantic_target="clip_image_tokens")
    with pytest.raises(ValueError, match="model.semantic_target: 'vae_latent' must be text tokens"):
        build(semantic_target="vae_latent")
    with pytest.raises(ValueError, match="model.text_tokens: 77"):
        build(text_tokens=77)
    with pytest.raises(ValueError, match="model.control_size: 16"):
        build(control_size=16)
    with pytest.raises(ValueError, match="model.patch"):
        build(patch=5)
    with pytest.raises(ValueError, match="model.diffusion.model: a Stable Diffusion pipeline"):
        build(diffusion={"model": None})
    with pytest.raises(ValueError, match="model.latent_target: the diffusion loss needs 'vae_latent'"):
        build(shapes={"clip_text_tokens": TEXT}, diffusion={"model": str(sd_folder)})
    with pytest.raises(FileNotFoundError, match="model.diffusion.model"):
        build(diffusion={"model": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="model.control_channels: 16"):
        build(control_channels=16, diffusion={"model": str(sd_folder)})
    with pytest.raises(ValueError, match="cross_attention_dim is 16"):
        build(shapes={"clip_text_tokens": (5, 24), "vae_latent": LATENT}, diffusion={"model": str(sd_folder)})
    with pytest.raises(KeyError, match="model.latent_target"):
        dec = build(diffusion={"model": str(sd_folder)})
        dec.projection.set_pixels("a", np.zeros((4, 2), dtype=int))
        dec(torch.randn(1, 4), ["a"], targets={"clip_text_tokens": torch.zeros(1, *TEXT)})


def test_configs_compose_and_instantiate_tiny(sd_folder):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    GlobalHydra.instance().clear()
    try:
        cfg = compose_config("train", ["model=neuropictor", "loss=neuropictor", "model.map_size=16", "model.patch=4",
                                       "model.dim=32", "model.depth=1", "model.heads=4", "model.text_tokens=5",
                                       "model.control_channels=32", "model.control_size=8",
                                       f"model.diffusion.model={sd_folder}", "model.diffusion.cond_dropout=0.05"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.model.diffusion.beta_start == 0.00085 and cfg.loss.terms.semantic.weight == 0.1
    dec = instantiate(cfg.model)(n_features={"a": 4}, target_shapes={"clip_text_tokens": TEXT, "vae_latent": LATENT})
    assert dec.diffusion.cond_dropout == 0.05 and dec.semantic.extra is not None
    assert dec.diffusion.scheduler.config.beta_schedule == "scaled_linear"
    assert set(instantiate(cfg.loss).terms) == {"diffusion", "semantic"}


def test_repetition_averaging_and_controlnet_export(sd_folder, tmp_path):
    from diffusers import ControlNetModel

    dec = _tiny_decoder(sd_folder)
    x = torch.randn(2, 3, 30)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    avg = dec(x, ["a", "b"], repeat_mask=mask)
    assert "loss/diffusion" not in avg
    torch.testing.assert_close(avg["control_map"][1], dec(x[1:, 0], ["b"])["control_map"][0])
    with torch.no_grad():
        dec.diffusion.controlnet.controlnet_mid_block.weight.fill_(0.25)
    folder = dec.diffusion.save_controlnet(tmp_path / "controlnet")
    loaded = ControlNetModel.from_pretrained(folder)
    assert torch.all(loaded.controlnet_mid_block.weight == 0.25)


def test_neuropictor_recipes_compose_and_build():
    """experiment=neuropictor_nsd names NeuroPictor's targets (final-layer ViT-H text tokens, SD 2.1
    latents of 512² images) and its fine-tune settings; experiment=neuropictor_synthetic builds and
    its loss terms find their outputs."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    nsd = compose_config("train", ["experiment=neuropictor_nsd"])
    assert nsd.target.output == "tokens" and nsd.target.model_name == "ViT-H-14"
    assert nsd.extra_targets.latent.feature_name == "vae_latent" and nsd.extra_targets.latent.image_size == 512
    assert nsd.model.extra_branch and nsd.loss.terms.semantic.weight == 0.1
    assert nsd.optim.optimizer._target_ == "torch.optim.AdamW" and nsd.optim.scheduler is None

    syn = compose_config("train", ["experiment=neuropictor_synthetic"])
    torch.manual_seed(0)
    decoder = instantiate(syn.model)(n_features={"subj01": 120, "subj02": 160},
                                     target_shapes={"clip_image_tokens": (64, 128)})
    rng = np.random.default_rng(0)
    for s, n in (("subj01", 120), ("subj02", 160)):  # what configure_from_data does from the store geometry
        ijk = np.stack(np.unravel_index(rng.choice(10 * 12 * 10, n, replace=False), (10, 12, 10)), -1)
        decoder.projection.set_coordinates(s, ijk)
    objective = instantiate(syn.loss)
    assert set(objective.terms) == {"semantic", "semantic_contrast"}
    out = decoder(torch.randn(2, 160), ["subj01", "subj02"], targets={"clip_image_tokens": torch.zeros(2, 64, 128)})
    for term in objective.terms.values():
        assert out[term.output].shape == (2, 64, 128)
    assert out["control_map"].shape == (2, 16, 8, 8) and not any(k.startswith("loss/") for k in out)


def _controlnet_state(net) -> dict[str, torch.Tensor]:
    """The weights an export holds: everything but the conditioning embedding (the identity while
    training; the reconstructor replaces the saved one with the identity again)."""
    return {k: v for k, v in net.state_dict().items() if not k.startswith("controlnet_cond_embedding.")}


def test_export_trained_parts_writes_the_controlnet_atomically(sd_folder, tmp_path, monkeypatch):
    from diffusers import ControlNetModel

    dec = _tiny_decoder(sd_folder)
    assert dec.auxiliary_output_shapes() == {"control_map": (32, 8, 8), "clip_text_tokens/main": TEXT}
    with torch.no_grad():
        dec.diffusion.controlnet.controlnet_mid_block.weight.fill_(0.25)
    assert dec.export_trained_parts(tmp_path) == {"controlnet": str(tmp_path / "controlnet")}
    loaded = _controlnet_state(ControlNetModel.from_pretrained(tmp_path / "controlnet"))
    trained = _controlnet_state(dec.diffusion.controlnet)
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)

    # a newer export replaces the older one
    with torch.no_grad():
        dec.diffusion.controlnet.controlnet_mid_block.weight.fill_(0.5)
    dec.export_trained_parts(tmp_path)
    assert torch.all(ControlNetModel.from_pretrained(tmp_path / "controlnet").controlnet_mid_block.weight == 0.5)

    # a failure half-way through writing leaves the previous export as it was and no partial folder
    def broken_save(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(ControlNetModel, "save_pretrained", broken_save)
    with torch.no_grad():
        dec.diffusion.controlnet.controlnet_mid_block.weight.fill_(0.75)
    with pytest.raises(OSError, match="disk full"):
        dec.export_trained_parts(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["controlnet"]
    assert torch.all(ControlNetModel.from_pretrained(tmp_path / "controlnet").controlnet_mid_block.weight == 0.5)
    fresh = tmp_path / "fresh_run"
    fresh.mkdir()
    with pytest.raises(OSError, match="disk full"):
        dec.export_trained_parts(fresh)
    assert list(fresh.iterdir()) == []


def test_no_export_without_a_diffusion_term(tmp_path):
    dec = build_neuropictor_decoder({"a": 4}, {"clip_text_tokens": TEXT}, map_size=16, patch=8, dim=16, depth=0,
                                    heads=2, control_channels=8, control_size=4, text_tokens=5, diffusion=None)
    assert dec.export_trained_parts(tmp_path) == {} and list(tmp_path.iterdir()) == []
    assert dec.auxiliary_output_shapes()["control_map"] == (8, 4, 4)
