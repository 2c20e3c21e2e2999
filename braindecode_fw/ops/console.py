"""A quiet, informative console for the ``bdf-*`` commands.

The console shows the framework's own INFO lines and every warning; the INFO lines of libraries
(Lightning's device report and tips, open_clip's model parsing on the root logger, diffusers) go to
the run's log file only (``braindecode_fw/conf/hydra/job_logging/bdf.yaml``).
"""

from __future__ import annotations

import logging
import warnings

FIRST_PARTY = ("braindecode_fw", "__main__")

# Deprecation warnings raised inside libraries, about their own use of another library; nothing a
# user of ours can act on (each line: the message pattern and why it is silenced).
LIBRARY_DEPRECATIONS = (
    # lightning's _pytree helper on torch >= 2.5; fixed upstream, harmless until then
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class ConsoleFilter(logging.Filter):
    """Passes warnings and errors of every logger and INFO/DEBUG lines of the framework's own
    loggers (``braindecode_fw.*``); other INFO lines stay in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name.split(".", 1)[0] in FIRST_PARTY


def route_library_logging() -> None:
    """Send the libraries' log records through the job's handlers, once each: Lightning attaches
    its own console handler when it is imported before logging is configured (our pre-checks
    import it), which printed its lines twice (diffusers: :func:`route_diffusers_logging`, when a
    pipeline is loaded).
    Known library deprecation warnings are silenced (:data:`LIBRARY_DEPRECATIONS`)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for pattern in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=pattern)


def route_diffusers_logging() -> None:
    """diffusers' warnings through the job's handlers (its own stderr handler removed), and no
    loading bars outside a terminal, where each redraw would become a log line."""
    import sys

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_default_handler()
    diffusers_logging.enable_propagation()
    if not sys.stderr.isatty():
        diffusers_logging.disable_progress_bar()
