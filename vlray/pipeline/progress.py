"""One progress line for a run: rows done of total, images/s, errors, ETA.

On a terminal the line is redrawn in place every second; written to a file or a pipe (a log
collected by ``ray job logs``, CI) it is a new line every 30 s, so a long run leaves a few
hundred lines, not thousands. Pure Python: the driver feeds it the writers' counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import IO

TERMINAL_EVERY_S = 1.0
LOG_EVERY_S = 30.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(done: int, total: int, errors: int, elapsed: float, rate: float | None) -> str:
    """``done / total rows (pct)  R images/s  E errors  ETA m:ss``; ``rate`` None while no
    rate is known yet (the run is starting: Ray, actors, model loads)."""
    pct = f" ({100 * done // total}%)" if total else ""
    head = f"progress   {done:,} / {total:,} rows{pct}"
    if not rate:
        return f"{head}  {errors:,} errors  starting ({_clock(elapsed)} elapsed)"
    eta = max(0, total - done) / rate
    return f"{head}  {rate:,.0f} images/s  {errors:,} errors  ETA {_clock(eta)}"


class Progress:
    """The progress line of one run, written to ``stream`` by a background thread.

    Args:
        stream: Where the line goes (the terminal or the file stderr points at).
        tty: Redraw in place (else one line per ``LOG_EVERY_S``); default: ``stream.isatty()``.
        clock: Seconds (``time.monotonic``; tests pass their own).
    """

    def __init__(
        self,
        stream: IO[str],
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        self.total = 0
        self.done = 0
        self.errors = 0
        self._start = clock()
        self._first_at: float | None = None
        self._first_rows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False

    def begin(self, total: int) -> None:
        """Starts the clock and the line for ``total`` rows."""
        with self._lock:
            self.total, self.done, self.errors = total, 0, 0
            self._start, self._first_at = self.clock(), None
        self.draw()  # the total at once; then in place each second, or a line per 30 s
        every = TERMINAL_EVERY_S if self.tty else LOG_EVERY_S
        self._thread = threading.Thread(target=self._tick, args=(every,), daemon=True)
        self._thread.start()

    def add(self, rows: int, errors: int) -> None:
        """Counts a committed batch: ``rows`` processed, of which ``errors`` failed."""
        with self._lock:
            if self._first_at is None:  # the rate starts with the first batch, not Ray's start
                self._first_at, self._first_rows = self.clock(), rows
            self.done += rows
            self.errors += errors

    def line(self) -> str:
        """The current progress line; the rate counts the rows after the first batch (start-up
        excluded)."""
        with self._lock:
            now = self.clock()
            rate = None
            if self._first_at is not None and now > self._first_at:
                rate = (self.done - self._first_rows) / (now - self._first_at) or None
            return progress_line(self.done, self.total, self.errors, now - self._start, rate)

    def draw(self) -> None:
        """Writes the line now (in place on a terminal)."""
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        """Stops the line (a terminal's line is finished with a newline)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self.draw()
