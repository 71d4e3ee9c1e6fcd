"""Health: one outage tracker per component (down since when, why, up again; the degraded and recovered
events), and the helper a storage composes to report its state and outages (StoreHealth).

Several parts of the service can see one component fail: for Redis, the lifecycle state machine (a
server that will not start or died) and the cache's circuit breaker (commands that time out). They
share the component's tracker, each as a `cause`: the component is degraded from the first cause that
reports it down until the last one reports it up, and that is one outage, one `ondemand_degraded` and
one `ondemand_recovered` event.
"""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from typing import Any

import attrs

from ondemand.errors import error_text
from ondemand.events import Events


@attrs.define(eq=False)
class OutageTracker:
    component: str  # "redis", or a durable storage's name ("postgres", "sqlite")
    events: Events
    outages: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # epoch seconds
    _causes: dict[str, str] = attrs.field(factory=dict)  # cause -> reason, while down
    _down_since: float | None = None  # monotonic
    _down_since_wall: float | None = None  # epoch seconds

    @classmethod
    def quiet(cls, component: str) -> OutageTracker:
        """A tracker whose events are only logged (an object used outside a Runtime)."""
        return cls(component, Events())

    @property
    def degraded(self) -> bool:
        return bool(self._causes)

    @property
    def down_since(self) -> float | None:
        """Epoch seconds when the current outage began, or None while up."""
        return self._down_since_wall

    def down(self, reason: str | BaseException, *, cause: str = "") -> None:
        """Record a failure; the first one of an outage emits `degraded`."""
        text = error_text(reason)
        self.last_error, self.last_error_at = text, time.time()
        first = not self._causes
        self._causes[cause] = text
        if first:
            self.outages += 1
            self._down_since, self._down_since_wall = time.monotonic(), self.last_error_at
            self.events.degraded(component=self.component, reason=text)

    def up(self, *, cause: str = "") -> None:
        """`cause` serves again; when no cause is left down, the outage ends and `recovered` is emitted."""
        if self._causes.pop(cause, None) is None or self._causes:
            return
        down = time.monotonic() - (self._down_since or time.monotonic())
        self._down_since = self._down_since_wall = None
        self.events.recovered(component=self.component, down_seconds=round(down, 3))

    def status(self) -> dict[str, Any]:
        return {
            "degraded": self.degraded,
            "degraded_since": self._down_since_wall,
            "causes": sorted(self._causes),
            "outages": self.outages,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


class StoreState(StrEnum):
    """What a storage reports as its `status()["state"]`."""

    STOPPED = "stopped"  # not started yet (an embedded server starts on first use)
    STARTING = "starting"
    UP = "up"
    DOWN = "down"


@attrs.define(eq=False)
class StoreHealth:
    """What a storage reports about itself, in one place: its StoreState since when, and each failure or
    success to the outage tracker of the component it serves as (readiness and the degraded/recovered
    events come from there), with one log line per transition. A storage composes one:

        self.store_health = StoreHealth(context.health, "PostgreSQL storage")
    """

    tracker: OutageTracker
    label: str  # names the storage in log lines
    state: StoreState = StoreState.STOPPED
    since: float = attrs.field(factory=time.time)  # epoch seconds of the last state change
    log: logging.Logger = attrs.field(factory=lambda: logging.getLogger("ondemand.storage"))

    @property
    def degraded(self) -> bool:
        return self.tracker.degraded

    def set_state(self, state: StoreState) -> None:
        if self.state is not state:
            self.state, self.since = state, time.time()

    def failed(self, message: str) -> None:
        """An operation failed because the store could not serve it (not for a caller's bad input)."""
        if not self.tracker.degraded:
            self.log.warning("%s degraded: %s", self.label, message)
        self.tracker.down(message)
        self.set_state(StoreState.DOWN)

    def succeeded(self) -> None:
        """An operation reached the store: it serves."""
        if self.state is StoreState.UP:
            return
        if self.tracker.degraded:
            self.log.info("%s recovered", self.label)
        self.tracker.up()
        self.set_state(StoreState.UP)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "last_error": self.tracker.last_error,
                "last_error_at": self.tracker.last_error_at}
