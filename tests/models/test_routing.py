"""subject_rows: the rows of one subject in a mixed batch, as an index tensor on the device."""

from __future__ import annotations

import pytest
import torch

from braindecode_fw.models.routing import subject_rows


def test_rows_of_each_subject_in_batch_order():
    subjects = ["s2", "s1", "s2", "s3", "s2"]
    rows = subject_rows(subjects, "s2", "cpu")
    assert rows.dtype == torch.long and rows.tolist() == [0, 2, 4]
    assert subject_rows(subjects, "s3", torch.device("cpu")).tolist() == [3]
    assert subject_rows(subjects, "absent", "cpu").numel() == 0
    # together the subjects' rows are the batch, each row once
    together = sorted(i for s in dict.fromkeys(subjects) for i in subject_rows(subjects, s, "cpu").tolist())
    assert together == list(range(len(subjects)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_rows_reach_the_gpu_through_pinned_memory():
    rows = subject_rows(["a", "b", "a"], "a", "cuda")
    assert rows.device.type == "cuda" and rows.cpu().tolist() == [0, 2]
