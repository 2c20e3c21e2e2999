"""The reconstruction folder (bdf-reconstruct -> bdf-evaluate): round trip, resume, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from braindecode_fw.data.reconstructions import ReconstructionWriter, open_reconstructions


def _writer(root, version="v1"):
    return ReconstructionWriter(root, store="/data/store", dataset_version=version, test_set="synthetic",
                                generator={"name": "tiny"})


def test_round_trip_and_resume(tmp_path):
    w = _writer(tmp_path)
    img = np.full((16, 16, 3), 7, dtype=np.uint8)
    w.add("subj01", 5, "img5", img, sample=0, seed=11, lowlevel=img)
    w.add("subj01", 2, "img2", img, sample=0, seed=12)
    w.add("subj01", 2, "img2", img, sample=1, seed=13)
    w.add_embeddings("subj01", torch.ones(2, 4), torch.zeros(2, 4))
    w.flush()
    recs = open_reconstructions(tmp_path)
    assert recs.subjects == ["subj01"]
    items = recs.select("subj01", sample=0)
    assert [i.image_index for i in items] == [2, 5] and items[1].lowlevel_path == "subj01/lowlevel/img5.png"
    assert items[1].seed == 11 and len(recs.select("subj01", sample=1)) == 1
    assert torch.equal(recs.embeddings("subj01")["pred"], torch.ones(2, 4))
    again = _writer(tmp_path)  # reopening resumes: done items are known
    assert again.has("subj01", 5, 0) and again.has("subj01", 2, 1) and not again.has("subj02", 5, 0)
    with pytest.raises(ValueError, match="written for dataset version v1, now v2"):
        _writer(tmp_path, version="v2")


def test_validation_names_file_and_field(tmp_path):
    w = _writer(tmp_path)
    w.add("subj01", 1, "a", np.zeros((8, 8, 3), dtype=np.uint8))
    w.flush()
    (tmp_path / "subj01" / "final" / "a_s0.png").unlink()
    with pytest.raises(ValueError, match=r"manifest.json: items\[0\]: file subj01/final/a_s0.png does not exist"):
        open_reconstructions(tmp_path)
    meta = json.loads((tmp_path / "manifest.json").read_text())
    meta["format"] = "something-else"
    (tmp_path / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format is 'something-else'"):
        open_reconstructions(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_reconstructions(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"expected a uint8 \(h, w, 3\) image"):
        w.add("subj01", 2, "b", np.zeros((8, 8), dtype=np.uint8))
