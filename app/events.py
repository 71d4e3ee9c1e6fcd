"""Events: one typed method per observer hook, so a mistyped event is an AttributeError at our call site.

Each event is logged (the `ondemand.events` logger, with the fields as structured data) and handed to
the plugins' observer hooks. An observer that raises is logged and ignored: a plugin's bug must not
disturb the service. Our own mistakes (a wrong field name) are not hidden that way: pluggy checks the
arguments against the hookspec before any observer runs, and that error propagates.
"""

from __future__ import annotations

import logging
from typing import Any

import pluggy

log = logging.getLogger("ondemand.events")


class Events:
    def __init__(self, hook: pluggy.HookRelay | None = None) -> None:
        self._hook = hook  # None: log only (objects built without a plugin manager, as in some tests)

    def _emit(self, hook_name: str, **fields: Any) -> None:
        event = hook_name.removeprefix("ondemand_")
        log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()),
                 extra={"event": event, "fields": fields})
        if self._hook is None:
            return
        caller: pluggy.HookCaller = getattr(self._hook, hook_name)
        spec = caller.spec
        if spec is not None and set(fields) != set(spec.argnames):
            raise TypeError(f"{hook_name} takes {sorted(spec.argnames)}, emitted with {sorted(fields)}")
        try:
            caller(**fields)
        except Exception:
            log.exception("a plugin's %s hook raised; ignored", hook_name)

    def redis_spawned(self, *, lifecycle: str, pid: int, endpoint: str) -> None:
        self._emit("ondemand_redis_spawned", lifecycle=lifecycle, pid=pid, endpoint=endpoint)

    def redis_ready(self, *, lifecycle: str, pid: int | None, endpoint: str, seconds: float) -> None:
        self._emit("ondemand_redis_ready", lifecycle=lifecycle, pid=pid, endpoint=endpoint, seconds=seconds)

    def redis_idle_stopped(self, *, lifecycle: str, pid: int | None, idle_seconds: float) -> None:
        self._emit("ondemand_redis_idle_stopped", lifecycle=lifecycle, pid=pid, idle_seconds=idle_seconds)

    def degraded(self, *, component: str, reason: str) -> None:
        self._emit("ondemand_degraded", component=component, reason=reason)

    def recovered(self, *, component: str, down_seconds: float) -> None:
        self._emit("ondemand_recovered", component=component, down_seconds=down_seconds)

    def shutdown(self, *, lifecycle: str, pid: int | None) -> None:
        self._emit("ondemand_shutdown", lifecycle=lifecycle, pid=pid)
