"""Feature extractors: real feature sizes, an independent forward path, and every weights source
(local file, torch-hub cache, hub id, random) with clear errors when weights are missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import alexnet, get_model_weights

from braindecode_fw.metrics.features import ExtractorSpec, FeatureExtractor
from braindecode_fw.metrics.weights import MissingWeightsError

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


def _images(n=2, size=256):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def alex():
    return FeatureExtractor(ExtractorSpec(arch="torchvision:alexnet", weights="random:7"), ["features.4", "features.11"])


def test_alexnet_nodes_real_sizes_and_independent_forward(alex):
    x = _images()
    feats = alex(x)
    assert feats["features.4"].shape == (2, 192 * 31 * 31) == (2, 184_512)
    assert feats["features.11"].shape == (2, 256 * 15 * 15) == (2, 57_600)
    # the same weights through plain module slicing (no fx graph), ImageNet-normalised, no crop
    net = alexnet()
    net.load_state_dict({k.removeprefix("model."): v for k, v in alex.body.state_dict().items()}, strict=False)
    net.features.load_state_dict({k.removeprefix("features."): v for k, v in alex.body.state_dict().items()
                                  if k.startswith("features.")})
    z = (x - IMAGENET[0]) / IMAGENET[1]
    with torch.no_grad():
        np.testing.assert_allclose(feats["features.4"].numpy(), net.features[:5](z).flatten(1).numpy(), atol=1e-5)
        np.testing.assert_allclose(feats["features.11"].numpy(), net.features[:12](z).flatten(1).numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,dim", [
    ("torchvision:inception_v3", 342, 2048),
    ("torchvision:efficientnet_b1", 255, 1280),
    ("torchvision:resnet50", 224, 2048),
])
def test_avgpool_real_sizes(arch, size, dim):
    ext = FeatureExtractor(ExtractorSpec(arch=arch, resize=size), ["avgpool"])
    out = ext(_images(n=2))["avgpool"]
    assert out.shape == (2, dim) and torch.isfinite(out).all()


@pytest.mark.slow
def test_inception_uses_transform_input_at_342():
    """Same weights in torchvision's own Inception3 (transform_input=True, as forced with ImageNet
    weights), avgpool read by a forward hook on a 342-px ImageNet-normalised input."""
    from torchvision.models import inception_v3

    ext = FeatureExtractor(ExtractorSpec(arch="torchvision:inception_v3", resize=342), ["avgpool"])
    net = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False).eval()
    net.load_state_dict(ext.body.state_dict(), strict=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in ext.body.state_dict().items())
    seen = {}
    net.avgpool.register_forward_hook(lambda m, i, o: seen.setdefault("avgpool", o.flatten(1)))
    x = _images(n=2)
    z = (torch.nn.functional.interpolate(x, size=(342, 342), mode="bilinear", align_corners=False)
         - IMAGENET[0]) / IMAGENET[1]
    with torch.no_grad():
        net(z)
    np.testing.assert_allclose(ext(x)["avgpool"].numpy(), seen["avgpool"].numpy(), atol=1e-4)


def test_open_clip_image_embedding_is_the_target_encoder_space():
    """The CLIP column's extractor and the target encoder build the same network from config."""
    from braindecode_fw.targets.encoders import OpenClipImageEncoder

    overrides = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                 "head_width": 16},
                 "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 1, "layers": 1}}
    ext = FeatureExtractor(ExtractorSpec(arch="open_clip:ViT-B-32", weights="random:0", resize=32, normalize="clip",
                                         arch_kwargs=overrides), ["image_embedding"])
    target = OpenClipImageEncoder("ViT-B-32", None, seed=0, model_overrides=overrides, output="pooled",
                                  preprocess={"image_size": 32})
    x = _images(n=3, size=32)
    u8 = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    ours = ext(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)["image_embedding"]
    np.testing.assert_allclose(ours.numpy(), target.encode(u8).numpy(), atol=1e-5)
    assert ours.shape == (3, 16)


def test_weights_from_local_files_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = alexnet()
    torch.save({"state_dict": src.state_dict()}, tmp_path / "alex.pth")
    save_file(src.state_dict(), str(tmp_path / "alex.safetensors"))
    x = _images(n=1)
    ref = None
    for f in ("alex.pth", "alex.safetensors"):
        ext = FeatureExtractor(ExtractorSpec(arch="torchvision:alexnet", weights=str(tmp_path / f)), ["features.11"])
        out = ext(x)["features.11"]
        if ref is None:
            with torch.no_grad():
                ref = src.features[:12]((x - IMAGENET[0]) / IMAGENET[1]).flatten(1)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)


def test_torchvision_weights_from_hub_cache_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("BDF_OFFLINE", "1")
    weights = get_model_weights("alexnet").IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    spec = ExtractorSpec(arch="torchvision:alexnet", weights="torchvision:IMAGENET1K_V1", name="alexnet")
    with pytest.raises(MissingWeightsError) as err:
        FeatureExtractor(spec, ["features.4"])
    msg = str(err.value)
    assert str(cached) in msg and weights.url in msg and "metrics.extractors.alexnet.weights" in msg
    cached.parent.mkdir(parents=True)
    src = alexnet()
    torch.save(src.state_dict(), cached)
    ext = FeatureExtractor(spec, ["features.4"])
    assert torch.equal(ext.body.state_dict()["features.0.weight"], src.state_dict()["features.0.weight"])
    with pytest.raises(ValueError, match="has no weights 'IMAGENET9K'"):
        FeatureExtractor(ExtractorSpec(arch="torchvision:alexnet", weights="torchvision:IMAGENET9K"), ["features.4"])


def test_swav_style_checkpoint_prefix_and_allowed_missing(tmp_path, monkeypatch):
    """SwAV's hub checkpoint: DataParallel 'module.' keys, a projection head, no fc."""
    from torchvision.models import resnet50

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
    state = {f"module.{k}": v for k, v in resnet50().state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(2048, 2048)
    path = tmp_path / "hub" / "checkpoints" / "swav_800ep_pretrain.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    spec = dict(arch="torchvision:resnet50", weights=url, resize=224, strip_prefix="module.")
    ext = FeatureExtractor(ExtractorSpec(**spec, allowed_missing=["fc."]), ["avgpool"])
    assert torch.equal(ext.body.state_dict()["conv1.weight"], state["module.conv1.weight"])
    with pytest.raises(ValueError, match=r"lack 2 parameter\(s\).*fc\."):
        FeatureExtractor(ExtractorSpec(**spec), ["avgpool"])


def test_hub_id_offline_and_bad_config_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="huggingface-cli download someone/nets alexnet.safetensors"):
        FeatureExtractor(ExtractorSpec(arch="torchvision:alexnet", weights="hf-hub:someone/nets/alexnet.safetensors"),
                         ["features.4"])
    with pytest.raises(ValueError, match=r"node\(s\) \['features.99'\] not in torchvision:alexnet"):
        FeatureExtractor(ExtractorSpec(arch="torchvision:alexnet"), ["features.99"])
    with pytest.raises(ValueError, match="metrics.extractors.x.arch: expected torchvision"):
        ExtractorSpec(arch="alexnet", name="x")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        FeatureExtractor(ExtractorSpec(arch="torchvision:alexnet", weights="/nowhere/alex.pth"), ["features.4"])


def test_timm_architecture_and_local_weights(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    ext = FeatureExtractor(ExtractorSpec(arch="timm:resnet18", weights=str(tmp_path / "r18.pth"), resize=224),
                           ["global_pool"])
    x = _images(n=2)
    z = (torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
         - IMAGENET[0]) / IMAGENET[1]
    with torch.no_grad():
        ref = src.eval().forward_head(src.forward_features(z), pre_logits=True)
    np.testing.assert_allclose(ext(x)["global_pool"].numpy(), ref.numpy(), atol=1e-5)
