"""Clean stops of the driver: SIGINT / SIGTERM, and a run lock lost to another run.

While a run is active, its main thread's SIGINT and SIGTERM handlers raise ``StopRequested``
(a ``BaseException``, so no ``except Exception`` on the way swallows it): the driver stops
consuming the Ray Data stream, shuts its Ray down, keeps what the writers committed, releases
the lock and exits 130 / 143 with one line. A second signal exits at once. Another thread (the
lock's heartbeat) stops the driver with ``interrupt``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequested(BaseException):
    """A stop signal arrived: raised in the driver's main thread by the handler."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = int(signum)


class RunStopped(RuntimeError):
    """The run was stopped by a signal; what its writers committed stays (a rerun resumes)."""

    def __init__(self, signum: int, rows: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)}: {rows} rows committed, rerun resumes")
        self.signum, self.rows = int(signum), rows
        self.exit_code = exit_code(signum)


class StopSignals:
    """Context manager: while active (in the main thread), SIGINT / SIGTERM raise StopRequested.

    ``install`` again after ``ray.init`` (it sets its own SIGTERM handler). ``hold`` defers
    stops over a short section that must not be cut (publishing files that go together).
    """

    def __init__(self) -> None:
        self._old: dict[int, object] = {}
        self._lock = threading.Lock()
        self._pending: BaseException | None = None
        self._stopping = False
        self._held = 0
        self._deferred: int | None = None
        self._outer: StopSignals | None = None
        self.active = False

    def __enter__(self) -> StopSignals:
        global _current
        self.install()
        if self.active:  # the main thread's run: the one signals reach
            self._outer, _current = _current, self
        return self

    def __exit__(self, *exc: object) -> None:
        global _current
        if _current is self:
            _current = self._outer
        self.restore()

    def install(self) -> None:
        """Installs (or puts back) the handlers; does nothing outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        with self._lock:
            for signum in STOP_SIGNALS:
                current = signal.getsignal(signum)
                if current != self._handle:
                    self._old.setdefault(signum, current)
                    signal.signal(signum, self._handle)
            self.active = True

    def restore(self) -> None:
        """Puts back the handlers found before ``install``."""
        with self._lock:
            self.active = False
            if threading.current_thread() is threading.main_thread():
                for signum, old in self._old.items():
                    signal.signal(signum, old)  # type: ignore[arg-type]
                self._old.clear()

    def interrupt(self, exc: BaseException) -> None:
        """Raises ``exc`` in the main thread soon (from any thread); ``check`` raises it too."""
        with self._lock:
            self._pending = exc
            if self.active and not self._stopping and threading.main_thread().ident:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def check(self) -> None:
        """Raises a pending ``interrupt`` (for loops that poll between blocking calls)."""
        exc, self._pending = self._pending, None
        if exc is not None:
            raise exc

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Defers stops until the end of the block."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._deferred is not None:
            signum, self._deferred = self._deferred, None
            self._stop(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._held:
            self._deferred = signum if self._deferred is None else self._deferred
            return
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        if self._pending is not None:
            self.check()
        if self._stopping:
            sys.stderr.write(
                f"stopped by {signal_name(signum)} again: exiting without cleanup, rerun resumes\n"
            )
            sys.stderr.flush()
            os._exit(exit_code(signum))
        self._stopping = True
        raise StopRequested(signum)


_current: StopSignals | None = None


@contextlib.contextmanager
def hold_stops() -> Iterator[None]:
    """``StopSignals.hold`` of the active run (nothing when none is active)."""
    if _current is None:
        yield
        return
    with _current.hold():
        yield
