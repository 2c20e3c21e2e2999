"""init_from: a new run starts from a checkpoint's decoder weights where names and shapes match."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from braindecode_fw.ops.warm_start import load_matching_weights


class _Decoder(nn.Module):
    def __init__(self, width: int, extra: bool):
        super().__init__()
        self.shared = nn.Linear(4, 3)
        self.head = nn.Linear(3, width)
        self.register_buffer("labels", torch.arange(5))
        if extra:  # e.g. NeuroPictor's extra semantic branch, absent when pretraining
            self.extra = nn.Linear(3, 3)


def _save(decoder: nn.Module, path, **more):
    state = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    torch.save({"state_dict": {**state, "other.step": torch.tensor(3)}, **more}, path)


def test_loads_what_matches_and_reports_the_rest(tmp_path):
    torch.manual_seed(0)
    pretrained = _Decoder(width=6, extra=False)
    pretrained.labels.add_(10)
    _save(pretrained, tmp_path / "pre.ckpt")
    fresh = _Decoder(width=8, extra=True)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = load_matching_weights(fresh, tmp_path / "pre.ckpt")
    assert report["loaded"] == ["labels", "shared.bias", "shared.weight"]
    assert report["shape_mismatch"] == {"head.bias": [[6], [8]], "head.weight": [[6, 3], [8, 3]]}
    assert report["not_in_checkpoint"] == ["extra.bias", "extra.weight"] and report["not_in_model"] == []
    for k in report["loaded"]:
        torch.testing.assert_close(fresh.state_dict()[k], pretrained.state_dict()[k])
    for k in ("head.weight", "extra.weight"):  # kept as initialised
        torch.testing.assert_close(fresh.state_dict()[k], before[k])
    json.dumps(report)  # saved with the run as init_from.json


def test_errors_name_init_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from: no checkpoint at"):
        load_matching_weights(_Decoder(6, False), tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="holds no decoder weights"):
        load_matching_weights(_Decoder(6, False), tmp_path / "other.ckpt")
    torch.save({"state_dict": {"decoder.shared.weight": torch.zeros(9, 9)}}, tmp_path / "shapes.ckpt")
    with pytest.raises(ValueError, match=r"no tensor of .* matches the configured decoder .*\(1 names match"):
        load_matching_weights(_Decoder(6, False), tmp_path / "shapes.ckpt")
