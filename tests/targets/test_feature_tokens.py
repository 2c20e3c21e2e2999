"""The ConvNeXt teacher target: feature-map tokens from a local weights file, against the network's
own forward; and MindEye2's soft token distillation against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.losses import soft_token_contrast
from braindecode_fw.targets.features import FeatureMapTokenEncoder


def test_feature_map_tokens_from_a_local_checkpoint(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("convnext_atto", pretrained=False).eval()
    path = tmp_path / "teacher.pt"
    torch.save(net.state_dict(), path)
    enc = FeatureMapTokenEncoder("timm:convnext_atto", "stages.3", weights=str(path), image_size=64, batch_size=3)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 40, 40, 3), dtype=np.uint8)
    tokens = enc.encode(images)
    assert tokens.shape == (5, 4, 320) and enc.output_shape == (4, 320)  # 2×2 map of the last stage
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net.forward_features((x - mean) / std)  # (5, 320, 2, 2)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)
    assert enc.encoder_id != FeatureMapTokenEncoder("timm:convnext_atto", "stages.2", weights=str(path),
                                                    image_size=64).encoder_id
    with pytest.raises(ValueError, match=r"target.normalize: one of \['clip', 'imagenet', 'none'\], got 'sun'"):
        FeatureMapTokenEncoder("timm:convnext_atto", "stages.3", normalize="sun")


def test_soft_token_contrast_matches_mindeye2_formula():
    """soft_cont_loss(student, teacher, teacher_aug=teacher, τ) with every token a row."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    s = torch.nn.functional.normalize(student.reshape(12, 6), dim=-1)
    t = torch.nn.functional.normalize(teacher.reshape(12, 6), dim=-1)
    tau = 0.2
    loss1 = -((s @ t.T / tau).log_softmax(-1) * (t @ t.T / tau).softmax(-1)).sum(-1).mean()
    loss2 = -((t @ s.T / tau).log_softmax(-1) * (t @ t.T / tau).softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(soft_token_contrast(student, teacher, tau), (loss1 + loss2) / 2)


def test_convnext_teacher_config_names_the_torchvision_weights(tmp_path, monkeypatch):
    """braindecode_fw/conf/target/convnext_teacher.yaml's weights resolve to torchvision's ConvNeXt-Base ImageNet file
    in the torch hub cache (offline here: the error names that file), not to a missing local path."""
    from braindecode_fw.metrics.weights import MissingWeightsError, resolve_state_dict
    from tests.conftest import compose_config

    cfg = compose_config("train", ["target=convnext_teacher"]).target
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"weights not found at .*checkpoints/convnext_base-\w+\.pth"):
        resolve_state_dict(cfg.weights, arch=cfg.arch, what="teacher", config_key="target.weights", download=False)
