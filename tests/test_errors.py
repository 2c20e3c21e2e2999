"""User errors vs bugs: which exceptions the console scripts report as one line (exit 2) and which
keep their traceback (exit 1) — braindecode_fw.errors and braindecode_fw.cli.is_user_error."""

from __future__ import annotations

import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from braindecode_fw import cli, errors
from tests.conftest import TINY_MODEL, TINY_WORLD, run_cli


@pytest.mark.parametrize("kind, builtin", [
    (errors.ConfigError, ValueError), (errors.DataError, ValueError),
    (errors.MissingFileError, FileNotFoundError), (errors.UnknownNameError, KeyError),
    (errors.OutputExistsError, FileExistsError),
])
def test_each_user_error_is_still_the_builtin_it_replaced(kind, builtin):
    with pytest.raises(builtin):
        raise kind("x: expected y")
    assert cli.is_user_error(kind("x"))


def test_unknown_name_error_reads_as_its_message():
    # KeyError's str() is the quoted repr; the one-line report must not show quotes around it
    assert str(errors.UnknownNameError("no subject 'subj09'; subjects ['subj01']")) == \
        "no subject 'subj09'; subjects ['subj01']"


def _wrapped(inner: BaseException) -> InstantiationException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise InstantiationException("Error in call to target 'x.Y'") from e
    except InstantiationException as wrapper:
        return wrapper


def test_builtin_errors_from_the_code_are_bugs():
    # before: every ValueError/KeyError, from whichever line, was shown as a "user error"
    for exc in (ValueError("operands could not be broadcast"), KeyError("weight"), IndexError("3"),
                RuntimeError("shape mismatch"), TypeError("unsupported operand"), FileNotFoundError()):
        assert not cli.is_user_error(exc), exc


def test_wrapped_user_error_is_a_user_error_and_wrapped_bug_is_a_bug():
    assert cli.is_user_error(_wrapped(errors.ConfigError("model.hidden: expected > 0, got -1")))
    assert not cli.is_user_error(_wrapped(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    # a config node whose keys do not fit the target's signature (+model.foo=1)
    assert cli.is_user_error(_wrapped(TypeError("__init__() got an unexpected keyword argument 'foo'")))
    assert not cli.is_user_error(_wrapped(TypeError("unsupported operand type(s) for +: 'int' and 'str'")))


def test_implicit_context_does_not_make_a_bug_a_user_error():
    try:
        try:
            raise errors.DataError("a.npy: expected float32")
        except errors.DataError:
            raise RuntimeError("bug in the except block")  # noqa: B904 - the point of the test
    except RuntimeError as e:
        assert not cli.is_user_error(e)


def test_config_and_file_system_errors_are_user_errors(tmp_path):
    cfg = OmegaConf.create({"dataset": {"root": "???"}})
    with pytest.raises(MissingMandatoryValue) as info:
        _ = cfg.dataset.root
    assert cli.is_user_error(info.value)
    with pytest.raises(PermissionError) as info:
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "x.npy"))
    assert cli.is_user_error(info.value)


def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(tmp_path, monkeypatch):
    import braindecode_fw.tasks.train as train_module

    def broken(cfg):
        raise ValueError("operands could not be broadcast together with shapes (4,) (5,)")

    monkeypatch.setattr(train_module, "train", broken)
    proc = run_cli("bdf-train", [*TINY_WORLD, *TINY_MODEL, "logger=csv"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "operands could not be broadcast" in proc.stderr
    assert "bdf-train: internal error: ValueError is not a mistake in your input but a bug" in proc.stderr
    assert "bdf-train: error:" not in proc.stderr


def test_a_user_error_from_the_task_is_one_line(tmp_path, monkeypatch):
    import braindecode_fw.tasks.train as train_module

    def refuses(cfg):
        raise errors.DataError("subjects/subj01/responses.npy: expected float16 or float32, got int8")

    monkeypatch.setattr(train_module, "train", refuses)
    proc = run_cli("bdf-train", [*TINY_WORLD, *TINY_MODEL, "logger=csv"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bdf-")]
    assert lines == ["bdf-train: error: subjects/subj01/responses.npy: expected float16 or float32, got int8"]
    assert "Traceback" not in proc.stderr
