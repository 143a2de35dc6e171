"""Keeps the known spurious lines of Ray and transformers off a run's stderr (``-v`` shows them).

Only named messages go: Ray's token-auth notice, Ray Data's start / finish notices (its
progress is replaced by vlray's own line), transformers' special-token
check on configs whose text tower has a smaller vocabulary than its default token ids, the
"Loading weights" bars forwarded from the workers, faiss' optional-library probe, and Ray's
core-worker notice that Ray Data's own actor arguments live in the object store (written by
C++ straight to file descriptor 2, hence a line filter on the descriptor). Real warnings and
errors pass through unchanged; Ray Data's full log stays in its session folder.
"""

from __future__ import annotations

import logging
import os
import re
import select
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

SPURIOUS_LINES = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object "
    rb"store and max_restarts > 0"
    rb"|Model config: \w+_token_id must be `None` or an integer within the vocabulary"
    rb"|Loading weights: +\d+%\|"
    rb"|INFO streaming_executor\.py:\d+ -- "
    rb"|WARNING __init__\.py:\d+ -- Progress bars disabled\. To enable"
)
"""Lines dropped from stderr (also when forwarded from a worker, ``(MapWorker pid=N)`` first)."""

QUIET_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "faiss.loader": logging.WARNING,
}
"""Loggers whose messages below the level are notices, not problems, for a run's reader."""


class _TokenIdNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not SPURIOUS_LINES.search(record.getMessage().encode(errors="replace"))


def quiet_loggers() -> None:
    """Raises the named loggers' levels and drops transformers' special-token notice."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    config_logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _TokenIdNotice) for f in config_logger.filters):
        config_logger.addFilter(_TokenIdNotice())


class StderrFilter:
    """Copies file descriptor 2 to where it pointed before, without the lines matching
    ``pattern``. ``terminal`` writes there directly (a progress line that must not wait for a
    newline). Lines are passed on as they arrive; a partial line with a carriage return (a
    progress bar) is passed on at once unless it matches."""

    def __init__(self, pattern: re.Pattern[bytes] = SPURIOUS_LINES) -> None:
        self.pattern = pattern
        self._saved = -1
        self._read = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.terminal: IO[str] = sys.stderr

    def start(self) -> StderrFilter:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.terminal = os.fdopen(os.dup(self._saved), "w", buffering=1, closefd=True)
        self._thread = threading.Thread(target=self._pump, name="vlray-stderr", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Restores file descriptor 2 and passes on what is still in the pipe."""
        if self._thread is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # the pipe's last writer here; children may still hold it
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._thread = None
        self.terminal.flush()
        self.terminal.close()
        os.close(self._saved)
        os.close(self._read)

    def _pump(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self._read], [], [], 0.05)
            if not ready:
                if self._stop.is_set():
                    break
                continue
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                break
            pending = self._pass_on(pending + chunk)
        if pending and not self.pattern.search(pending):
            os.write(self._saved, pending)

    def _pass_on(self, data: bytes) -> bytes:
        *lines, rest = data.split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not self.pattern.search(line))
        if b"\r" in rest and not self.pattern.search(rest):
            kept, rest = kept + rest, b""
        if kept:
            os.write(self._saved, kept)
        return rest


@contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[IO[str]]:
    """Filters this process's stderr while inside (when ``enabled``); yields the stream for
    a progress line (the unfiltered terminal or file stderr pointed at)."""
    if not enabled:
        yield sys.stderr
        return
    quiet_loggers()
    try:  # a descriptor-level filter needs POSIX pipes and a usable stderr
        filtered = StderrFilter().start() if os.name == "posix" else None
    except (OSError, AttributeError, ValueError):  # stderr closed or None
        filtered = None
    if filtered is None:
        yield sys.stderr
        return
    try:
        yield filtered.terminal
    finally:
        filtered.stop()
