"""Stopping our background tasks: cancelled, waited for, bounded.

One cancel is not always enough. Python 3.11's `asyncio.wait_for` returns the inner result and drops the
cancellation when both land in one loop iteration (CPython gh-86296), and aiopg waits on every statement
with it: a task cancelled at that moment carries on (back to its loop, waiting on its next wake-up) and a
plain `task.cancel(); await task` waits forever. So the cancel is repeated while the task lives, and the
wait ends at a deadline whatever the task does.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("ondemand.tasks")

RECANCEL_EVERY = 0.5  # seconds a cancelled task has to finish its own clean-up before it is cancelled again


async def stop_tasks(*tasks: asyncio.Future[object] | None, timeout: float = 10.0) -> None:
    """Cancel `tasks` (None and finished ones are skipped) and wait up to `timeout` s for them to end,
    cancelling again any that swallowed the cancel. Their exceptions are retrieved (logged, never raised):
    a background task's failure is reported where it happens. A task alive at the deadline is left to the
    loop's shutdown, with a warning naming it."""
    pending = {task for task in tasks if task is not None and not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("background task(s) still running %g s after being cancelled: %s", timeout,
                        ", ".join(repr(task) for task in pending))
            return
        _, pending = await asyncio.wait(pending, timeout=min(remaining, RECANCEL_EVERY))
    for task in tasks:
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("background task %r ended with %r", task, task.exception())
