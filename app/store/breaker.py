"""A circuit breaker for the cache endpoint.

Closed: operations go to Redis. One timeout or connection error opens it: operations skip Redis
entirely (no network time) and a background probe tries a PING after `reset_after` seconds,
doubling up to `reset_after_max`. When the probe succeeds, `on_recover` runs (it invalidates keys
that went stale meanwhile) and only then the breaker closes. Checking it costs one attribute read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

from ondemand.errors import error_text
from ondemand.health import OutageTracker
from ondemand.tasks import stop_tasks

log = logging.getLogger("ondemand.breaker")


class BreakerState(StrEnum):
    CLOSED = "closed"  # operations go to the cache
    HALF_OPEN = "half_open"  # a probe is running; operations still skip the cache
    OPEN = "open"  # operations skip the cache


CLOSED, HALF_OPEN, OPEN = BreakerState
_BREAKER_CAUSE = "breaker"  # its cause in the component's outage tracker


class CircuitBreaker:
    def __init__(
        self,
        *,
        probe: Callable[[], Awaitable[None]],
        on_recover: Callable[[], Awaitable[None]],
        health: OutageTracker,
        reset_after: float = 0.2,
        reset_after_max: float = 5.0,
        on_open: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.state = CLOSED
        self._on_open = on_open  # told as it opens (the near cache drops everything)
        self._on_close = on_close  # told as it closes, in the same step
        self.closed = True  # the hot-path check
        self._probe = probe
        self._on_recover = on_recover
        self.health = health
        self._reset_after = reset_after
        self._reset_after_max = reset_after_max
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.opened_at: float | None = None  # epoch seconds, for status
        self._opened_mono = 0.0
        self.opens = 0
        self.last_reason: str | None = None

    def failure(self, reason: str) -> None:
        """Record a timeout or connection error: open, and start probing in the background."""
        self.last_reason = reason = error_text(reason)
        if self.state != CLOSED:
            return
        self.state = OPEN
        self.closed = False
        self.opens += 1
        self.opened_at = time.time()
        self._opened_mono = time.monotonic()
        if self._on_open is not None:
            self._on_open()
        log.warning("cache breaker open: %s", reason)
        self.health.down(reason, cause=_BREAKER_CAUSE)
        self._task = asyncio.ensure_future(self._probe_until_closed())

    def probe_soon(self) -> None:
        """Something changed on the far side (a failover is complete): try the next probe after the first
        delay again instead of the backed-off one."""
        self._wake.set()

    async def _probe_until_closed(self) -> None:
        delay = self._reset_after
        while True:
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            if self._wake.is_set():  # probe_soon: from the first delay again
                self._wake.clear()
                delay = self._reset_after
                await asyncio.sleep(delay)
            self.state = HALF_OPEN
            try:
                await self._probe()
                await self._on_recover()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.state = OPEN
                self.last_reason = error_text(exc)
                delay = min(delay * 2, self._reset_after_max)
                continue
            down = time.monotonic() - self._opened_mono
            self.state = CLOSED
            self.closed = True
            if self._on_close is not None:
                self._on_close()
            self.opened_at = None
            self._task = None
            log.info("cache breaker closed after %.3f s", down)
            self.health.up(cause=_BREAKER_CAUSE)
            return

    def status(self) -> dict[str, object]:
        return {"state": self.state, "opened_at": self.opened_at, "opens": self.opens,
                "last_reason": self.last_reason}

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks(self._task)
            self._task = None
