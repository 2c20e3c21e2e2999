"""The quiet console (ops/console.py, conf/hydra/job_logging/bdf.yaml) and the progress of long
steps (ops/progress.py)."""

from __future__ import annotations

import logging
import warnings

import pytest

from braindecode_fw.ops.console import ConsoleFilter, route_library_logging
from braindecode_fw.ops.progress import Progress


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", (), None)


@pytest.mark.parametrize(("name", "level", "shown"), [
    ("braindecode_fw.pipeline.fitting", logging.INFO, True),
    ("braindecode_fw", logging.DEBUG, True),
    ("root", logging.INFO, False),  # open_clip logs its model parsing on the root logger
    ("lightning.pytorch.utilities.rank_zero", logging.INFO, False),
    ("lightning.pytorch.utilities.rank_zero", logging.WARNING, True),
    ("braindecode_fw_other", logging.INFO, False),  # a prefix is not the package
    ("diffusers.pipelines", logging.ERROR, True),
])
def test_console_shows_own_info_and_every_warning(name, level, shown):
    assert ConsoleFilter().filter(_record(name, level)) is shown


def test_lightning_lines_reach_the_job_handlers_once():
    """Lightning attaches its own stream handler when imported before logging is configured; after
    routing, its records reach the root handlers (console filter, log file) and nothing else."""
    lightning_logger = logging.getLogger("lightning.pytorch")
    own = logging.StreamHandler()
    lightning_logger.addHandler(own)
    lightning_logger.propagate = False
    caught: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record):
            caught.append(record)

    root_handler = Catch()
    logging.getLogger().addHandler(root_handler)
    try:
        route_library_logging()
        assert own not in lightning_logger.handlers and lightning_logger.propagate
        logging.getLogger("lightning.pytorch.utilities.rank_zero").warning("GPU available: False")
        assert [r.getMessage() for r in caught] == ["GPU available: False"]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            route_library_logging()
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning,
                          stacklevel=1)
            warnings.warn("something else is deprecated", DeprecationWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == ["something else is deprecated"]
    finally:
        logging.getLogger().removeHandler(root_handler)


def test_progress_logs_lines_with_time_left_outside_a_terminal(caplog):
    logger = logging.getLogger("braindecode_fw.test_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with Progress(4, "targets clip", unit="images", logger=logger, every_s=0.0, terminal=False) as p:
            for _ in range(4):
                p.update()
    # one line per update before the end (the last update prints nothing: the step's own summary follows)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "targets clip: 1/4 images (25%)", "targets clip: 2/4 images (50%)", "targets clip: 3/4 images (75%)"]
    assert "s left" in caplog.records[0].getMessage()
    assert Progress(10, "x", terminal=False).line(30.0) == "x: 0/10 items (0%), 30 s"
    done = Progress(10, "x", terminal=False)
    done.done = 5
    assert done.line(30.0) == "x: 5/10 items (50%), 30 s, about 30 s left"


def test_progress_is_silent_for_short_steps_and_when_disabled(caplog):
    logger = logging.getLogger("braindecode_fw.test_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with Progress(3, "quick", logger=logger, terminal=False) as p:  # every_s=15: nothing in a short step
            p.update(3)
        with Progress(3, "off", logger=logger, every_s=0.0, enabled=False, terminal=False) as p:
            p.update(1)
    assert caplog.records == []
