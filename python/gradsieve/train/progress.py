"""Progress of a training run on rank 0: a tqdm bar on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns, which fills a log file or a pipe with frames; when
stderr is not a terminal, :class:`Progress` prints one line every tenth of the run (and at least
every ``line_seconds``) instead.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO


class Progress:
    """``update(n, **shown)`` after each step, ``close(**shown)`` at the end.

    Args:
        total: steps in the run.
        label: what is running (the compressor).
        stream: where to write (default ``sys.stderr``).
        line_seconds: in line mode, the longest wait between two lines.
    """

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None,
                 line_seconds: float = 30.0) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.line_seconds = line_seconds
        self.done = 0
        self.shown: dict = {}
        self.started = time.perf_counter()
        self._last_line = self.started
        self._last_step = 0
        self._printed: dict = {}
        self._bar = None
        if _is_terminal(self.stream):
            from tqdm import tqdm

            # tqdm's default lock is a multiprocessing lock: a semaphore that a worker leaving
            # through os._exit never unlinks ("leaked semaphore objects" at exit).
            tqdm.set_lock(threading.RLock())
            self._bar = tqdm(total=total, desc=f"{label:>12}", unit="step", leave=True, dynamic_ncols=True,
                             file=self.stream)

    def update(self, n: int = 1, **shown: str) -> None:
        self.done += n
        if shown:
            self.shown = shown
        if self._bar is not None:
            self._bar.update(n)
            if shown:
                self._bar.set_postfix(**shown)
            return
        now = time.perf_counter()
        every = max(1, self.total // 10)
        if self.done // every > self._last_step // every or now - self._last_line >= self.line_seconds:
            self._line(now)

    def _line(self, now: float) -> None:
        self._last_line, self._last_step, self._printed = now, self.done, dict(self.shown)
        extra = "".join(f", {k} {v}" for k, v in self.shown.items())
        print(f"{self.label}: step {self.done}/{self.total}{extra} ({now - self.started:.1f} s)",
              file=self.stream, flush=True)

    def close(self, **shown: str) -> None:
        if shown:
            self.shown = shown
        if self._bar is not None:
            if shown:
                self._bar.set_postfix(**shown)
            self._bar.close()
            return
        if self._last_step != self.done or self._printed != self.shown:
            self._line(time.perf_counter())


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
