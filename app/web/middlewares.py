"""One error middleware: every exception becomes `{"error": {"code", "message"}}` with its status."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.errors import OndemandError

log = logging.getLogger("ondemand.web")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except OndemandError as exc:
        return error_response(exc.http_status, exc.code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, _HTTP_CODES.get(exc.status, f"http_{exc.status}"), exc.reason, headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the server log")
