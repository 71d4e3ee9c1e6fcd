"""Handlers for the seed's endpoints. A test that fails answers 503 with the error shape and its result, so a
probe (or a person) that only looks at the status sees it."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from ondemand.errors import InvalidInput
from ondemand.store.dispatcher import WriteOutcome
from ondemand.store.values import check_ttl
from ondemand.web.keys import RUNTIME
from ondemand.web.responses import json_response, read_json


def _id_or_random(value: Any, prefix: str) -> Any:
    """A test endpoint's optional id: absent, null or "" picks a random one; anything else is checked as an id
    (not `value or random`: a falsy non-string such as {} or 0 is a 400, not silently replaced)."""
    return f"{prefix}{secrets.token_hex(6)}" if value is None or value == "" else value


# A test's value must live until it is read back: a shorter ttl would make the test fail by design.
TEST_MIN_TTL = 1.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _result(result: dict[str, Any], why: str) -> web.Response:
    """200 with `result` when it is ok; else 503 `{"error": {"code": "cache_test_failed", "message": why},
    "result": result}`."""
    if result["ok"]:
        return json_response(result)
    return json_response({"error": {"code": "cache_test_failed", "message": why}, "result": result}, status=503)


def _stored(outcome: WriteOutcome | None) -> str:
    return "the cache stored it" if outcome is None else f"the write was {outcome.value} (Ondemand-Write)"


async def status(request: web.Request) -> web.Response:
    """GET /api/cache/status: lifecycle, pools, counters, storages, breaker."""
    return json_response(request.app[RUNTIME].status())


async def history(request: web.Request) -> web.Response:
    """GET /api/cache/history: the last minutes of counters and health (ondemand.history)."""
    return json_response(request.app[RUNTIME].history.to_json())


async def cache_test(request: web.Request) -> web.Response:
    """GET /api/cache/test: a set/get/delete round trip through the cache, with timings."""
    dispatcher = request.app[RUNTIME].dispatcher
    item_id = f"cache-test-{secrets.token_hex(8)}"
    payload = {"test": True, "at": time.time()}
    t0 = time.perf_counter()
    outcome = await dispatcher.set("profile", item_id, payload, 60)
    t1 = time.perf_counter()
    found = await dispatcher.lookup("profile", item_id)
    t2 = time.perf_counter()
    await dispatcher.delete("profile", item_id)
    t3 = time.perf_counter()
    return _result({
        "ok": found.value == payload,
        "source": found.source,
        "set_ms": _ms(t1 - t0),
        "get_ms": _ms(t2 - t1),
        "delete_ms": _ms(t3 - t2),
        "total_ms": _ms(t3 - t0),
    }, f"a value written to namespace profile did not read back ({found.source}); {_stored(outcome)}")


async def session_test(request: web.Request) -> web.Response:
    """POST /api/cache/session/test: cache a session (body: optional session_id, data, ttl) and read it back."""
    body = await read_json(request, optional=True)
    if not isinstance(body, dict):
        raise InvalidInput("body must be a JSON object")
    cache = request.app[RUNTIME].cache
    session_id = _id_or_random(body.get("session_id"), "test-")
    data = body.get("data", {"user": "test", "created": time.time()})
    if data is None:  # a stored null would read back as a miss, the same rule as PUT /api/sessions
        raise InvalidInput("data must not be null")
    ttl = check_ttl(body.get("ttl", 60), None)
    if ttl is not None and ttl < TEST_MIN_TTL:
        raise InvalidInput(f"ttl must be at least {TEST_MIN_TTL:g} s here: the session is read back right after, "
                           f"got {ttl!r}")
    t0 = time.perf_counter()
    outcome = await cache.cache_session(session_id, data, ttl=ttl)
    t1 = time.perf_counter()
    found = await cache.get_session(session_id)
    t2 = time.perf_counter()
    return _result({
        "ok": found == data,
        "session_id": session_id,
        "session": found,
        "cache_ms": _ms(t1 - t0),
        "get_ms": _ms(t2 - t1),
    }, f"the session did not read back as written; {_stored(outcome)}")


async def batch_test(request: web.Request) -> web.Response:
    """POST /api/cache/batch/test: warm up one user's session, messages and profile, then read them back."""
    body = await read_json(request, optional=True)
    if not isinstance(body, dict):
        raise InvalidInput("body must be a JSON object")
    cache = request.app[RUNTIME].cache
    user_id = _id_or_random(body.get("user_id"), "test-user-")
    session = body.get("session", {"user_id": user_id})
    messages = body.get("messages", [{"text": f"message {i}"} for i in range(10)])
    if messages is not None and not isinstance(messages, list):  # else GET .../messages would answer 409
        raise InvalidInput("messages must be a JSON list")
    profile = body.get("profile", {"name": "Test User"})
    t0 = time.perf_counter()
    entries = [(name, user_id, value, 60) for name, value in (("session", session), ("messages", messages),
                                                               ("profile", profile)) if value is not None]
    outcome = await cache.dispatcher.set_many(entries)
    written = [name for name, *_ in entries]
    t1 = time.perf_counter()
    read = {
        "session": await cache.dispatcher.get("session", user_id),
        "messages": await cache.get_messages(user_id),
        "profile": await cache.get_profile(user_id),
    }
    t2 = time.perf_counter()
    expected = {"session": session, "messages": messages, "profile": profile}
    differ = [name for name in written if read[name] != expected[name]]
    return _result({
        "ok": not differ,
        "user_id": user_id,
        "written": written,
        "warmup_ms": _ms(t1 - t0),
        "read_ms": _ms(t2 - t1),
    }, f"{', '.join(differ)} did not read back as written; {_stored(outcome)}")
