"""A hand-written OpenAPI 3.1 document for every route, served at GET /api/openapi.json.

The document describes the server that serves it (`build_document`, when the app is set up): only the
operations its app serves (the test endpoints can be turned off; one resource per configured namespace;
plugins' routes that declare an operation), every path with the prefix the routes are mounted under, and
bearer authentication only when `server.api_token` is set, then on exactly the operations
`app.web.auth.needs_token` guards, each with its 401 and 403. Without a token it declares no security at
all: every request is served without one. A plugin's operation may refer to our components
(`#/components/schemas/Error`, `#/components/parameters/ttl`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from ondemand.config import Config
from ondemand.metrics import BREAKER_STATES, REDIS_STATES
from ondemand.registry import CORE
from ondemand.store.values import MAX_ID_BYTES, MAX_INT, MAX_TTL, MIN_INT, MIN_TTL
from ondemand.web.auth import needs_token
from ondemand.web.cors import WRITE_HEADER
from ondemand.web.keys import OPENAPI
from ondemand.web.responses import json_response
from ondemand.web.route_registry import Route, openapi_path
from ondemand.web.views import TEST_MIN_TTL

OPENAPI_PATH = "/api/openapi.json"

_JSON = "application/json"
# What a value may hold, in a form validators check: JSON whose whole numbers (JSON Schema's "integer", however
# written: 1, 1.0, 1e3) fit in 64 bits, and whose other numbers have a fraction (that such a decimal must read
# back as sent, at most 17 significant digits, is stated in words: JSON Schema cannot count digits).
# Recursive, so every nested number is checked; the nesting limit (32 levels) is stated in words too.
_JSON_VALUE: dict[str, Any] = {
    "description": "any JSON value: whole numbers (1, 1.0, 1e3) from -9223372036854775808 to 18446744073709551615 "
                   "(64 bits), other numbers only as decimals that read back as sent from a 64-bit float (15 "
                   "significant digits, or 16 to 17 when they are the float's own shortest form); anything else "
                   "is refused with 400 (send it as a string)",
    "anyOf": [
        {"type": ["string", "boolean", "null"]},
        {"type": "integer", "minimum": MIN_INT, "maximum": MAX_INT},
        {"type": "number", "not": {"type": "integer"}},
        {"type": "array", "items": {"$ref": "#/components/schemas/Json"}},
        {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Json"}},
    ],
}
ANY_JSON: dict[str, Any] = {"$ref": "#/components/schemas/Value"}
# An element of a message list: anything JSON, null included (only a stored value as a whole cannot be null).
_ANY: dict[str, Any] = {"$ref": "#/components/schemas/Json"}
# JSON Schema counts characters, the server UTF-8 bytes: maxLength is exact for ASCII ids only.
_NO_CONTROL = "^[^\\u0000-\\u001f\\u007f]*$"
# An id in a path, as the document promises it: no control character, and no '%' followed by two hex digits.
# The server takes such an id (written %25XX), but many clients, schemathesis among them, take a value that
# looks percent-encoded as already encoded and send the id it decodes to instead: the document leaves those
# ids out rather than promise one id and see another one sent.
_PATH_ID = "^(?:[^\\u0000-\\u001f\\u007f%]|%(?![0-9A-Fa-f]{2}))*$"
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}
_ERRORS = {
    "400": "invalid input: a bad id, ttl, query parameter (or one given twice) or body; the message names the rule",
    "401": "the request has no bearer credential",
    "403": "the bearer token is wrong",
    "404": "absent value or unknown route",
    "405": "method not allowed on this route",
    "408": "the body did not arrive within server.body_timeout; the connection is closed",
    "409": "the stored value has a shape this operation cannot use (messages that are not a list, a value "
           "nested too deep to answer)",
    "413": "body over server.max_body_bytes",
    "415": "body is not application/json in UTF-8",
    "503": "no store could serve the request (code write_outcome_unknown: a durable write that may still take "
           "effect; the cached copy was invalidated, so a read returns what the durable store holds)",
}


def _error(status: str) -> dict[str, Any]:
    return {"description": _ERRORS[status], "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: dict[str, Any] | None = None, status: str = "200", *,
        write: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if write:
        response["headers"] = {WRITE_HEADER: {"$ref": "#/components/headers/Write"}}
    if schema is not None:
        response["content"] = {_JSON: {"schema": schema}}
    return {status: response}


def _obj(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(properties), "properties": properties}


def _op(summary: str, responses: dict[str, Any], errors: tuple[str, ...], *, body: dict[str, Any] | None = None,
        body_required: bool = True, params: tuple[str, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary}
    if params:
        op["parameters"] = [{"$ref": f"#/components/parameters/{name}"} for name in params]
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {_JSON: {"schema": body}}}
    op["responses"] = {**responses, **{code: _error(code) for code in sorted(set(errors))}}
    return op


_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NUM = {"type": "number"}
_MS = {"type": "number", "description": "milliseconds"}
_TTL = {"type": ["number", "null"], "description": "the ttl applied, seconds (null: no expiry)"}
_TTL_IN = {"type": "number", "minimum": MIN_TTL, "maximum": MAX_TTL,
           "description": f"seconds, from {MIN_TTL:g} to ten years"}
_SOURCE = {"type": "string", "minLength": 1,
           "description": "where the value was found: redis, or the durable storage's name (postgres, sqlite, a "
                          "third-party plugin's)"}
_WRITE_ERRORS = ("400", "408", "413", "415", "503")
# A write to /.../{id}: also 404, since an id such as "." or ".." is normalised out of the URL by
# clients and then matches no route.
_ID_WRITE_ERRORS = (*_WRITE_ERRORS, "404")
_READ_ERRORS = ("400", "404", "503")
_MESSAGE_LIST = {"type": "array", "items": _ANY}
_WRITTEN = {"type": "array", "items": {"enum": ["session", "messages", "profile"]}, "uniqueItems": True}
_SKIPPABLE = {"$ref": "#/components/schemas/Json", "description": "any JSON value (see Json); null: not written"}
# An optional id in a test endpoint's body: empty or null picks a random one.
_OPTIONAL_ID = {"type": ["string", "null"], "maxLength": MAX_ID_BYTES, "pattern": _NO_CONTROL,
                "description": "an id (see the path ids); empty or null: a random one"}


def _value_resource(id_param: str, value_key: str, noun: str) -> dict[str, Any]:
    """PUT, GET and DELETE of one JSON value per id (app.web.api.ValueResource)."""
    params = (id_param,)
    return {
        "put": _op(f"Store {noun}; the body is its value",
                   _ok("stored", _obj(**{id_param: _STR}, ttl=_TTL), write=True),
                   _ID_WRITE_ERRORS, body=ANY_JSON, params=(*params, "ttl")),
        "get": _op(f"Read {noun}", _ok("found", _obj(**{id_param: _STR, value_key: ANY_JSON}, source=_SOURCE)),
                   (*_READ_ERRORS, "409"), params=params),
        "delete": _op(f"Delete {noun}", _ok("deleted", status="204"), _READ_ERRORS, params=params),
    }


def _paths(namespaces: Iterable[str]) -> dict[str, Any]:
    """Our operations by path and method; a route of ours without one here is left out of the document."""
    user = ("user_id",)
    return {
        "/api/sessions/{session_id}": _value_resource("session_id", "value", "a session"),
        **{f"/api/ns/{name}/{{id}}": _value_resource("id", "value", f"a value of namespace {name}")
           for name in namespaces},
        "/api/users/{user_id}/messages": {
            "put": _op("Replace a user's messages", _ok("stored", _obj(user_id=_STR, count={"type": "integer"},
                                                                         ttl=_TTL), write=True),
                       _ID_WRITE_ERRORS, body=_MESSAGE_LIST, params=(*user, "ttl")),
            "post": _op("Append one message (an object) or several (a non-empty list); atomic in Redis, so "
                        "concurrent appends all land (unless messages are configured durable)",
                        _ok("appended", _obj(user_id=_STR, appended={"type": "integer"},
                                             count={"type": "integer"}, ttl=_TTL), write=True),
                        (*_ID_WRITE_ERRORS, "409"),
                        body={"oneOf": [{"type": "object", "additionalProperties": _ANY},
                                        {**_MESSAGE_LIST, "minItems": 1}]},
                        params=(*user, "ttl")),
            "get": _op("Read a user's messages, or the last N",
                       _ok("found", _obj(user_id=_STR, messages=_MESSAGE_LIST, total={"type": "integer"},
                                         source=_SOURCE)),
                       (*_READ_ERRORS, "409"), params=(*user, "last")),
            "delete": _op("Delete a user's messages", _ok("deleted", status="204"), _READ_ERRORS, params=user),
        },
        "/api/users/{user_id}/profile": _value_resource("user_id", "profile", "a user's profile"),
        "/api/users/{user_id}/warmup": {
            "post": _op("Write any of session, messages and profile in one round trip",
                        _ok("written", _obj(user_id=_STR, written=_WRITTEN), write=True),
                        _ID_WRITE_ERRORS,
                        body={"type": "object", "minProperties": 1, "additionalProperties": False,
                              "properties": {"session": ANY_JSON, "messages": _MESSAGE_LIST, "profile": ANY_JSON}},
                        params=(*user, "ttl")),
        },
        "/api/cache/status": {
            "get": _op("Runtime status: lifecycle, pools, counters, storages, breaker, plugins",
                       _ok("status", {"$ref": "#/components/schemas/Status"}), ()),
        },
        "/api/cache/history": {
            "get": _op("The last minutes of counters and health, one sample every server.history_interval seconds "
                       "(the status page draws its chart from it)",
                       _ok("history", {"$ref": "#/components/schemas/History"}), ()),
        },
        "/api/cache/test": {
            "get": _op("A set/get/delete round trip with timings (server.test_endpoints); 503 when the value does "
                       "not read back",
                       _ok("result", _obj(ok={"const": True}, source={"type": "string", "minLength": 1},
                                          set_ms=_MS, get_ms=_MS, delete_ms=_MS, total_ms=_MS)),
                       ("503",)),
        },
        "/api/cache/session/test": {
            "post": _op("Cache a session and read it back (server.test_endpoints); the body is optional; 503 when "
                        "it does not read back",
                        _ok("result", _obj(ok={"const": True}, session_id=_STR, session=_ANY, cache_ms=_MS,
                                           get_ms=_MS)),
                        _WRITE_ERRORS, body_required=False,
                        body=_obj_optional(session_id=_OPTIONAL_ID, data=ANY_JSON,
                                           ttl={**_TTL_IN, "type": ["number", "null"], "minimum": TEST_MIN_TTL,
                                                "description": f"seconds, from {TEST_MIN_TTL:g} (the session must "
                                                               "live until it is read back) to ten years "
                                                               "(default 60; null: the namespace ttl)"})),
        },
        "/api/cache/batch/test": {
            "post": _op("Warm up one user and read it back (server.test_endpoints); the body is optional; 503 when "
                        "it does not read back",
                        _ok("result", _obj(ok={"const": True}, user_id=_STR, written=_WRITTEN, warmup_ms=_MS,
                                           read_ms=_MS)),
                        _WRITE_ERRORS, body_required=False,
                        body=_obj_optional(user_id=_OPTIONAL_ID, session=_SKIPPABLE,
                                           messages={**_MESSAGE_LIST, "type": ["array", "null"],
                                                     "description": "a list; null: not written"},
                                           profile=_SKIPPABLE)),
        },
        "/api/openapi.json": {
            "get": _op("This document", _ok("the OpenAPI 3.1 document", {"type": "object"}), ()),
        },
        "/healthz": {
            "get": _op("Liveness: always 200 while the process answers", _ok("alive", _obj(status=_STR)), ()),
        },
        "/readyz": {
            "get": {"summary": "Readiness: which stores can serve",
                    "responses": {"200": _ready("ready, or degraded but a store takes writes"),
                                  "503": _ready("no store can take a write: Redis is down, and no durable store "
                                                "is configured or it is down too")}},
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics, text exposition format",
                    "responses": {"200": {"description": "metrics", "content": {"text/plain": {"schema": _STR}}}}},
        },
        "/": {"get": _page("The status page for operators (polls /api/cache/status; open: it holds no data)",
                           "text/html")},
        "/static/status.css": {"get": _page("The status page's style sheet", "text/css")},
        "/static/status.js": {"get": _page("The status page's script", "text/javascript")},
    }


def _page(summary: str, media_type: str) -> dict[str, Any]:
    """A file of the status page: static, served without a token."""
    return {"summary": summary,
            "responses": {"200": {"description": "the file", "content": {media_type: {"schema": _STR}}}}}


def _ready(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Ready"}}}}


def _obj_optional(**properties: dict[str, Any]) -> dict[str, Any]:
    """A test endpoint's optional body: other fields are ignored, but read, so their numbers follow Json's rules."""
    return {"type": "object", "properties": properties, "additionalProperties": {"$ref": "#/components/schemas/Json"}}


def _secured(op: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """`op` of a server with an API token: the document-wide bearer requirement lifted (`security: []`)
    from an open operation; any other also answers 401 and 403."""
    if not needs_token(method, path):
        return {**op, "security": []}
    return {**op, "responses": dict(sorted({**op["responses"], "401": _error("401"), "403": _error("403")}.items()))}


def build_document(config: Config, routes: Iterable[Route]) -> dict[str, Any]:
    """The document of an app serving `routes` (ours and plugins') with `config`, paths without a prefix."""
    api_token = config.server.api_token is not None
    ours = _paths(config.namespaces)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op = ours.get(route.path, {}).get(route.method.lower()) if route.plugin == CORE else route.openapi
        if op is None:
            continue
        if api_token:
            op = _secured(dict(op), route.method, route.path)
        paths.setdefault(openapi_path(route.path), {})[route.method.lower()] = op
    store = {"type": ["object", "null"], "properties": {"ok": {"type": "boolean"}, "state": _STR,
                                                       "last_error": {"type": ["string", "null"]}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ondemand", "version": "1.0.0",
                 "description": "Sessions, messages, profiles and any configured namespace, cached in an on-demand "
                                "Redis, with a PostgreSQL fallback. Values are JSON; `?ttl=` sets the expiry in "
                                "seconds."},
        "paths": paths,
        **({"security": [{"bearer": []}]} if api_token else {}),
        "components": {
            **({"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                               "description": "the token is server.api_token"}}}
               if api_token else {}),
            "parameters": {
                "session_id": _path_param("session_id"),
                "user_id": _path_param("user_id"),
                "id": _path_param("id"),
                "ttl": {"name": "ttl", "in": "query", "required": False,
                        "description": "seconds, > 0 and at most ten years; default: the namespace ttl",
                        "schema": _TTL_IN},
                "last": {"name": "last", "in": "query", "required": False, "description": "only the last N messages",
                         "schema": {"type": "integer", "minimum": 0}},
            },
            "headers": {
                "Write": {"description": "present when the cache did not store the write as asked (the status is "
                                         "still 200): `dropped`, stored nowhere (a cache-only namespace with Redis "
                                         "unavailable; a read misses), or `durable-only`, committed to the durable "
                                         "store only (reads are served from there)",
                          "schema": {"enum": ["dropped", "durable-only"]}},
            },
            "schemas": {
                "Error": ERROR,
                "Json": _JSON_VALUE,
                "Value": {"allOf": [{"$ref": "#/components/schemas/Json"}], "not": {"type": "null"},
                          "description": "a stored value: any JSON (see Json) except null, nested at most 32 "
                                         "levels"},
                "History": _history_schema(),
                "Ready": {"type": "object", "required": ["status", "redis", "durable"],
                          "properties": {"status": {"enum": ["ready", "degraded", "unavailable"]},
                                         "redis": store, "durable": store}},
                "Status": _status_schema(),
            },
        },
    }


def _history_schema() -> dict[str, Any]:
    """GET /api/cache/history (ondemand.history.StatusHistory.to_json)."""
    count = {"type": "integer", "minimum": 0}
    sample = _obj(t=_NUM, ops=count, hits=count, reads=count, dropped_writes=count, commands=count,
                  readiness={"enum": ["ready", "degraded", "unavailable"]}, redis_ok=_BOOL,
                  durable_ok={"type": ["boolean", "null"]}, redis_state={"enum": list(REDIS_STATES)},
                  breaker={"enum": list(BREAKER_STATES)})
    sample["description"] = "counters are cumulative since the process started; states are as they were at t"
    return _obj(interval=_NUM, seconds=_NUM, now=_NUM, samples={"type": "array", "items": sample})


def _status_schema() -> dict[str, Any]:
    """GET /api/cache/status (Runtime.status()): the fields the status page and `run.py status` read.

    Objects stay open (a lifecycle plugin adds its own fields to `redis`), but what is listed is checked.
    """
    int_ = {"type": "integer", "minimum": 0}
    num_or_null = {"type": ["number", "null"]}
    str_or_null = {"type": ["string", "null"]}
    pool = _obj(open=_BOOL, max_connections=int_, keep_alive=_NUM, idle_seconds=_NUM, leases=int_,
                client_connections_in_use=int_, opens=int_, idle_closes=int_,
                pipeline={"type": ["object", "null"], "properties": {"connected": _BOOL, "batches": int_,
                                                                      "commands": int_}})
    redis = _obj(lifecycle=_STR, state={"enum": list(REDIS_STATES)}, pid={"type": ["integer", "null"]},
                 endpoint=str_or_null, server_version=str_or_null, uptime_seconds=num_or_null, idle_timeout=_NUM,
                 idle_deadline_in=num_or_null, last_error=str_or_null, retry_in=num_or_null,
                 pools={"type": "object", "additionalProperties": pool},
                 counters={"type": "object", "additionalProperties": int_})
    breaker = _obj(state={"enum": list(BREAKER_STATES)}, opened_at=num_or_null, opens=int_, last_reason=str_or_null)
    dispatcher = _obj(breaker=breaker, stale_keys_pending=int_, stale_overflow=_BOOL,
                      error_replies={"type": "object", "additionalProperties": int_,
                                     "description": "cache error replies by kind: oom, readonly, misconf, "
                                                    "loading, busy, noscript, ..., other"},
                      namespaces={"type": "object", "additionalProperties": {"type": "object",
                                                                             "additionalProperties": int_}},
                      aside=_obj(leases=_BOOL, loads_in_flight=int_, refreshes_in_flight=int_,
                                 namespaces={"type": "object", "additionalProperties": {
                                     "type": "object", "additionalProperties": {"type": "number", "minimum": 0},
                                     "description": "get_or_compute's counters (README: Cache-aside); load_seconds "
                                                    "is a total in seconds"}}))
    storage = {"type": "object", "properties": {"state": _STR, "server_version": str_or_null,
                                                "last_error": str_or_null}}
    return _obj(service=_STR, uptime_seconds=_NUM, redis=redis,
                storages=_obj(cache=storage, durable={**storage, "type": ["object", "null"]}),
                dispatcher=dispatcher, plugins={"type": "array", "items": _STR})


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "description": f"1 to {MAX_ID_BYTES} UTF-8 bytes, no control characters; in the URL, percent-encoded "
                           "UTF-8 (a '%' of the id is %25; an id holding '%' and two hex digits is valid, but "
                           "left out of this pattern: many clients would send it decoded)",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_BYTES, "pattern": _PATH_ID}}


def with_prefix(document: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`document` for routes mounted under `prefix` ("" for none): every path starts with it."""
    if not prefix:
        return document
    return {**document, "paths": {prefix + path: item for path, item in document["paths"].items()}}


def document_for(app: web.Application, prefix: str = "") -> dict[str, Any]:
    """The document of the app our routes were registered on, mounted under `prefix`."""
    return with_prefix(app[OPENAPI], prefix)


async def openapi(request: web.Request) -> web.Response:
    """GET /api/openapi.json; the prefix is what the app is mounted under, read from the route itself
    (add_subapp prefixes every resource of a sub-application, however deep)."""
    prefix = request.match_info.route.resource.canonical.removesuffix(OPENAPI_PATH)  # type: ignore[union-attr]
    return json_response(document_for(request.app, prefix))
