"""The error middleware: every exception becomes `{"error": {"code", "message"}}` with its status,
and every request is recorded in the metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.errors import OndemandError
from app.web.keys import METRICS
from app.web.metrics_middleware import route_label

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
    """The outermost layer: every exception becomes the JSON error shape, and every request is
    recorded in the app's metrics with its final status. One layer for both on purpose: on a cached
    GET each middleware layer is a measurable share of the request."""
    start = time.perf_counter()
    status = 500  # also what a cancelled request (client gone) is recorded as
    try:
        try:
            response = await handler(request)
        except OndemandError as exc:
            response = error_response(exc.http_status, exc.code, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                status = exc.status
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = error_response(exc.status, _HTTP_CODES.get(exc.status, f"http_{exc.status}"), exc.reason,
                                      headers)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(500, "internal_error", "internal error; see the server log")
        status = response.status
        return response
    finally:
        request.app[METRICS].observe(request.method, route_label(request), status, time.perf_counter() - start)
