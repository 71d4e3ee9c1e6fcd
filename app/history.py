"""The status history: a small ring buffer of the service's counters and health, sampled by the Runtime.

Why the server keeps it: the status page draws operations and hit ratio over the last minutes, and a page
opened in the middle of an incident must show what led to it, not only what it sees from then on. One
sample every `server.history_interval` seconds for the last `server.history_seconds` (120 samples by
default), each a few numbers: counters are cumulative (the page draws their differences, as it does
with its own polls), states are as they were at that moment. Served by `GET /api/cache/history`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from ondemand.tasks import stop_tasks


@attrs.define(eq=False)
class StatusHistory:
    interval: float  # seconds between samples
    seconds: float  # how far back samples are kept
    _samples: deque[dict[str, Any]] = attrs.field(init=False)
    _task: asyncio.Task[None] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._samples = deque(maxlen=max(1, math.ceil(self.seconds / self.interval)) + 1)

    def add(self, sample: dict[str, Any]) -> None:
        self._samples.append(sample)

    def start(self, take: Callable[[], dict[str, Any]]) -> None:
        """Sample now and every `interval` seconds until `close`."""
        self.add(take())

        async def run() -> None:
            while True:
                await asyncio.sleep(self.interval)
                self.add(take())

        self._task = asyncio.ensure_future(run())

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks(self._task)
            self._task = None

    def to_json(self) -> dict[str, Any]:
        return {"interval": self.interval, "seconds": self.seconds, "now": round(time.time(), 3),
                "samples": list(self._samples)}
