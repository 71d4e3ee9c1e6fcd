"""Serving an app: the connection-level answers aiohttp gives itself, as ours, and bounded request reads.

aiohttp answers some requests before any route sees them: a request it cannot parse (a bad method, an
over-long URL or header, a broken chunk; `RequestHandler.handle_error`), and a request its router cannot
place at all (`CONNECT host:443`, `OPTIONS *`: no path, so no route, not even our catch-all) or whose
`Expect` it refuses (an HTTPException it turns into the response). Both come as plain text and the
first is logged at ERROR with a traceback. `OndemandRunner` serves an app with `JsonErrorsHandler`, a
`web.RequestHandler` (the protocol of each connection) whose `handle_error` answers our JSON error and
logs a client's garbage as one INFO line, and with a request factory that gives the second kind of
request (no path, or an `Expect`) a `web.Request` subclass which turns aiohttp's HTTPException into our
JSON error just before it is sent. Only apps served by this runner are concerned (`run.py`; any app
whose owner opts in by running it with `OndemandRunner`): nothing of aiohttp is patched.

Why these hooks and not a middleware: parser errors happen before any middleware or handler, and a
middleware costs every request (`app.web.endpoint`). Every request pays one plain call, the factory's;
a hook on every answer instead (overriding `finish_response`) measured 1.8% of a cached GET's
instructions (`bench/instructions.py`).

Reads are bounded (`server.header_timeout`, `server.body_timeout`): aiohttp's keep-alive timer, which
closes a connection that waits for a request head, also closes one whose head is still incomplete, so
it is set to the header timeout; the body is read under the body timeout by `read_body`
(`app.web.responses`, a 408 that closes the connection once written), and a body nobody reads is
drained for at most that long (aiohttp's lingering time) before the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong

from ondemand.config import Config
from ondemand.errors import StartupError
from ondemand.host.net import listening_sockets
from ondemand.web.keys import CONFIG
from ondemand.web.responses import HTTP_CODES, error_response

log = logging.getLogger("ondemand.web")

_CARET_LINE = re.compile(r"^\s*\^\s*$", re.M)


def _one_line(text: str) -> str:
    """aiohttp's parser messages span lines (the bad bytes, a caret under them): one line for logs and JSON."""
    return " ".join(_CARET_LINE.sub("", text).split())


def _refined(handler: web.RequestHandler, status: int, exc: BaseException | None, text: str) -> tuple[int, str]:
    """aiohttp answers every parser error 400; a line too long is 414 in the request line (its URL, which
    the parser hands over as a bytearray), 431 in a header, as are too many headers."""
    if isinstance(exc, LineTooLong):
        if "bytearray(b'" in text:
            return HTTPStatus.REQUEST_URI_TOO_LONG, f"the request line (method, URL, version) is over " \
                                                    f"{handler.max_line_size} bytes"
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"a header line is over {handler.max_field_size} bytes"
    if status == 400 and "Too many headers" in text:
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {handler.max_headers} header lines"
    return status, text


class JsonErrorsHandler(web.RequestHandler):
    """The protocol of one connection: aiohttp's, with its own answers in our JSON error shape."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (status 400, `exc` the parser's error), or an exception that
        escaped the app (500; 504 for a TimeoutError). The connection is closed after the answer."""
        if request.writer.output_size > 0:  # as aiohttp's: a response is under way, the connection is broken
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status >= 500:
            # Not the client's doing: every route of ours answers its own errors, so this is a bug to see.
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            response = error_response(status, "internal_error" if status == 500 else HTTP_CODES.get(status, "error"),
                                      "internal error; see the server log")
        else:
            text = _one_line(message or (getattr(exc, "message", None) or str(exc or "")) or "bad request")
            status, text = _refined(self, status, exc, text)
            # A port scanner or a TLS client on the HTTP port sends a bad method first: expected, DEBUG only.
            level = logging.DEBUG if self._request_count == 1 and isinstance(exc, BadHttpMethod) else logging.INFO
            log.log(level, "refused a malformed request from %s: %d %s", request.remote, status, text)
            response = error_response(status, HTTP_CODES.get(status, f"http_{status}"), text)
        response.force_close()
        return response



class _AnsweringJson(web.Request):
    """The request of the few messages aiohttp may answer itself with an HTTPException after parsing them: one
    whose target has no path (`CONNECT host:443`, `OPTIONS *`: no route can match it, not even our catch-all,
    so the router's 404 is the answer) or that carries an `Expect` (a refused one is a 417). Just before such
    an answer is sent, its plain text becomes our JSON error; every other answer goes out as it is."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        if isinstance(response, web.HTTPException) and response.status >= 400 and response.content_type != _JSON:
            response.body = orjson.dumps({"error": {
                "code": HTTP_CODES.get(response.status, f"http_{response.status}"),
                "message": _message_of(self, response)}})
            response.content_type = _JSON
            response.headers.popall(hdrs.CONTENT_LENGTH, None)  # the text's; sending counts the new body
        await super()._prepare_hook(response)


_JSON = "application/json"


def _message_of(request: web.BaseRequest, exc: web.HTTPException) -> str:
    if exc.status == 404 and not request.rel_url.path.startswith("/"):
        return (f"no such route: {request.method} {request.raw_path!r} has no path (the request line names "
                "no resource under /); see GET /api/openapi.json for the API")
    text = exc.text or exc.reason
    return exc.reason if text == f"{exc.status}: {exc.reason}" else _one_line(text)


class _JsonErrorsServer(web.Server):
    """aiohttp's low-level server, whose connections are `JsonErrorsHandler`s (`__call__` is the protocol
    factory the event loop calls per connection)."""

    def __call__(self) -> web.RequestHandler:
        return JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


def _request_factory(make: Any) -> Any:
    """`make` (the app's request factory), with `_AnsweringJson` for the requests aiohttp may answer itself.
    Every request passes here (one plain call and two checks: far cheaper than a hook on every answer, a
    coroutine more per request, measured at 1.8% of a cached GET's instructions)."""

    def factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        if message.path[:1] == "/" and hdrs.EXPECT not in message.headers:
            return make(message, payload, protocol, writer, task)
        return make(message, payload, protocol, writer, task, _cls=_AnsweringJson)

    return factory


class OndemandRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer aiohttp's own errors as ours (see the module docstring),
    with the read timeouts of `config` (default: the app's, set by `ondemand.web.setup`)."""

    def __init__(self, app: web.Application, config: Config | None = None, **kwargs: Any) -> None:
        config = config if config is not None else app[CONFIG]
        kwargs.setdefault("keepalive_timeout", config.server.header_timeout)
        kwargs.setdefault("lingering_time", config.server.body_timeout)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        """The app's server as AppRunner makes it (the app started and frozen), as a `_JsonErrorsServer`: the
        same handler, request factory and connection options (aiohttp keeps the latter in `_kwargs`, which
        it passes to each RequestHandler; the one private name we read)."""
        made = await super()._make_server()
        return _JsonErrorsServer(made.request_handler, request_factory=_request_factory(made.request_factory),
                                 handler_cancellation=made.handler_cancellation, **made._kwargs)


def run_app(app: web.Application, config: Config, *, reuse_port: bool = False) -> None:
    """Serve `app` on `config.server.host:port` until SIGINT or SIGTERM, as `web.run_app` would, with
    `OndemandRunner`. StartupError when it cannot start serving: the app's startup failed, or the
    address cannot be bound (busy, not ours). A second signal while it shuts down ends it at once."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, config, reuse_port))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, web.GracefulExit, KeyboardInterrupt):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)


async def _serve(app: web.Application, config: Config, reuse_port: bool) -> None:
    server = config.server
    # Bound before the app starts: a busy port fails at once, with nothing started to stop and log about.
    sockets = listening_sockets(server.host, server.port, reuse_port=reuse_port)
    runner = OndemandRunner(app, config, handle_signals=True, access_log=None,
                            shutdown_timeout=server.shutdown_timeout)
    try:
        try:
            await runner.setup()
        except (web.GracefulExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise StartupError(f"the app did not start: {exc}") from exc
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        await asyncio.Event().wait()  # until a signal raises GracefulExit here
    finally:
        await runner.cleanup()
        for sock in sockets:
            sock.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the loop and let it finish, as `web.run_app` does."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during shutdown",
                                         "exception": task.exception(), "task": task})
