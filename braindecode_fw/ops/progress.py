"""Progress of the steps that take long (world generation, target encoding, reconstruction): a
bar on a terminal, otherwise a log line at most every ``every_s`` seconds, so that the log of a
batch job (SLURM, CI, ``nohup``) shows the step is alive and how long it has left."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

log = logging.getLogger(__name__)


class Progress:
    """``with Progress(total, "targets clip_image", unit="images") as bar: ... bar.update(n)``.

    On a terminal (stderr is a tty) a tqdm bar, removed when done; elsewhere INFO lines on
    ``logger`` such as ``targets clip_image: 4096/14700 images (28%), 15 s, about 39 s left``, the
    first after ``every_s`` seconds (a step shorter than that prints nothing). ``enabled=False``
    shows nothing.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "items", logger: logging.Logger | None = None,
                 every_s: float = 15.0, enabled: bool = True, terminal: bool | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.logger = logger or log
        self.every_s = float(every_s)
        self.done = 0
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        self._enabled = enabled
        if enabled and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=f" {unit}", leave=False)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self._enabled and now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            self.logger.info("%s", self.line(now - self._t0))

    def line(self, elapsed: float) -> str:
        """The log line after ``elapsed`` seconds with :attr:`done` of :attr:`total` finished."""
        share = self.done / self.total if self.total else 1.0
        left = f", about {elapsed / share - elapsed:.0f} s left" if 0 < share < 1 else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit} ({share:.0%}), {elapsed:.0f} s{left}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
