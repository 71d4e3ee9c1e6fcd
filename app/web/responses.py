"""The HTTP helpers every web module shares: JSON answers, the JSON error shape, reading a request's body."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ondemand.errors import InvalidInput, OndemandError, error_text
from ondemand.store.values import parse_json
from ondemand.web.keys import CONFIG

# The error code of each HTTP status we (or aiohttp, through us) answer without an OndemandError of its own.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    431: "header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
    504: "gateway_timeout",
}
_UTF8 = frozenset({"utf-8", "utf8"})


class RequestTimeout(OndemandError):
    """The request's body did not arrive within `server.body_timeout`: 408, and the connection is closed."""

    code = "request_timeout"
    http_status = 408

    def answer(self, request: web.BaseRequest) -> web.Response:
        """The 408, which closes the connection once written: what is left of a body that stopped coming is
        not waited for (aiohttp would drain it for its lingering time first)."""
        return _ClosingResponse(request.protocol, body=orjson.dumps({"error": {"code": self.code,
                                                                              "message": str(self)}}),
                                status=self.http_status, content_type="application/json")


class _ClosingResponse(web.Response):
    def __init__(self, protocol: web.RequestHandler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.force_close()
        self._protocol = protocol

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        self._protocol.force_close()  # the answer is in the transport's buffer, which closing flushes first


class ClientGone(OndemandError):
    """The client closed its connection before its body arrived: nobody will read the answer."""

    code = "client_gone"
    http_status = 400


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The error shape of every endpoint: `{"error": {"code", "message"}}`."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


async def read_body(request: web.Request) -> bytes:
    """The request's body, read within `server.body_timeout` (RequestTimeout, 408, past it). A body the client
    sent malformed (a broken chunk) is InvalidInput; one it abandoned, ClientGone. Over the app's
    `client_max_size`: aiohttp's 413."""
    timeout = request.app[CONFIG].server.body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s (server.body_timeout)") from None
    except web.RequestPayloadError as exc:
        raise InvalidInput(f"the request body is malformed: {' '.join(error_text(exc).split())}") from None
    except ConnectionError:
        raise ClientGone("the client closed the connection before its body arrived") from None


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    """The request body as JSON (UTF-8, the only encoding JSON has); 415 for another content type or charset,
    400 for malformed JSON or a number that would not read back as sent, 408 for a body that does not arrive."""
    if not request.body_exists:
        if optional:
            return {}
        raise InvalidInput("a JSON body is required")
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(reason=f"expected Content-Type application/json, got {request.content_type}")
    charset = request.charset
    if charset is not None and charset.lower() not in _UTF8:
        raise web.HTTPUnsupportedMediaType(reason=f"expected Content-Type application/json in UTF-8 (JSON has no "
                                                  f"other encoding), got charset={charset}")
    body = await read_body(request)
    try:
        return parse_json(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
