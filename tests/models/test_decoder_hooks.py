"""The optional hooks declared on Decoder (models/decoder.py): the defaults every decoder inherits,
and the new-subject hook bdf-adapt calls for a linear (ridge) adapter."""

import pytest
import torch
from torch import nn

from braindecode_fw.models.adapters import SubjectLinearAdapter, SubjectMLPAdapter
from braindecode_fw.models.decoder import Decoder


def _decoder(adapter=SubjectLinearAdapter) -> Decoder:
    return Decoder(adapter({"a": 5, "b": 4}, hidden=3), nn.Identity(), {"t": nn.Linear(3, 2)})


def test_default_hooks_do_nothing(tmp_path):
    dec = _decoder()
    dec.use_saved_artifacts(tmp_path)
    assert dec.save_artifacts(tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert dec.n_clusters is None and dec.has_clusters() and not dec.uses_voxel_coordinates
    assert dec.auxiliary_output_shapes() == {} and dec.export_trained_parts(tmp_path) == {}
    assert dec.generation_output("clip_image") == "clip_image"  # generators read the output of their name
    with pytest.raises(ValueError, match="Decoder has no voxel clusters to set"):
        dec.set_clusters({"a": torch.zeros(5, dtype=torch.long)})
    with pytest.raises(ValueError, match="Decoder does not place voxels by coordinates"):
        dec.set_voxel_coordinates("a", torch.zeros(5, 3))
    with pytest.raises(ValueError, match="adaptation.init: nearest_voxel is Brain-IT's transfer"):
        dec.nearest_voxel_init("c", None, {})


def test_add_subject_to_a_linear_adapter_copies_the_bias():
    dec = _decoder()
    assert dec.subject_adapter is dec.adapter and dec.linear_adapter is dec.adapter
    prefixes = dec.add_subject("c", 6, init_bias_from="b")
    assert prefixes == ["adapter.linears.c.", "adapter.embedders.c.", "adapter.mlps.c."]
    torch.testing.assert_close(dec.adapter.linears["c"].bias, dec.adapter.linears["b"].bias)
    assert dec.adapter.linears["c"].weight.shape == (3, 6)


def test_add_subject_without_a_linear_adapter_has_no_bias_to_copy():
    dec = _decoder(SubjectMLPAdapter)
    assert dec.linear_adapter is None
    with pytest.raises(ValueError, match="only a linear \\(ridge\\) adapter has a bias to copy"):
        dec.add_subject("c", 6, init_bias_from="b")
