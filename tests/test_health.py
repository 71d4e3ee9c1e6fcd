"""One outage, one pair of events: the OutageTracker and the Redis outage seen by two parts of the service."""

from __future__ import annotations

import os
import signal
from typing import Any

from ondemand import Runtime, hookimpl
from ondemand.errors import MAX_ERROR_CHARS, SpawnError, error_text
from ondemand.events import Events
from ondemand.health import OutageTracker
from tests.support import wait_for


class RecordingEvents(Events):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def _emit(self, hook_name: str, **fields: Any) -> None:
        self.seen.append((hook_name.removeprefix("ondemand_"), fields))


def test_an_outage_lasts_from_the_first_cause_down_to_the_last_one_up() -> None:
    events = RecordingEvents()
    tracker = OutageTracker("redis", events)
    assert not tracker.degraded and tracker.down_since is None
    tracker.down("server died", cause="server")
    tracker.down(TimeoutError("no answer\nlog tail"), cause="breaker")
    assert tracker.degraded and tracker.down_since is not None
    assert tracker.last_error == "no answer\nlog tail"  # every line: the log tail is the reason
    tracker.up(cause="server")
    assert tracker.degraded, "the breaker still holds the outage"
    tracker.up(cause="server")  # an up for a cause that is not down changes nothing
    tracker.up(cause="breaker")
    assert not tracker.degraded and tracker.outages == 1
    assert [name for name, _ in events.seen] == ["degraded", "recovered"]
    assert events.seen[0][1] == {"component": "redis", "reason": "server died"}
    assert events.seen[1][1]["down_seconds"] >= 0
    tracker.up(cause="breaker")  # nothing is down: no second recovery
    assert len(events.seen) == 2


def test_errors_keep_every_line_bounded_in_length() -> None:
    """A degraded event, last_error and everything read from them keep the whole error (a list of the binaries
    tried, a log tail), never only its first line; a runaway message is cut in its middle, so what failed
    (the start) and the last log lines (the end) both stay."""
    events = RecordingEvents()
    tracker = OutageTracker("redis", events)
    reason = SpawnError("no usable redis-server or valkey-server; tried:\n  - PATH: not found\n  - wheel: too old")
    tracker.down(reason)
    assert tracker.last_error == str(reason)
    assert events.seen[0][1]["reason"] == str(reason)
    long = "redis-server exited; last lines of redis.log:\n" + "\n".join(f"line {i}" for i in range(5000))
    text = error_text(long)
    assert len(text) <= MAX_ERROR_CHARS
    assert text.startswith("redis-server exited; last lines of redis.log:\nline 0\n")
    assert text.endswith("line 4999") and "cut: " in text
    assert error_text(TimeoutError()) == "TimeoutError"


async def test_a_frozen_redis_is_one_outage_of_one_component(make_config) -> None:
    seen: list[tuple[str, str]] = []

    class Observer:
        @hookimpl
        def ondemand_degraded(self, component: str, reason: str) -> None:
            seen.append(("degraded", component))

        @hookimpl
        def ondemand_recovered(self, component: str, down_seconds: float) -> None:
            seen.append(("recovered", component))

    async with Runtime(make_config(), plugins=[Observer()]) as rt:
        await rt.cache.cache_profile("p", {"v": 1})
        pid = rt.on_demand.lifecycle.pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(3):
                await rt.cache.get_profile("p")  # times out, opens the breaker; then skips Redis
            assert rt.redis_health.degraded
            assert rt.status()["redis"]["degraded_since"] is not None
            assert rt.readiness().redis_ok is False
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: rt.dispatcher.breaker.closed, timeout=5)
        assert not rt.redis_health.degraded
        assert rt.readiness().state == "ready"
    assert seen == [("degraded", "redis"), ("recovered", "redis")]


async def test_a_killed_redis_seen_by_the_server_watch_and_the_breaker_is_one_outage(make_config) -> None:
    events: list[tuple[str, str]] = []

    class Observer:
        @hookimpl
        def ondemand_degraded(self, component: str, reason: str) -> None:
            events.append(("degraded", component))

        @hookimpl
        def ondemand_recovered(self, component: str, down_seconds: float) -> None:
            events.append(("recovered", component))

    config = make_config({"lifecycle": {"restart_backoff": 0.05}})
    async with Runtime(config, plugins=[Observer()]) as rt:
        await rt.cache.cache_profile("p", {"v": 1})
        os.kill(rt.on_demand.lifecycle.pid(), signal.SIGKILL)
        await wait_for(lambda: rt.on_demand.state == "failed", timeout=5)  # the exit is noticed at once
        assert await rt.cache.get_profile("p") is None  # a miss: the breaker opens, Redis restarts behind it
        await wait_for(lambda: rt.dispatcher.breaker.closed and rt.on_demand.state == "running", timeout=5)
        await rt.cache.cache_profile("p", {"v": 2})
        assert await rt.cache.get_profile("p") == {"v": 2}
    assert events == [("degraded", "redis"), ("recovered", "redis")]
