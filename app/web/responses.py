"""The HTTP helpers every web module shares: JSON answers, the JSON error shape, reading a JSON body."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ondemand.errors import InvalidInput
from ondemand.store.values import parse_json


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The error shape of every endpoint: `{"error": {"code", "message"}}`."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    """The request body as JSON; 415 for another content type, 400 for malformed JSON."""
    if not request.body_exists:
        if optional:
            return {}
        raise InvalidInput("a JSON body is required")
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(reason=f"expected Content-Type application/json, got {request.content_type}")
    body = await request.read()
    try:
        return parse_json(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
