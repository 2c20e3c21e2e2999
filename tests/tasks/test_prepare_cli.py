"""``bdf-prepare`` with a wrong type or range in a MindEye converter key: one line naming the key,
what was given and what was expected, exit code 2, nothing written (issue 25; the MindEye configs
are typed like NSD's: braindecode_fw/data/convert/mindeye.py MindEye2ConvertConfig)."""

from __future__ import annotations

import pytest

from tests.tasks.test_cli import _assert_one_line_error, _run


@pytest.mark.parametrize(("args", "needle"), [
    (["dataset=mindeye2", "dataset.chunk_rows=abc"], "dataset.chunk_rows: expected an integer, got 'abc'"),
    (["dataset=mindeye2", "dataset.chunk_rows=0"], "dataset.chunk_rows: expected an integer >= 1, got 0"),
    (["dataset=mindeye2", "dataset.val_fraction=1.5"], "dataset.val_fraction: expected a number >= 0 and < 1, got 1.5"),
    (["dataset=mindeye2", "dataset.subjects=[9]"], "dataset.subjects: 9 is not an NSD subject (1..8 or subj01..subj08)"),
    (["dataset=mindeye1_avg", "dataset.image_size=big"], "dataset.image_size: expected an integer, got 'big'"),
    (["dataset=mindeye1_avg", "dataset.layout=zip"], "dataset.layout: 'zip' is not one of ['auto', 'tar', 'extracted']"),
])
def test_mindeye_config_errors_name_the_key(tmp_path, args, needle):
    store = tmp_path / "store"
    proc = _run("bdf-prepare", [*args, f"dataset.store={store}", f"dataset.root={tmp_path}"], tmp_path)
    _assert_one_line_error(proc, "bdf-prepare: error:", needle)
    assert "Traceback" not in proc.stderr
    assert not store.exists() and not list(tmp_path.glob("store.*"))
