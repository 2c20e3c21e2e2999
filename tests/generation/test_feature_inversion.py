"""Deep-Image-Prior inversion of multi-scale VGG16-BN features (docs/methods/brainit.md §6 step 1): it recovers a
real image from its features, the batched nets are independent per image, and the errors say what
was expected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braindecode_fw.generation.feature_inversion import (
    FeatureInverter,
    SkipDIP,
    invert_features,
    vgg_feature_fn,
)
from braindecode_fw.targets.multiscale import scale_sizes, tokenise_maps
from tests.conftest import CONF


def _image(size: int) -> torch.Tensor:
    from skimage import data  # bundled with scikit-image, nothing downloads

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(img, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def vgg():
    return vgg_feature_fn("random:0")


def test_inversion_recovers_a_real_image(vgg):
    image = _image(32)
    with torch.no_grad():
        maps = vgg(image)
    losses, first = [], {}

    def watch(it, out, loss):
        losses.append(float(loss[0]))
        if it == 0:
            first["out"] = out.clone()

    out = invert_features(maps, vgg, iterations=60, output_size=32, feature_size=32, seed=0, callback=watch)
    assert out.shape == (1, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert len(losses) == 60 and losses[-1] < 0.3 * losses[0]
    assert _corr(out, image) > 0.5 and _corr(out, image) > _corr(first["out"], image) + 0.3


def test_grouped_nets_are_independent_per_image():
    x = torch.rand(2, 8, 16, 16)
    kw = dict(input_depth=8, channels_down=[6, 6], channels_up=[6, 6], channels_skip=[2, 2])
    both = SkipDIP(2, seeds=[3, 7], **kw)(x)
    torch.testing.assert_close(both[0], SkipDIP(1, seeds=[3], **kw)(x[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], SkipDIP(1, seeds=[7], **kw)(x[1:])[0], atol=1e-5, rtol=1e-5)
    # the default net: Brain-IT's "skip" (32 → 3 scales of 128, skips of 4), counted by hand
    net = SkipDIP(1)
    convs = [(32, 4, 1), (32, 128, 3), (128, 128, 3), (132, 128, 3), (128, 128, 1)] + 2 * [
        (128, 4, 1), (128, 128, 3), (128, 128, 3), (132, 128, 3), (128, 128, 1)] + [(128, 3, 1)]
    bns = 3 * [4, 128, 128, 132, 128, 128]
    assert sum(p.numel() for p in net.parameters()) == sum(i * o * k * k + o for i, o, k in convs) + 2 * sum(bns)
    with torch.no_grad():
        y = net(torch.rand(1, 32, 64, 64))
    assert y.shape == (1, 3, 64, 64) and 0 < float(y.min()) and float(y.max()) < 1
    # optimisation too: image 1 of a batch comes out as when inverted alone with its seed
    def feats(img):
        return [F.avg_pool2d(img, 2), F.avg_pool2d(img, 4)]

    targets = [t.detach() for t in feats(torch.rand(2, 3, 16, 16))]
    small = dict(iterations=3, lr=1e-2, output_size=16, feature_size=16, input_depth=8, channels=6, scales=2,
                 skip_channels=2, expected_channels=None)
    batch = invert_features(targets, feats, seed=[5, 6], **small)
    alone = invert_features([t[1:] for t in targets], feats, seed=[6], **small)
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-4)


def test_errors_name_what_was_expected(vgg):
    maps = [torch.zeros(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate((64, 128, 256, 512, 512))]
    kw = dict(iterations=1, output_size=32, feature_size=32)
    with pytest.raises(ValueError, match=r"must be the 5 VGG16-BN maps .* got 4"):
        invert_features(maps[:4], vgg, **kw)
    bad = [*maps[:3], torch.zeros(1, 256, 4, 4), maps[4]]
    with pytest.raises(ValueError, match=r"target map 3 has shape \(1, 256, 4, 4\), expected \(1, 512, 4, 4\)"):
        invert_features(bad, vgg, **kw)
    with pytest.raises(ValueError, match=r"feature_fn gives maps"):
        invert_features(maps, lambda img: vgg(img)[:4], **kw)
    with pytest.raises(ValueError, match=r"lowlevel.output_size: a multiple of 2\^scales = 8, got 30"):
        invert_features(maps, vgg, iterations=1, output_size=30, feature_size=32)
    with pytest.raises(ValueError, match=r"lowlevel: unknown key\(s\) \['iters'\]"):
        FeatureInverter.from_config({"iters": 5})
    with pytest.raises(ValueError, match=r"lowlevel.ema: expected a weight in \[0, 1\), got 1.5"):
        FeatureInverter(ema=1.5)


def test_feature_inverter_from_the_conf_node():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "lowlevel" / "dip.yaml")
    inv = FeatureInverter.from_config(cfg)
    assert (inv.iterations, inv.lr, inv.output_size, inv.feature_size, inv.ema) == (1800, 1e-3, 224, 112, 0.99)
    assert inv.reg_noise_std == pytest.approx(1 / 30) and inv.vgg_weights == "VGG16_BN_Weights.IMAGENET1K_V1"
    small = dict(iterations=2, output_size=32, feature_size=32, vgg_weights="random:0", batch_size=1, channels=16)
    inv = instantiate(cfg, **small)
    assert isinstance(inv, FeatureInverter) and inv.config()["channels"] == 16
    with torch.no_grad():
        tokens = tokenise_maps(inv.feature_fn(torch.rand(2, 3, 32, 32)))
    assert tokens.shape == (2, sum(scale_sizes(32)), 512)
    out = inv(tokens)
    assert out.shape == (2, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    torch.testing.assert_close(inv(tokens[1:], start=1), out[1:], atol=1e-5, rtol=1e-4)  # chunking-invariant


def test_reconstruction_stage_checks_the_decoder_output_and_seeds_per_image():
    """As bdf-reconstruct's low-level stage: errors name the key and what was expected; the item of
    test image i uses seed ``seed + i``, whatever the batch it comes in."""
    inv = FeatureInverter(iterations=1, output_size=32, feature_size=32, vgg_weights="random:0", channels=8,
                          batch_size=2, seed=5)
    assert (inv.source, inv.output, inv.output_shape) == ("vgg_tokens", "lowlevel_image", (3, 32, 32))
    inv.check_source({"vgg_tokens": (565, 512), "clip_image_tokens": (16, 32)})
    with pytest.raises(ValueError, match=r"lowlevel.source: the decoder has no output 'vgg_tokens' to invert \(it "
                                         r"provides clip_image_tokens 16×32\)"):
        inv.check_source({"clip_image_tokens": (16, 32)})
    with pytest.raises(ValueError, match=r"lowlevel.feature_size: 32 px gives 565 VGG tokens × 512 per image, but "
                                         r"the decoder's 'vgg_tokens' is 2321×512: the tokens of a 64 px image, so "
                                         r"set lowlevel.feature_size=64"):
        inv.check_source({"vgg_tokens": (2321, 512)})
    with pytest.raises(ValueError, match=r"'vgg_tokens' is 100×512; expected \(565, 512\)"):
        inv.check_source({"vgg_tokens": (100, 512)})
    tokens = torch.randn(3, 565, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # as inside lit.predict's loop: the inversion still optimises
        out = inv.invert_outputs({"vgg_tokens": tokens, "other": torch.zeros(3)}, torch.tensor([7, 0, 3]))
    assert out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out, inv(tokens, seeds=[12, 5, 8]))
    torch.testing.assert_close(out[2:], inv.invert_outputs({"vgg_tokens": tokens[2:]}, [3]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[2:], inv.invert_outputs({"vgg_tokens": tokens[2:]}, [4]))
    with pytest.raises(KeyError, match=r"lowlevel.source: the decoder outputs \['other'\], not 'vgg_tokens'"):
        inv.invert_outputs({"other": tokens}, [0, 1, 2])
