"""A cap on concurrent image decodes: each decode holds a slot; a request waits a bounded time.

An uploaded image decodes to up to ``max_pixels * 3`` bytes (150 MB at the default limit) plus
its resized copies, so unbounded concurrent uploads can take the host's memory. The slots are
loop-agnostic (a lock-protected counter polled with short sleeps), so one app may serve from
several event loops (``TestClient``, Ray Serve replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator

_POLL_S = (0.002, 0.05)  # first and longest sleep between tries


class SlotsBusy(Exception):
    """No slot came free within the wait (or too many requests are already waiting)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("too many image searches in progress")
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        """The ``Retry-After`` header of the 503 answer (at least one second)."""
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class DecodeSlots:
    """At most ``size`` holders at once; others wait up to ``wait_s``, at most ``max_waiting``."""

    def __init__(self, size: int, wait_s: float, max_waiting: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.wait_s = max(0.0, wait_s)
        self.max_waiting = 4 * size if max_waiting is None else max_waiting
        self._lock = threading.Lock()
        self.in_use = 0
        self.waiting = 0

    def _try_take(self) -> bool:
        with self._lock:
            if self.in_use < self.size:
                self.in_use += 1
                return True
            return False

    def _release(self) -> None:
        with self._lock:
            self.in_use -= 1

    async def _take(self) -> None:
        if self._try_take():
            return
        with self._lock:
            if self.waiting >= self.max_waiting or self.wait_s == 0:
                raise SlotsBusy(max(self.wait_s, 1.0))
            self.waiting += 1
        try:
            deadline = time.monotonic() + self.wait_s
            pause = _POLL_S[0]
            while not self._try_take():
                if time.monotonic() >= deadline:
                    raise SlotsBusy(max(self.wait_s, 1.0))
                await asyncio.sleep(pause)
                pause = min(pause * 2, _POLL_S[1])
        finally:
            with self._lock:
                self.waiting -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Holds one slot for the block.

        Raises:
            SlotsBusy: none came free in time.
        """
        await self._take()
        try:
            yield
        finally:
            self._release()
