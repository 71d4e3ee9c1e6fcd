"""A hand-written OpenAPI 3.1 document for every route, served at GET /api/openapi.json."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app.web.views import json_response

_JSON = "application/json"
ANY_JSON: dict[str, Any] = {"description": "any JSON value except null, nested at most 32 levels"}
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}
_ERRORS = {
    "400": "invalid input: a bad id, ttl, query parameter or body; the message names the rule",
    "401": "an API token is configured and the request has no bearer credential",
    "403": "the bearer token is wrong",
    "404": "absent value or unknown route",
    "405": "method not allowed on this route",
    "409": "the stored value has a shape this operation cannot use",
    "413": "body over server.max_body_bytes",
    "415": "body is not application/json",
    "503": "no store could serve the request",
}


def _error(status: str) -> dict[str, Any]:
    return {"description": _ERRORS[status], "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: dict[str, Any] | None = None, status: str = "200") -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = {_JSON: {"schema": schema}}
    return {status: response}


def _obj(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(properties), "properties": properties}


def _op(summary: str, responses: dict[str, Any], errors: tuple[str, ...], *, body: dict[str, Any] | None = None,
        params: tuple[str, ...] = (), secured: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary}
    if params:
        op["parameters"] = [{"$ref": f"#/components/parameters/{name}"} for name in params]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {_JSON: {"schema": body}}}
    codes = (*errors, "401", "403") if secured else errors
    op["responses"] = {**responses, **{code: _error(code) for code in sorted(set(codes))}}
    if not secured:
        op["security"] = []
    return op


_STR = {"type": "string"}
_NUM = {"type": "number"}
_TTL = {"type": ["number", "null"], "description": "the ttl applied, seconds (null: no expiry)"}
_SOURCE = {"type": "string", "enum": ["redis", "postgres"], "description": "where the value was found"}
_WRITE_ERRORS = ("400", "413", "415", "503")
_READ_ERRORS = ("400", "404", "503")
_MESSAGE_LIST = {"type": "array", "items": ANY_JSON}


def _paths() -> dict[str, Any]:
    session = ("session_id",)
    user = ("user_id",)
    return {
        "/api/sessions/{session_id}": {
            "put": _op("Store a session; the body is its value", _ok("stored", _obj(session_id=_STR, ttl=_TTL)),
                       _WRITE_ERRORS, body=ANY_JSON, params=(*session, "ttl")),
            "get": _op("Read a session", _ok("found", _obj(session_id=_STR, value=ANY_JSON, source=_SOURCE)),
                       _READ_ERRORS, params=session),
            "delete": _op("Delete a session", _ok("deleted", status="204"), _READ_ERRORS, params=session),
        },
        "/api/users/{user_id}/messages": {
            "put": _op("Replace a user's messages", _ok("stored", _obj(user_id=_STR, count={"type": "integer"},
                                                                         ttl=_TTL)),
                       _WRITE_ERRORS, body=_MESSAGE_LIST, params=(*user, "ttl")),
            "post": _op("Append one message (an object) or several (a non-empty list); read-modify-write, "
                        "not atomic across concurrent writers",
                        _ok("appended", _obj(user_id=_STR, appended={"type": "integer"},
                                             count={"type": "integer"}, ttl=_TTL)),
                        (*_WRITE_ERRORS, "409"),
                        body={"oneOf": [{"type": "object"}, {**_MESSAGE_LIST, "minItems": 1}]},
                        params=(*user, "ttl")),
            "get": _op("Read a user's messages, or the last N",
                       _ok("found", _obj(user_id=_STR, messages=_MESSAGE_LIST, total={"type": "integer"},
                                         source=_SOURCE)),
                       (*_READ_ERRORS, "409"), params=(*user, "last")),
            "delete": _op("Delete a user's messages", _ok("deleted", status="204"), _READ_ERRORS, params=user),
        },
        "/api/users/{user_id}/profile": {
            "put": _op("Store a user's profile; the body is its value", _ok("stored", _obj(user_id=_STR, ttl=_TTL)),
                       _WRITE_ERRORS, body=ANY_JSON, params=(*user, "ttl")),
            "get": _op("Read a user's profile", _ok("found", _obj(user_id=_STR, profile=ANY_JSON, source=_SOURCE)),
                       _READ_ERRORS, params=user),
            "delete": _op("Delete a user's profile", _ok("deleted", status="204"), _READ_ERRORS, params=user),
        },
        "/api/users/{user_id}/warmup": {
            "post": _op("Write any of session, messages and profile in one round trip",
                        _ok("written", _obj(user_id=_STR, written={"type": "array", "items": _STR})),
                        _WRITE_ERRORS,
                        body={"type": "object", "minProperties": 1, "additionalProperties": False,
                              "properties": {"session": ANY_JSON, "messages": _MESSAGE_LIST, "profile": ANY_JSON}},
                        params=(*user, "ttl")),
        },
        "/api/cache/status": {
            "get": _op("Runtime status: lifecycle, pools, counters, storages, breaker, plugins",
                       _ok("status", {"type": "object"}), ()),
        },
        "/api/cache/test": {
            "get": _op("A set/get/delete round trip with timings (server.test_endpoints)",
                       _ok("result", {"type": "object"}), ("503",)),
        },
        "/api/cache/session/test": {
            "post": _op("Cache a session and read it back (server.test_endpoints)",
                        _ok("result", {"type": "object"}), _WRITE_ERRORS,
                        body=_obj_optional(session_id=_STR, data=ANY_JSON, ttl=_NUM)),
        },
        "/api/cache/batch/test": {
            "post": _op("Warm up one user and read it back (server.test_endpoints)",
                        _ok("result", {"type": "object"}), _WRITE_ERRORS,
                        body=_obj_optional(user_id=_STR, session=ANY_JSON, messages=_MESSAGE_LIST,
                                           profile=ANY_JSON)),
        },
        "/api/openapi.json": {
            "get": _op("This document", _ok("the OpenAPI 3.1 document", {"type": "object"}), ()),
        },
        "/healthz": {
            "get": _op("Liveness: always 200 while the process answers", _ok("alive", _obj(status=_STR)), (),
                       secured=False),
        },
        "/readyz": {
            "get": {"summary": "Readiness: which stores can serve", "security": [],
                    "responses": {"200": _ready("ready, or degraded but serving"),
                                  "503": _ready("a durable store is configured and down, and Redis is down too")}},
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics, text exposition format", "security": [],
                    "responses": {"200": {"description": "metrics", "content": {"text/plain": {"schema": _STR}}}}},
        },
    }


def _ready(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Ready"}}}}


def _obj_optional(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


def build_document() -> dict[str, Any]:
    store = {"type": ["object", "null"], "properties": {"ok": {"type": "boolean"}, "state": _STR,
                                                       "last_error": {"type": ["string", "null"]}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ondemand", "version": "1.0.0",
                 "description": "Sessions, messages and profiles cached in an on-demand Redis, with a PostgreSQL "
                                "fallback. Values are JSON; `?ttl=` sets the expiry in seconds."},
        "paths": _paths(),
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when server.api_token is set"}},
            "parameters": {
                "session_id": _path_param("session_id"),
                "user_id": _path_param("user_id"),
                "ttl": {"name": "ttl", "in": "query", "required": False,
                        "description": "seconds, > 0 and at most ten years; default: the namespace ttl",
                        "schema": {"type": "number", "exclusiveMinimum": 0}},
                "last": {"name": "last", "in": "query", "required": False, "description": "only the last N messages",
                         "schema": {"type": "integer", "minimum": 0}},
            },
            "schemas": {
                "Error": ERROR,
                "Ready": {"type": "object", "required": ["status", "redis", "durable"],
                          "properties": {"status": {"enum": ["ready", "degraded", "unavailable"]},
                                         "redis": store, "durable": store}},
            },
        },
    }


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "description": "1 to 256 UTF-8 bytes, no control characters", "schema": {"type": "string"}}


DOCUMENT = build_document()


def document_for(app: web.Application) -> dict[str, Any]:
    """DOCUMENT restricted to the operations this app serves (the test endpoints can be turned off)."""
    served = {(route.method.lower(), route.resource.canonical)
              for route in app.router.routes() if route.resource is not None}
    paths = {}
    for path, item in DOCUMENT["paths"].items():
        operations = {method: op for method, op in item.items() if (method, path) in served}
        if operations:
            paths[path] = operations
    return {**DOCUMENT, "paths": paths}


async def openapi(request: web.Request) -> web.Response:
    """GET /api/openapi.json."""
    return json_response(document_for(request.app))
