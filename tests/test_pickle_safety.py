"""No file the framework reads can run code: a crafted checkpoint (a pickle whose objects call a
function when rebuilt) is refused at every entry point with an error naming the config key and the
file, whatever torch's ``weights_only`` default; NSD's caption file (an object array) is read
without unpickling anything but arrays of strings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


class _Trap:
    """Unpickling this creates the file ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code_was_run"
    path = tmp_path / "crafted.ckpt"
    torch.save({"braindecode_fw": {"config": {}}, "state_dict": {"decoder.w": torch.zeros(1)},
                "payload": _Trap(marker)}, path)
    yield path
    assert not marker.exists(), "loading the crafted file executed code"


def test_checkpoint_loaders_refuse_a_crafted_pickle(crafted):
    from braindecode_fw.ops.resume import AtomicCheckpointIO
    from braindecode_fw.ops.warm_start import load_matching_weights
    from braindecode_fw.pipeline.checkpoint import load_checkpoint

    # bdf-evaluate / bdf-reconstruct / bdf-adapt ckpt=, bdf-train's test-time reload
    with pytest.raises(ValueError, match=rf"^ckpt: {crafted} is not a readable checkpoint of tensors \(UnpicklingError"):
        load_checkpoint(crafted)
    # bdf-train ckpt_path= (Lightning's resume goes through our CheckpointIO)
    with pytest.raises(ValueError, match=rf"^ckpt_path: {crafted} is not a readable checkpoint"):
        AtomicCheckpointIO().load_checkpoint(crafted)
    # bdf-train init_from=
    with pytest.raises(ValueError, match=rf"^init_from: {crafted} is not a readable checkpoint"):
        load_matching_weights(nn.Linear(1, 1), crafted)


def test_truncated_checkpoint_is_named(tmp_path):
    from braindecode_fw.pipeline.checkpoint import load_checkpoint

    good = tmp_path / "good.ckpt"
    torch.save({"braindecode_fw": {}, "state_dict": {"decoder.w": torch.randn(64, 64)}}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"^ckpt: {cut} is not a readable checkpoint of tensors"):
        load_checkpoint(cut)
    assert set(load_checkpoint(good)) == {"braindecode_fw", "state_dict"}


def test_bdf_evaluate_refuses_a_crafted_checkpoint_in_one_line(crafted, tmp_path):
    from tests.conftest import run_cli

    r = run_cli("bdf-evaluate", [f"ckpt={crafted}"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"ckpt: {crafted} is not a readable checkpoint of tensors" in r.stderr
    assert "Traceback" not in r.stderr


def test_caption_object_array_is_read_without_running_code(tmp_path):
    from braindecode_fw.data.convert.common import load_string_array

    caps = np.array([["a cat on a mat", "", "a cat"], ["two dogs", "dogs", "a park"]], dtype=object)
    np.save(tmp_path / "caps.npy", caps, allow_pickle=True)
    np.testing.assert_array_equal(load_string_array(tmp_path / "caps.npy"), caps)
    plain = np.array([["a", "b"]])
    np.save(tmp_path / "plain.npy", plain)
    np.testing.assert_array_equal(load_string_array(tmp_path / "plain.npy"), plain)

    marker = tmp_path / "code_was_run"
    np.save(tmp_path / "crafted.npy", np.array([_Trap(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"crafted.npy: not a plain array of strings \(UnpicklingError: refusing io.open"):
        load_string_array(tmp_path / "crafted.npy")
    assert not marker.exists()
