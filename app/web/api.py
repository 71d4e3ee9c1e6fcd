"""The REST resources: sessions, a user's messages and profile, any namespace, warm-up, health, readiness.

Design, the same for every resource:

- A PUT, POST or warm-up body is the JSON value itself (`Content-Type: application/json`, 415
  otherwise), nested at most `MAX_JSON_DEPTH` levels and never `null` (a stored `null` would be
  indistinguishable from a miss).
- The TTL is always the optional query parameter `?ttl=SECONDS` (from 0.001 to ten years); without
  it the namespace's configured TTL applies. It is never part of the body, so a stored value can have
  any shape. A query parameter we read given twice is a 400, never "the first one wins".
- A GET answers `{<id name>, <value name>, "source"}` where source is `redis` or `postgres` (the
  durable store's name); an absent value is a 404 JSON error. A DELETE answers 204, or 404 when
  nothing was there.
- Ids are checked by `dispatcher.check_id` (400 naming the rule). An id is its path segment
  percent-decoded as UTF-8; a segment whose escapes are not that (`%FF`, `%zz`) is a 400 rather than
  an id that keeps them as text, which `%25FF` also names (`path_id`).
- A write the cache did not store as asked answers as usual, with the header `Ondemand-Write`:
  `dropped` (stored nowhere) or `durable-only` (`WriteOutcome`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ondemand.cache import MESSAGES, PROFILE, SESSION
from ondemand.errors import Conflict, InvalidInput, OndemandError
from ondemand.store.dispatcher import Dispatcher, Lookup, WriteOutcome
from ondemand.store.values import check_id, check_ttl
from ondemand.web.cors import WRITE_HEADER
from ondemand.web.keys import METRICS, RUNTIME
from ondemand.web.responses import json_response, read_json
from ondemand.web.route_registry import Handler

MAX_JSON_DEPTH = 32
# Each body is capped by server.max_body_bytes, but appends grow a stored list without end: cap it.
MAX_MESSAGES = 10_000
WARMUP_FIELDS = (SESSION, MESSAGES, PROFILE)


class NotFound(OndemandError):
    """The resource is absent: 404 with the usual JSON error shape."""

    code = "not_found"
    http_status = 404


# -- input helpers ------------------------------------------------------------------------------


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH, *, what: str = "body") -> Any:
    """Refuse JSON nested deeper than `limit` arrays/objects (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        if depth > limit:
            raise InvalidInput(f"{what} must be nested at most {limit} levels deep")
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return value


async def read_value(request: web.Request) -> Any:
    """The body as a JSON value to store: required, depth-limited, not null."""
    value = check_depth(await read_json(request))
    if value is None:
        raise InvalidInput("body must not be JSON null; use DELETE to remove a value")
    return value


def query_value(request: web.Request, name: str) -> str | None:
    """The query parameter `name`, None when absent; InvalidInput when it is given more than once (which
    one would be meant?)."""
    values = request.query.getall(name, ())
    if len(values) > 1:
        raise InvalidInput(f"query parameter {name} must be given once, got {len(values)} values: "
                           f"{', '.join(map(repr, values[:5]))}")
    return values[0] if values else None


def query_ttl(request: web.Request) -> float | None:
    """`?ttl=SECONDS`, checked like every TTL; None (the namespace default) when absent."""
    text = query_value(request, "ttl")
    if text is None:
        return None
    try:
        ttl = float(_plain_number(text))
    except ValueError:
        raise InvalidInput(f"ttl must be a number of seconds, got {text!r}") from None
    return check_ttl(ttl, None)


def _plain_number(text: str) -> str:
    """`text` if it is written the plain ASCII way; ValueError for what float()/int() would also take
    but the OpenAPI document does not promise: surrounding spaces, `1_000`, non-ASCII digits."""
    if not text.isascii() or "_" in text or text != text.strip():
        raise ValueError(text)
    return text


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
PATH_RULE = ("a URL path must be percent-encoded UTF-8: each '%' followed by two hex digits, the bytes they "
             "encode valid UTF-8 (a '%' in an id is written %25)")


def path_value(request: web.Request, name: str) -> str:
    """The path variable `name`, percent-decoded as UTF-8. aiohttp (yarl) leaves an escape that does not
    decode (`%FF`, `%zz`) in the value as text, so that `%FF` and `%25FF` would name one id: a value with a
    '%' left in it is checked against the raw path, and an escape that is not UTF-8 is InvalidInput."""
    value = request.match_info[name]
    if "%" in value:
        check_path_encoding(request)
    return value


def check_path_encoding(request: web.Request) -> None:
    raw = request.raw_path.partition("?")[0]
    bad = _BAD_ESCAPE.search(raw)
    try:
        if bad is not None:
            raise ValueError
        unquote_to_bytes(raw).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(f"{PATH_RULE}; got {raw[:300]!r}") from None


def path_id(request: web.Request, name: str) -> str:
    return check_id(path_value(request, name))


def _written(body: dict[str, Any], outcome: WriteOutcome | None) -> web.Response:
    """A write's answer: the README's status and body, and `Ondemand-Write` when the cache did not store it."""
    return json_response(body, headers=None if outcome is None else {WRITE_HEADER: outcome.value})


def _dispatcher(request: web.Request) -> Dispatcher:
    return request.app[RUNTIME].dispatcher


def _effective_ttl(dispatcher: Dispatcher, namespace: str, ttl: float | None) -> float | None:
    return ttl if ttl is not None else dispatcher.namespace(namespace).ttl


async def _found(dispatcher: Dispatcher, namespace: str, item_id: str, what: str) -> Lookup:
    found = await dispatcher.lookup(namespace, item_id)
    if found.source == "miss":
        raise NotFound(f"no {what} {item_id!r}")
    return found


def _value_response(data: dict[str, Any]) -> web.Response:
    """A GET's answer. A stored value we cannot encode (valid JSON another client wrote, nested deeper
    than orjson's 254 levels) is a 409 naming the problem, not a 500."""
    try:
        body = orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        raise Conflict(f"the stored value cannot be answered as JSON: {exc}") from None
    return web.Response(body=body, content_type="application/json")


async def _delete(dispatcher: Dispatcher, namespace: str, item_id: str, what: str) -> web.Response:
    if await dispatcher.delete(namespace, item_id) == 0:
        raise NotFound(f"no {what} {item_id!r}")
    return web.Response(status=204)


# -- sessions and profiles: one JSON value per id -----------------------------------------------


@attrs.frozen
class ValueResource:
    """PUT, GET and DELETE of one JSON value per id, in one namespace."""

    namespace: str
    id_param: str  # the path parameter, also the id's name in responses
    value_key: str  # the value's name in GET responses
    what: str  # for "no <what> 'id'" in a 404

    async def put(self, request: web.Request) -> web.Response:
        """PUT ...?ttl=: the body is the value."""
        item_id = path_id(request, self.id_param)
        ttl = query_ttl(request)
        value = await read_value(request)
        dispatcher = _dispatcher(request)
        outcome = await dispatcher.set(self.namespace, item_id, value, ttl)
        return _written({self.id_param: item_id, "ttl": _effective_ttl(dispatcher, self.namespace, ttl)}, outcome)

    async def get(self, request: web.Request) -> web.Response:
        # The hot path, kept one frame deep: the dispatcher checks the id (no body to check first), the
        # path's encoding is looked at only when an escape was left in the id, and the miss test is inline.
        item_id = request.match_info[self.id_param]
        if "%" in item_id:
            check_path_encoding(request)
        found = await request.app[RUNTIME].dispatcher.lookup(self.namespace, item_id)
        if found.source == "miss":
            raise NotFound(f"no {self.what} {item_id!r}")
        return _value_response({self.id_param: item_id, self.value_key: found.value, "source": found.source})

    async def delete(self, request: web.Request) -> web.Response:
        return await _delete(_dispatcher(request), self.namespace, path_id(request, self.id_param), self.what)


SESSIONS = ValueResource(SESSION, "session_id", "value", "session")
PROFILES = ValueResource(PROFILE, "user_id", "profile", "profile for user")


# -- any configured namespace: /api/ns/{namespace}/{id} -----------------------------------------


def namespace_resource(namespace: str) -> ValueResource:
    """The resource of /api/ns/<namespace>/{id}: the same rules as sessions, `{"id", "value", "source"}`."""
    return ValueResource(namespace, "id", "value", f"value in namespace {namespace!r} with id")


def unknown_namespace(configured: Iterable[str]) -> Handler:
    """The handler of /api/ns/{namespace}/{id} for a namespace the config does not have (the configured
    ones have routes of their own, tried first): 404 naming the configured ones."""
    names = ", ".join(sorted(configured)) or "none"

    async def unknown(request: web.Request) -> web.Response:
        raise NotFound(f"no namespace {path_value(request, 'namespace')!r}; configured: {names}")

    return unknown


# -- messages -----------------------------------------------------------------------------------


# The same rules, and the same errors, as Dispatcher.append: one source for both (app.storage.Namespace).
def _as_list(dispatcher: Dispatcher, value: Any, user_id: str) -> list[Any]:
    if not isinstance(value, list):
        raise dispatcher.namespace(MESSAGES).not_a_list(user_id)
    return value


def _check_count(dispatcher: Dispatcher, count: int, user_id: str) -> None:
    if count > MAX_MESSAGES:
        raise dispatcher.namespace(MESSAGES).list_too_long(user_id, count, MAX_MESSAGES)


async def put_messages(request: web.Request) -> web.Response:
    """PUT /api/users/{user_id}/messages?ttl=: replace the list; the body is a JSON list."""
    user_id = path_id(request, "user_id")
    ttl = query_ttl(request)
    messages = await read_value(request)
    if not isinstance(messages, list):
        raise InvalidInput("body must be a JSON list of messages")
    dispatcher = _dispatcher(request)
    _check_count(dispatcher, len(messages), user_id)
    outcome = await dispatcher.set(MESSAGES, user_id, messages, ttl)
    return _written({"user_id": user_id, "count": len(messages), "ttl": _effective_ttl(dispatcher, MESSAGES, ttl)},
                    outcome)


async def append_messages(request: web.Request) -> web.Response:
    """POST /api/users/{user_id}/messages?ttl=: append one message (an object) or several (a list).

    Atomic in a cache-only namespace (the default for messages): `Dispatcher.append` runs in Redis as
    one script, so concurrent appends from any number of processes all land. The whole list gets
    `ttl` (or the namespace default), so an append also renews the list's expiry.
    """
    user_id = path_id(request, "user_id")
    ttl = query_ttl(request)
    body = await read_value(request)
    if isinstance(body, dict):
        new = [body]
    elif isinstance(body, list) and body:
        new = body
    else:
        raise InvalidInput("body must be a message (a JSON object) or a non-empty JSON list of messages")
    dispatcher = _dispatcher(request)
    count = await dispatcher.append(MESSAGES, user_id, new, ttl, max_items=MAX_MESSAGES)
    return _written({"user_id": user_id, "appended": len(new), "count": int(count),
                     "ttl": _effective_ttl(dispatcher, MESSAGES, ttl)}, getattr(count, "outcome", None))


async def get_messages(request: web.Request) -> web.Response:
    """GET /api/users/{user_id}/messages?last=N: the list, or only its last N entries."""
    user_id = path_id(request, "user_id")
    last_text = query_value(request, "last")
    last: int | None = None
    if last_text is not None:
        try:
            last = int(_plain_number(last_text))
        except ValueError:
            last = -1
        if last < 0:
            raise InvalidInput(f"last must be a non-negative integer, got {last_text!r}")
    dispatcher = _dispatcher(request)
    found = await _found(dispatcher, MESSAGES, user_id, "messages for user")
    messages = _as_list(dispatcher, found.value, user_id)
    selected = messages if last is None else messages[-last:] if last else []
    return _value_response({"user_id": user_id, "messages": selected, "total": len(messages),
                            "source": found.source})


async def delete_messages(request: web.Request) -> web.Response:
    return await _delete(_dispatcher(request), MESSAGES, path_id(request, "user_id"), "messages for user")


# -- warm-up ------------------------------------------------------------------------------------


async def warmup(request: web.Request) -> web.Response:
    """POST /api/users/{user_id}/warmup?ttl=: body {"session"?, "messages"?, "profile"?}, one round trip."""
    user_id = path_id(request, "user_id")
    ttl = query_ttl(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput(f"body must be a JSON object with any of {', '.join(WARMUP_FIELDS)}")
    unknown = sorted(set(body) - set(WARMUP_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, unknown))}; expected any of "
                           f"{', '.join(WARMUP_FIELDS)}")
    if not body:
        raise InvalidInput(f"body must contain at least one of {', '.join(WARMUP_FIELDS)}")
    for name, value in body.items():
        if value is None:
            raise InvalidInput(f"{name} must not be null")
        check_depth(value, what=name)
    if MESSAGES in body and not isinstance(body[MESSAGES], list):
        raise InvalidInput("messages must be a JSON list")
    entries = [(name, user_id, body[name], ttl) for name in WARMUP_FIELDS if name in body]
    outcome = await _dispatcher(request).set_many(entries)
    return _written({"user_id": user_id, "written": [name for name, *_ in entries]}, outcome)


# -- health and readiness -----------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process answers; says nothing about the stores."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 ready/degraded, 503 when no store can take a write (see Runtime.readiness)."""
    runtime = request.app[RUNTIME]
    report = runtime.readiness()
    on_demand, breaker = runtime.on_demand, runtime.dispatcher.breaker
    durable = runtime.durable_storage
    body = {
        "status": report.state,
        "redis": {
            "ok": report.redis_ok,
            "state": on_demand.state,
            "breaker": breaker.state,
            "last_error": None if report.redis_ok else runtime.redis_health.last_error or breaker.last_reason,
        },
        "durable": None if durable is None or runtime.durable_health is None else {
            "ok": report.durable_ok,
            "name": durable.name,
            "state": durable.status().get("state"),
            "last_error": None if report.durable_ok else runtime.durable_health.last_error,
        },
    }
    return json_response(body, status=200 if report.serving else 503)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format, from this app's own registry."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
