"""`@response_cache(...)`: an aiohttp handler's responses cached through get_or_compute.

Keyed by method, path, query and the request headers named in `vary`; only the statuses allowed (200 by
default); an `ETag` (a hash of the body), `304 Not Modified` for a matching `If-None-Match`, `Cache-Control:
max-age` from the ttl. A response that sets a cookie, or a request that carries Authorization, is never cached
unless allowed. Concurrent requests for one key share one handler call (each gets a response of its own).
The README ("Cache-aside") documents the options.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import hdrs, web

from ondemand.store.aside import AsideOptions
from ondemand.web.mount import get_runtime

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Headers not stored with a response: aiohttp sets them for each response it sends.
_NOT_STORED = frozenset(h.lower() for h in (hdrs.CONTENT_LENGTH, hdrs.TRANSFER_ENCODING, hdrs.DATE, hdrs.CONNECTION,
                                             hdrs.SERVER, hdrs.ETAG, hdrs.CACHE_CONTROL, hdrs.VARY))


class _Uncacheable(Exception):
    """A response the options do not let us cache: the request it was made for gets it as it is; the others
    sharing the call call the handler themselves (it may be theirs alone: a cookie, an error)."""

    def __init__(self, origin: web.Request, answer: web.StreamResponse | web.HTTPException) -> None:
        super().__init__("not cached")
        self.origin, self.answer = origin, answer


def _snapshot(response: web.StreamResponse) -> dict[str, Any] | None:
    """A response as JSON (None: one whose body we cannot copy)."""
    if not isinstance(response, web.Response) or not isinstance(response.body, (bytes, bytearray, type(None))):
        return None
    body = bytes(response.body or b"")
    return {
        "status": response.status,
        "headers": [*([name, value] for name, value in response.headers.items() if name.lower() not in _NOT_STORED),
                    *([hdrs.SET_COOKIE, cookie.OutputString()] for cookie in response.cookies.values())],
        "body": base64.b64encode(body).decode(),
        "etag": '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"',
    }


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags


def response_cache(namespace: str, *, ttl: float, vary: Iterable[str] = (), statuses: Iterable[int] = (200,),
                   allow_authorized: bool = False, allow_cookies: bool = False,
                   **options: Any) -> Callable[[Handler], Handler]:
    """Cache a GET/HEAD handler's responses in `namespace` for `ttl` seconds (get_or_compute's other options
    apply: stale_ttl, early, lease_ttl, wait). The handler's app must be set up by ondemand (its runtime)."""
    checked = AsideOptions.checked(ttl=ttl, **options)
    vary = tuple(vary)
    allowed = frozenset(statuses)
    max_age = f"max-age={int(ttl)}"

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def cached_handler(request: web.Request) -> web.StreamResponse:
            authorized = hdrs.AUTHORIZATION in request.headers and not allow_authorized
            if request.method not in ("GET", "HEAD") or authorized:
                return await handler(request)
            varied = "\0".join(request.headers.get(name, "") for name in vary)
            item_id = hashlib.blake2b(f"{request.method}\0{request.path_qs}\0{varied}".encode(),
                                      digest_size=20).hexdigest()

            async def load() -> dict[str, Any]:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:  # a status answered by raising: copied like a response
                    if exc.status not in allowed:
                        raise _Uncacheable(request, exc) from None
                    response = web.Response(status=exc.status, headers=exc.headers, body=exc.body)
                snapshot = _snapshot(response)
                if snapshot is None or snapshot["status"] not in allowed or (
                        not allow_cookies and (response.cookies or hdrs.SET_COOKIE in response.headers)):
                    raise _Uncacheable(request, response)
                return snapshot

            try:
                snapshot = await get_runtime(request).dispatcher.get_or_compute(namespace, item_id, load,
                                                                                options=checked)
            except _Uncacheable as exc:
                if exc.origin is not request:
                    return await handler(request)
                if isinstance(exc.answer, web.HTTPException):
                    raise exc.answer from None
                return exc.answer
            if _etag_matches(request.headers.get(hdrs.IF_NONE_MATCH), snapshot["etag"]):
                return web.Response(status=304, headers=_cache_headers(snapshot["etag"], max_age, vary))
            return _response(snapshot, vary, max_age)

        return cached_handler

    return decorate


def _cache_headers(etag: str, max_age: str, vary: tuple[str, ...]) -> dict[str, str]:
    headers = {hdrs.ETAG: etag, hdrs.CACHE_CONTROL: max_age}
    if vary:
        headers[hdrs.VARY] = ", ".join(vary)
    return headers


def _response(snapshot: dict[str, Any], vary: tuple[str, ...], max_age: str) -> web.Response:
    response = web.Response(status=snapshot["status"], body=base64.b64decode(snapshot["body"]))
    for name, value in snapshot["headers"]:
        response.headers.add(name, value)
    response.headers.update(_cache_headers(snapshot["etag"], max_age, vary))
    return response
