"""@cached for async functions and @response_cache for aiohttp handlers, through a real Redis and real HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from ondemand import Runtime
from ondemand.aside import cached
from ondemand.errors import InvalidInput
from ondemand.web import setup
from ondemand.web.response_cache import response_cache


async def test_cached_keys_come_from_the_arguments_by_the_template(runtime: Runtime) -> None:
    calls: list[tuple[str, int]] = []

    @cached(lambda: runtime, "profile", key="user:{user_id}:{page}", ttl=60)
    async def profile(user_id: str, page: int = 1) -> dict[str, Any]:
        calls.append((user_id, page))
        await asyncio.sleep(0.05)
        return {"user": user_id, "page": page}

    results = await asyncio.gather(*(profile("ada") for _ in range(10)), profile("ada", page=2), profile("bob", 1))
    assert results[:10] == [{"user": "ada", "page": 1}] * 10
    assert sorted(calls) == [("ada", 1), ("ada", 2), ("bob", 1)]  # one call per key
    assert await runtime.dispatcher.get("profile", "user:ada:1") == {"user": "ada", "page": 1}  # the key, as told
    assert profile.cache_key("ada", page=2) == "user:ada:2"  # type: ignore[attr-defined]
    await runtime.dispatcher.delete("profile", "user:ada:1")
    assert await profile(user_id="ada") == {"user": "ada", "page": 1} and len(calls) == 4


async def test_cached_default_key_is_the_function_and_its_arguments(runtime: Runtime) -> None:
    @cached(runtime.cache, "profile", ttl=60)
    async def square(n: int) -> int:
        return n * n

    assert await square(7) == 49
    assert await runtime.dispatcher.get("profile", square.cache_key(7)) == 49  # type: ignore[attr-defined]
    assert square.cache_key(7).endswith("square:7")  # type: ignore[attr-defined]


def test_cached_refuses_a_template_naming_an_unknown_argument_and_a_sync_function() -> None:
    with pytest.raises(InvalidInput, match=r"names 'uid', which is not a parameter of .*by_user\(user_id"):
        @cached(None, "profile", key="user:{uid}")
        async def by_user(user_id: str) -> None: ...

    with pytest.raises(InvalidInput, match="async functions"):
        @cached(None, "profile")
        def plain(x: int) -> int:
            return x

    with pytest.raises(InvalidInput, match="stale_ttl"):
        cached(None, "profile", stale_ttl=-1)


def _app(make_config: Any, handler: Any, path: str = "/items/{item}") -> web.Application:
    app = web.Application()
    app.router.add_get(path, handler)
    setup(app, make_config())
    return app


async def test_responses_are_cached_with_etag_and_304_and_max_age(aiohttp_client, make_config) -> None:
    calls: list[str] = []

    @response_cache("profile", ttl=30, vary=["Accept-Language"])
    async def item(request: web.Request) -> web.Response:
        calls.append(request.path_qs)
        await asyncio.sleep(0.05)
        return web.json_response({"item": request.match_info["item"], "lang": request.headers.get("Accept-Language")})

    client = await aiohttp_client(_app(make_config, item))
    responses = await asyncio.gather(*(client.get("/items/a?x=1") for _ in range(8)))
    assert [r.status for r in responses] == [200] * 8 and calls == ["/items/a?x=1"]  # one handler call
    first = responses[0]
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "max-age=30" and first.headers["Vary"] == "Accept-Language"
    assert await first.json() == {"item": "a", "lang": None}
    assert all(r.headers["ETag"] == etag for r in responses)
    again = await client.get("/items/a?x=1", headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b"" and again.headers["ETag"] == etag
    other = await client.get("/items/a?x=1", headers={"If-None-Match": '"something-else"'})
    assert other.status == 200 and await other.json() == {"item": "a", "lang": None}
    assert len(calls) == 1
    await client.get("/items/a?x=2")  # another query
    french = await client.get("/items/a?x=1", headers={"Accept-Language": "fr"})  # another Vary value
    assert await french.json() == {"item": "a", "lang": "fr"} and len(calls) == 3


async def test_only_allowed_statuses_are_cached_and_never_cookies_or_authorized(aiohttp_client, make_config) -> None:
    calls: list[str] = []

    @response_cache("profile", ttl=30)
    async def item(request: web.Request) -> web.Response:
        calls.append(request.match_info["item"])
        if request.match_info["item"] == "missing":
            raise web.HTTPNotFound(text="no such item")
        response = web.Response(text="body")
        if request.match_info["item"] == "cookie":
            response.set_cookie("session", "secret")
        return response

    client = await aiohttp_client(_app(make_config, item))
    for _ in range(2):
        missing = await client.get("/items/missing")
        assert missing.status == 404 and await missing.text() == "no such item" and "ETag" not in missing.headers
        cookie = await client.get("/items/cookie")
        assert cookie.status == 200 and "ETag" not in cookie.headers
        authorized = await client.get("/items/plain", headers={"Authorization": "Bearer x"})
        assert authorized.status == 200 and "ETag" not in authorized.headers
    assert calls == ["missing", "cookie", "plain"] * 2

    @response_cache("profile", ttl=30, statuses=[200, 404])
    async def not_found(request: web.Request) -> web.Response:
        calls.append("404")
        raise web.HTTPNotFound(text="gone")

    client = await aiohttp_client(_app(make_config, not_found, "/gone"))
    statuses = [(await client.get("/gone")).status for _ in range(3)]
    assert statuses == [404] * 3 and calls.count("404") == 1


async def test_loads_joins_and_stale_values_show_in_status_and_metrics(aiohttp_client, make_config) -> None:
    from ondemand.web import RUNTIME, create_app

    app = create_app(make_config())
    client = await aiohttp_client(app)
    rt = app[RUNTIME]

    async def loader() -> str:
        await asyncio.sleep(0.05)
        return "v"

    await asyncio.gather(*(rt.cache.get_or_compute("profile", "m", loader, ttl=0.1, stale_ttl=30) for _ in range(3)))
    await asyncio.sleep(0.15)
    assert await rt.cache.get_or_compute("profile", "m", loader, ttl=0.1, stale_ttl=30) == "v"  # stale, refreshed
    status = await (await client.get("/api/cache/status")).json()
    aside = status["dispatcher"]["aside"]["namespaces"]["profile"]
    assert aside["joins"] == 2 and aside["stale_served"] == 1 and aside["loads"] >= 1
    text = await (await client.get("/metrics")).text()
    assert 'ondemand_aside_joins_total{namespace="profile"} 2.0' in text
    assert 'ondemand_aside_stale_served_total{namespace="profile"} 1.0' in text
    assert 'ondemand_aside_loads_total{namespace="profile"}' in text
    assert 'ondemand_aside_load_seconds_total{namespace="profile"}' in text
