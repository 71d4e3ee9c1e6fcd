"""What a hostile or careless HTTP client meets, as the real server answers it (`OndemandRunner`, what run.py
serves with): every error our JSON error with its status, bounded reads, one id per URL, numbers kept exactly
or refused, one value per query parameter, UTF-8 only, a dropped write that says so, CORS when asked for.

Raw sockets where a client library would correct the request (a bad method, an escape it would re-encode,
a body it would finish sending).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jsonschema_rs
import orjson
import pytest
from aiohttp import web

from ondemand.config import Config
from ondemand.host.net import free_port
from ondemand.web import RUNTIME, create_app
from ondemand.web.openapi import document_for
from ondemand.web.serving import OndemandRunner

TOKEN = "edge-t0ken"


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[int, web.Application]]:
    """Our app on a free loopback port, served as run.py serves it; stopped on the way out."""
    app = create_app(config)
    runner = OndemandRunner(app)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield port, app
    finally:
        await runner.cleanup()


class Answer:
    def __init__(self, raw: bytes, closed: bool) -> None:
        self.raw, self.closed = raw, closed
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in self.headers:  # what a client reads as this answer's body, no more
            self.body = self.body[:int(self.headers["content-length"])]

    def json(self) -> Any:
        return orjson.loads(self.body)

    def error(self) -> dict[str, str]:
        assert self.headers.get("content-type", "").startswith("application/json"), self.raw[:300]
        return self.json()["error"]


async def exchange(port: int, data: bytes, *, wait: float = 5.0) -> Answer:
    """Send `data` on a fresh connection and read one answer: until its Content-Length is in, or the server
    closes (`closed`), or `wait` seconds pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw, closed = b"", False
    try:
        writer.write(data)
        async with asyncio.timeout(wait):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                raw += chunk
                head, sep, body = raw.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if sep and length is not None and len(body) >= length:
                    break
    except TimeoutError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Answer(raw, closed)


def request(method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config({"server": {"header_timeout": 1.0, "body_timeout": 1.0}})


# -- aiohttp's own answers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "status", "code", "says"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long", "request line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "header_fields_too_large", "header"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431,
     "header_fields_too_large", "header lines"),
    (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", "Invalid method"),
    (b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", "Invalid method"),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request", "Invalid HTTP version"),
    (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400, "bad_request", "Invalid header token"),
    (b"PUT /api/sessions/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json"
     b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400, "bad_request", "chunk size"),
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400, "bad_request", "Content-Length"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, "bad_request", "HTTPS"),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 404, "not_found", "no path"),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found", "no path"),
    (b"PUT /api/sessions/a HTTP/1.1\r\nHost: x\r\nExpect: the-moon\r\nContent-Type: application/json\r\n"
     b"Content-Length: 2\r\n\r\n{}", 417, "expectation_failed", "the-moon"),
])
async def test_every_answer_aiohttp_gives_itself_is_our_json_error(config, caplog, data, status, code, says) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(config) as (port, _):
        answer = await exchange(port, data)
    assert answer.status == status, answer.raw[:300]
    error = answer.error()
    assert error["code"] == code and says in error["message"], error
    # Client garbage is never an ERROR with a traceback: at most one INFO line.
    for record in caplog.records:
        assert record.levelno < logging.WARNING and record.exc_info is None, record.getMessage()
        assert "\n" not in record.getMessage()


async def test_a_users_own_runner_is_untouched(config) -> None:
    """Only apps served by OndemandRunner answer this way: nothing of aiohttp is patched, so a plain
    AppRunner in the same process still answers aiohttp's plain text."""
    async with serving(config) as (port, _):
        assert (await exchange(port, b"G@T / HTTP/1.1\r\n\r\n")).status == 400
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        answer = await exchange(port, b"G@T / HTTP/1.1\r\n\r\n")
    finally:
        await runner.cleanup()
    assert answer.status == 400 and answer.headers["content-type"].startswith("text/plain")


# -- bounded reads --------------------------------------------------------------------------------


async def test_half_open_requests_get_408_or_a_close_within_the_timeouts(config, caplog) -> None:
    """200 connections at once, each stuck: half its request head sent, or its body (Content-Length 10, 5
    bytes sent). Every body gets a 408 and every connection is closed within the timeouts (1 s each here),
    while the server goes on answering others; nothing is logged at WARNING or above."""
    caplog.set_level(logging.INFO)
    async with serving(config) as (port, _):
        streams = []
        for i in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 2:
                writer.write(b"PUT /api/sessions/h%d HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 10\r\n\r\n{\"a\":" % i)
            else:
                writer.write(b"GET /api/sessions/h%d HTTP/1.1\r\nHost: x\r\nX-Slow: " % i)
            streams.append((i, reader, writer))
        started = time.monotonic()
        assert (await exchange(port, request("GET", "/healthz"))).status == 200  # others are served meanwhile

        async def outcome(i: int, reader: asyncio.StreamReader) -> tuple[int, bytes, float]:
            data = await asyncio.wait_for(reader.read(), 10)  # until the server closes
            return i, data, time.monotonic() - started

        results = await asyncio.gather(*(outcome(i, reader) for i, reader, _ in streams))
        for _, _, writer in streams:
            writer.close()
    for i, data, elapsed in results:
        assert elapsed < 1.0 + 2.0, (i, elapsed)  # the timeout, and slack for a loaded machine
        if i % 2:
            answer = Answer(data, True)
            assert answer.status == 408 and answer.error()["code"] == "request_timeout", data[:200]
            assert "server.body_timeout" in answer.error()["message"]
        else:
            assert data == b"", data[:200]  # an unfinished head: closed, nothing to answer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_a_client_that_abandons_its_body_is_no_traceback(config, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with serving(config) as (port, app):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /api/sessions/gone HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"a\":")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()
        await asyncio.sleep(0.3)
        assert (await exchange(port, request("GET", "/healthz"))).status == 200
        assert await app[RUNTIME].dispatcher.get("session", "gone") is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


# -- one id, one URL --------------------------------------------------------------------------------


async def test_an_id_is_its_path_segment_percent_decoded_as_utf8(config) -> None:
    async with serving(config) as (port, app):
        body = b'{"v": 1}'
        for target in ("/api/sessions/%FF%FE", "/api/sessions/%C3%28", "/api/sessions/%zz", "/api/sessions/a%",
                       "/api/users/%FF/profile", "/api/ns/session/%E2%82", "/api/ns/%FF/x"):
            for method in ("PUT", "GET", "DELETE"):
                answer = await exchange(port, request(method, target, body if method == "PUT" else None))
                assert answer.status == 400, (method, target, answer.raw[:300])
                assert "percent-encoded UTF-8" in answer.error()["message"], answer.error()
        # %25 is the '%' of an id: "%FF%FE" is a legitimate id, and the only URL that names it.
        answer = await exchange(port, request("PUT", "/api/sessions/%25FF%25FE", body))
        assert answer.status == 200 and answer.json()["session_id"] == "%FF%FE"
        answer = await exchange(port, request("GET", "/api/sessions/%25FF%25FE"))
        assert answer.json()["session_id"] == "%FF%FE" and answer.json()["value"] == {"v": 1}
        assert await app[RUNTIME].dispatcher.get("session", "%FF%FE") == {"v": 1}
        # Valid escapes decode; an escaped and an unescaped spelling of one character are one id (RFC 3986).
        answer = await exchange(port, request("PUT", "/api/sessions/%E2%82%AC%2Fx", body))
        assert answer.status == 200 and answer.json()["session_id"] == "€/x"
        assert (await exchange(port, request("GET", "/api/sessions/%61bc%2fx"))).status == 404
        await app[RUNTIME].dispatcher.set("session", "abc/x", 1)
        assert (await exchange(port, request("GET", "/api/sessions/%61bc%2fx"))).json()["value"] == 1


# -- numbers, ttls, query parameters, charsets -------------------------------------------------------


@pytest.mark.parametrize("literal", [b"3.141592653589793238462643383279", b"12345678901234567890.5", b"1e-400",
                                     b"1e400", b"2.5e-324", b"0.12345678901234567"])
async def test_a_decimal_that_would_read_back_changed_is_refused(config, literal) -> None:
    async with serving(config) as (port, app):
        for target, body in (("/api/sessions/n", b'{"pi": %s}' % literal), ("/api/users/u/messages", b"[%s]" % literal),
                             ("/api/users/u/warmup", b'{"profile": [1, %s]}' % literal)):
            method = "PUT" if "warmup" not in target else "POST"
            answer = await exchange(port, request(method, target, body))
            assert answer.status == 400, (target, answer.raw[:300])
            assert "read back as the decimal that was sent" in answer.error()["message"]
            assert literal.decode()[:30] in answer.error()["message"]
        assert await app[RUNTIME].dispatcher.get("session", "n") is None


async def test_decimals_that_read_back_as_sent_are_kept(config) -> None:
    async with serving(config) as (port, _):
        body = (b'{"a": 0.1, "b": 1E2, "c": -0.0, "d": 0.10, "e": 1.7976931348623157e-300, "f": 5e-324, '
                b'"g": 18446744073709551615, "h": -9.223372036854776e18, "s": "1.5e999"}')
        assert (await exchange(port, request("PUT", "/api/sessions/d", body))).status == 200
        value = (await exchange(port, request("GET", "/api/sessions/d"))).json()["value"]
    assert value == {"a": 0.1, "b": 100.0, "c": -0.0, "d": 0.1, "e": 1.7976931348623157e-300, "f": 5e-324,
                     "g": 2**64 - 1, "h": -9.223372036854776e18, "s": "1.5e999"}


@pytest.mark.parametrize("literal", [b"18446744073709551616", b"-9223372036854775809", b"1e20", b"2.09e179",
                                     b"-1.5e300"])
async def test_a_whole_number_beyond_64_bits_is_refused_however_written(config, literal) -> None:
    """JSON Schema (and so the OpenAPI document) knows numbers, not notations: 1e20 is the integer
    100000000000000000000, which 64 bits cannot hold, whether it is written with an exponent or not."""
    async with serving(config) as (port, _):
        answer = await exchange(port, request("PUT", "/api/sessions/w", b"[%s]" % literal))
    assert answer.status == 400 and "whole numbers must be from" in answer.error()["message"], answer.raw[:300]


async def test_json_in_another_charset_is_415(config) -> None:
    async with serving(config) as (port, _):
        for charset in ("latin-1", "utf-16", "ISO-8859-1"):
            answer = await exchange(port, b"PUT /api/sessions/c HTTP/1.1\r\nHost: x\r\nContent-Type: application/json; "
                                          b"charset=%s\r\nContent-Length: 2\r\n\r\n{}" % charset.encode())
            assert answer.status == 415 and "UTF-8" in answer.error()["message"], answer.raw[:300]
        answer = await exchange(port, b"PUT /api/sessions/c HTTP/1.1\r\nHost: x\r\nContent-Type: application/json; "
                                      b"charset=UTF-8\r\nContent-Length: 2\r\n\r\n{}")
        assert answer.status == 200


# -- a write the cache did not store says so ---------------------------------------------------------


async def test_a_dropped_write_says_so_in_a_header(make_config) -> None:
    config = make_config({"lifecycle": {"redis_binary": "/nonexistent/redis-server"}})
    async with serving(config) as (port, _):
        for method, target, body in (("PUT", "/api/users/u/profile", b'{"n": 1}'),
                                     ("PUT", "/api/users/u/messages", b"[1]"),
                                     ("POST", "/api/users/u/messages", b'{"m": 1}'),
                                     ("POST", "/api/users/u/warmup", b'{"profile": {"n": 1}}'),
                                     ("PUT", "/api/ns/profile/u", b"1")):
            answer = await exchange(port, request(method, target, body))
            assert answer.status == 200, (target, answer.raw[:300])  # the status the README promises
            assert answer.headers.get("ondemand-write") == "dropped", (target, answer.headers)
        assert (await exchange(port, request("GET", "/api/users/u/profile"))).status == 404


async def test_a_write_kept_by_the_durable_store_alone_says_so(durable_config) -> None:
    async with serving(durable_config({"lifecycle": {"redis_binary": "/nonexistent/redis-server"}})) as (port, _):
        answer = await exchange(port, request("PUT", "/api/sessions/s", b'{"n": 1}'))
        assert answer.status == 200 and answer.headers.get("ondemand-write") == "durable-only"
        answer = await exchange(port, request("POST", "/api/users/u/warmup", b'{"session": 1, "profile": 2}'))
        assert answer.headers.get("ondemand-write") == "dropped"  # the profile (cache-only) is stored nowhere
        assert (await exchange(port, request("GET", "/api/sessions/s"))).json()["value"] == {"n": 1}


async def test_a_stored_write_has_no_such_header(config) -> None:
    async with serving(config) as (port, _):
        answer = await exchange(port, request("PUT", "/api/users/u/profile", b'{"n": 1}'))
        assert answer.status == 200 and "ondemand-write" not in answer.headers


# -- CORS -----------------------------------------------------------------------------------------


PREFLIGHT = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "PUT",
             "Access-Control-Request-Headers": "authorization, content-type"}


async def test_cors_is_off_by_default(config) -> None:
    async with serving(config) as (port, _):
        answer = await exchange(port, request("OPTIONS", "/api/sessions/s", headers=PREFLIGHT))
        assert answer.status == 405 and "access-control-allow-origin" not in answer.headers
        answer = await exchange(port, request("GET", "/healthz", headers={"Origin": "https://app.example.com"}))
        assert answer.status == 200 and "access-control-allow-origin" not in answer.headers


async def test_cors_when_configured(make_config) -> None:
    config = make_config({"server": {"api_token": TOKEN, "cors_origins": ["https://app.example.com"],
                                     "cors_max_age": 60}})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(config) as (port, _):
        # A preflight needs no token (a browser never sends one on it) and names what may be sent.
        answer = await exchange(port, request("OPTIONS", "/api/sessions/s", headers=PREFLIGHT))
        assert answer.status == 204, answer.raw[:300]
        assert answer.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "PUT" in answer.headers["access-control-allow-methods"]
        assert answer.headers["access-control-allow-headers"] == "Authorization, Content-Type"
        assert answer.headers["access-control-max-age"] == "60"
        # The request itself needs the token as always, and its answer (errors too) carries the origin.
        origin = {"Origin": "https://app.example.com"}
        answer = await exchange(port, request("PUT", "/api/sessions/s", b"1", headers=origin))
        assert answer.status == 401 and answer.headers["access-control-allow-origin"] == "https://app.example.com"
        answer = await exchange(port, request("PUT", "/api/sessions/s", b"1", headers={**origin, **auth}))
        assert answer.status == 200 and answer.headers["access-control-allow-origin"] == "https://app.example.com"
        assert answer.headers["access-control-expose-headers"] == "Ondemand-Write"
        assert answer.headers["vary"] == "Origin"
        # Another origin: no CORS headers, and its preflight is refused.
        answer = await exchange(port, request("GET", "/api/sessions/s", headers={"Origin": "https://evil.example",
                                                                                 **auth}))
        assert answer.status == 200 and "access-control-allow-origin" not in answer.headers
        answer = await exchange(port, request("OPTIONS", "/api/sessions/s",
                                              headers={**PREFLIGHT, "Origin": "https://evil.example"}))
        assert answer.status == 403 and "cors_origins" in answer.error()["message"]
        # An OPTIONS that is not a preflight is like any method no route serves: the token first.
        assert (await exchange(port, request("OPTIONS", "/api/sessions/s"))).status == 401


# -- the OpenAPI document says the number rules in a form validators check ------------------------------


def test_the_documented_value_schema_refuses_what_the_server_refuses(make_config) -> None:
    document = document_for(create_app(make_config()))
    schema = {"$ref": "#/components/schemas/Value", "components": document["components"]}
    validator = jsonschema_rs.Draft202012Validator(schema)
    for ok in ({"a": [1, 2.5, "x", None, True]}, 2**64 - 1, -(2**63), 0.1, [None], "s"):
        assert validator.is_valid(ok), ok
    for bad in (None, 2**64, [2**64], {"a": {"b": -(2**63) - 1}}):
        assert not validator.is_valid(bad), bad
    ttl = document["components"]["parameters"]["ttl"]["schema"]
    assert ttl["minimum"] == 0.001 and ttl["maximum"] == 10 * 365 * 24 * 3600
