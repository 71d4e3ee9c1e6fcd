"""Stopping background tasks is bounded, even when a task swallows its cancel (as Python 3.11's wait_for
can, under aiopg: the shutdown hang this module exists for)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ondemand.tasks import stop_tasks


async def test_a_task_that_swallows_one_cancel_is_cancelled_again() -> None:
    wake = asyncio.Event()
    swallowed = 0

    async def loop_like_ours() -> None:
        nonlocal swallowed
        while True:
            try:
                await wake.wait()
            except asyncio.CancelledError:  # what a lost cancel looks like from inside: back to waiting
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.ensure_future(loop_like_ours())
    await asyncio.sleep(0)
    started = time.monotonic()
    await stop_tasks(task, timeout=5)
    assert task.cancelled() and swallowed == 1
    assert time.monotonic() - started < 2


async def test_a_task_that_never_ends_is_given_up_at_the_deadline(caplog) -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ondemand.tasks"):
        await stop_tasks(task, None, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 1.5
    assert not task.done() and "still running" in caplog.text
    stop.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)


async def test_failures_and_finished_tasks_are_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed, finished = asyncio.ensure_future(fails()), asyncio.ensure_future(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await stop_tasks(failed, finished, timeout=1)
    assert isinstance(failed.exception(), RuntimeError)
