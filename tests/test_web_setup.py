"""ondemand in a user's own aiohttp app: `ondemand.web.setup(app, config, ...)`, against a real Redis.

The runtime in the app's cleanup_ctx, `get_runtime` from the app's handlers and sub-applications, our
JSON errors for the user's handlers, our routes under a prefix (status page, OpenAPI, metrics, token,
catch-all), and README's "Use it in your aiohttp app" example, run from the README itself.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import ondemand.web
from ondemand.errors import ConfigError, InvalidInput, StorageUnavailable
from ondemand.web import RUNTIME, create_app, get_runtime, setup
from ondemand.web.openapi import document_for
from ondemand.web.page import STATIC_DIR
from tests.support import ROOT, redis_children

TOKEN = "setup-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def raises_invalid_input(request: web.Request) -> web.Response:
    raise InvalidInput("widget ids are even numbers")


async def raises_unavailable(request: web.Request) -> web.Response:
    raise StorageUnavailable("every store is down (raised by the user's handler)")


async def mine(request: web.Request) -> web.Response:
    return web.json_response({"mine": request.match_info.get("name", "plain")})


async def error_of(resp: Any, status: int, code: str) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["code"] == code
    return body["error"]["message"]


def user_app(config: Any, **options: Any) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app.router.add_get("/widgets/{widget_id}", raises_invalid_input)
    app.router.add_get("/down", raises_unavailable)
    setup(app, config, **options)
    return app


# -- the runtime and the user's handlers --------------------------------------------------------


async def test_the_runtime_starts_with_the_app_spawning_nothing_and_is_found_from_handlers(aiohttp_client,
                                                                                          make_config) -> None:
    app = web.Application()
    sub = web.Application()

    async def counter(request: web.Request) -> web.Response:
        runtime = get_runtime(request)
        assert runtime is request.app[RUNTIME]
        visits = (await runtime.cache.get_profile("counter") or 0) + 1
        await runtime.cache.cache_profile("counter", visits)
        return web.json_response({"visits": visits})

    async def from_sub(request: web.Request) -> web.Response:
        # A user's sub-application of the app set up: no runtime of its own, its parent's is found.
        assert RUNTIME not in request.app
        return web.json_response({"same": get_runtime(request) is app[RUNTIME]})

    app.router.add_get("/count", counter)
    sub.router.add_get("/same", from_sub)
    setup(app, make_config())
    app.add_subapp("/sub", sub)
    client = await aiohttp_client(app)
    runtime = app[RUNTIME]
    assert runtime.on_demand.state == "stopped" and redis_children() == []  # started, nothing spawned
    assert await (await client.get("/count")).json() == {"visits": 1}
    assert await (await client.get("/count")).json() == {"visits": 2}
    assert runtime.on_demand.state == "running" and len(redis_children()) == 1
    assert await (await client.get("/sub/same")).json() == {"same": True}
    assert (await client.get("/api/cache/status")).status == 404  # no routes of ours unless asked
    await client.close()
    assert redis_children() == []  # the runtime closed on cleanup and stopped its server


def test_get_runtime_without_setup_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"call ondemand\.web\.setup\(app, config\)"):
        get_runtime(make_mocked_request("GET", "/", app=web.Application()))


async def test_an_ondemand_error_in_the_users_handler_answers_json_with_its_status(aiohttp_client,
                                                                                   make_config) -> None:
    client = await aiohttp_client(user_app(make_config()))
    assert "even numbers" in await error_of(await client.get("/widgets/3"), 400, "invalid_input")
    assert "every store is down" in await error_of(await client.get("/down"), 503, "storage_unavailable")
    # What is not ours stays aiohttp's: an unknown path of the user's app.
    resp = await client.get("/nothing-here")
    assert resp.status == 404 and resp.content_type == "text/plain"


async def test_without_json_errors_the_users_handlers_are_left_alone(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(user_app(make_config(), json_errors=False))
    resp = await client.get("/widgets/3")
    assert resp.status == 500 and resp.content_type == "text/plain"


def test_our_own_server_has_no_middleware_and_a_users_app_one(make_config) -> None:
    """create_app's routes are all ours and wrapped: a middleware would sit on the hot path for nothing."""
    config = make_config()
    assert list(create_app(config).middlewares) == []
    assert list(user_app(config).middlewares) == [ondemand.web.mount.ondemand_errors]
    assert list(user_app(config, routes="/ondemand").middlewares) == [ondemand.web.mount.ondemand_errors]


@pytest.mark.parametrize("routes", ["ondemand", "/a/{b}", "//x", "", 5])
def test_a_bad_prefix_is_refused(make_config, routes: Any) -> None:
    with pytest.raises(ValueError, match="routes must be None, '/' or a prefix"):
        setup(web.Application(), make_config(), routes=routes)


def test_setup_must_come_before_the_app_is_mounted_and_only_once(make_config) -> None:
    config = make_config()
    app = web.Application()
    setup(app, config)
    with pytest.raises(RuntimeError, match="already called"):
        setup(app, config)
    mounted = web.Application()
    web.Application().add_subapp("/x", mounted)
    with pytest.raises(RuntimeError, match="before the app is started or mounted"):
        setup(mounted, config)


# -- our routes under a prefix ------------------------------------------------------------------


async def test_our_routes_under_a_prefix(aiohttp_client, make_config) -> None:
    config = make_config({"namespaces": {"weather": {"ttl": 60}}})
    client = await aiohttp_client(user_app(config, routes="/ondemand"))
    # The HTTP API, through the same wrapper as on our server.
    resp = await client.put("/ondemand/api/sessions/s1", json={"user": 1})
    assert resp.status == 200 and await resp.json() == {"session_id": "s1", "ttl": 86400.0}
    assert (await (await client.get("/ondemand/api/sessions/s1")).json())["value"] == {"user": 1}
    assert (await client.put("/ondemand/api/ns/weather/paris?ttl=5", json={"c": 21})).status == 200
    assert await (await client.get("/ondemand/api/ns/weather/paris")).json() == {
        "id": "paris", "value": {"c": 21}, "source": "redis"}
    await error_of(await client.get("/ondemand/api/sessions/absent"), 404, "not_found")
    # The catch-all answers below the prefix only.
    await error_of(await client.get("/ondemand/api/nothing"), 404, "not_found")
    await error_of(await client.post("/ondemand/healthz"), 405, "method_not_allowed")
    # The probes and metrics; metrics label routes by their template, without the prefix.
    assert await (await client.get("/ondemand/healthz")).json() == {"status": "ok"}
    assert (await client.get("/ondemand/readyz")).status == 200
    metrics = await (await client.get("/ondemand/metrics")).text()
    assert 'route="/api/sessions/{session_id}"' in metrics and 'route="/api/ns/weather/{id}"' in metrics
    assert "ondemand_cache_hits_total" in metrics  # the runtime collector reads the app's runtime
    # The user's own handlers still answer as before.
    assert "even numbers" in await error_of(await client.get("/widgets/4"), 400, "invalid_input")


async def test_the_status_page_and_its_files_under_a_prefix(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(user_app(make_config(), routes="/ondemand"))
    for path, kind in (("/ondemand/", "text/html"), ("/ondemand/static/status.js", "text/javascript"),
                       ("/ondemand/static/status.css", "text/css")):
        resp = await client.get(path)
        assert resp.status == 200 and resp.content_type == kind, path
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    # The page is at <prefix>/ (its URLs are relative to it): <prefix> redirects there, query kept.
    resp = await client.get("/ondemand?token=abc", allow_redirects=False)
    assert resp.status == 308 and resp.headers["Location"] == "/ondemand/?token=abc"
    assert (await client.get("/ondemand")).url.path == "/ondemand/"


def test_the_page_refers_to_nothing_by_an_absolute_path() -> None:
    """Every URL of the page and its script resolves below the prefix the page is served under."""
    html = (STATIC_DIR / "index.html").read_text()
    urls = re.findall(r'(?:href|src)="([^"]*)"', html)
    assert urls and all(not url.startswith("/") for url in urls), urls
    assert {"static/status.css", "static/status.js", "api/openapi.json"} <= set(urls)
    script = (STATIC_DIR / "status.js").read_text()
    assert not re.findall(r"""["'`]/(?:api|static|healthz|readyz|metrics)""", script)
    assert 'new URL("../api/cache/status", document.currentScript.src)' in script


async def test_openapi_under_nested_prefixes_lists_every_path_with_the_prefix(aiohttp_client, make_config) -> None:
    config = make_config()
    inner = user_app(config, routes="/ondemand")
    outer = web.Application()
    outer.add_subapp("/outer", inner)
    client = await aiohttp_client(outer)
    document = await (await client.get("/outer/ondemand/api/openapi.json")).json()
    expected = {f"/outer/ondemand{path}" for path in document_for(create_app(config))["paths"]}
    assert set(document["paths"]) == expected
    assert "/outer/ondemand/api/sessions/{session_id}" in document["paths"]
    # And what it lists is served there.
    assert (await client.get("/outer/ondemand/api/cache/status")).status == 200
    assert (await client.get("/outer/ondemand/")).status == 200


async def test_the_token_guards_the_same_routes_under_a_prefix(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(user_app(make_config({"server": {"api_token": TOKEN}}), routes="/ondemand"))
    for path in ("/ondemand/healthz", "/ondemand/readyz", "/ondemand/metrics", "/ondemand/",
                 "/ondemand/static/status.js", "/ondemand/static/status.css"):
        assert (await client.get(path)).status == 200, path
    await error_of(await client.get("/ondemand/api/cache/status"), 401, "unauthorized")
    await error_of(await client.get("/ondemand/api/openapi.json"), 401, "unauthorized")
    await error_of(await client.get("/ondemand/api/cache/status", headers={"Authorization": "Bearer x"}),
                   403, "forbidden")
    assert (await client.get("/ondemand/api/cache/status", headers=AUTH)).status == 200
    await error_of(await client.get("/ondemand/unknown"), 401, "unauthorized")  # nothing learnt without it
    await error_of(await client.post("/ondemand/healthz"), 401, "unauthorized")
    await error_of(await client.get("/ondemand/unknown", headers=AUTH), 404, "not_found")
    # The user's routes are the user's business: no token asked.
    await error_of(await client.get("/widgets/1"), 400, "invalid_input")
    document = await (await client.get("/ondemand/api/openapi.json", headers=AUTH)).json()
    assert document["paths"]["/ondemand/healthz"]["get"]["security"] == []
    assert "401" in document["paths"]["/ondemand/api/cache/status"]["get"]["responses"]


async def test_the_catch_all_never_shadows_the_users_routes(aiohttp_client, make_config) -> None:
    app = user_app(make_config(), routes="/ondemand")
    # Added after setup, in the places aiohttp's router would try our catch-all first if it were on `app`.
    app.router.add_get("/{name}", mine)
    app.router.add_get("/ondemand-more", mine)
    client = await aiohttp_client(app)
    assert await (await client.get("/bob")).json() == {"mine": "bob"}
    assert await (await client.get("/ondemand-more")).json() == {"mine": "plain"}
    assert (await client.get("/ondemand/healthz")).status == 200


async def test_routes_at_the_root_of_the_users_app(aiohttp_client, make_config) -> None:
    app = web.Application()
    app.router.add_get("/{name}", mine)  # a first segment that is a variable: added before setup
    setup(app, make_config(), routes="/")
    app.router.add_get("/mine/plain", mine)
    client = await aiohttp_client(app)
    assert (await client.get("/healthz")).status == 200
    assert await (await client.get("/bob")).json() == {"mine": "bob"}
    assert await (await client.get("/mine/plain")).json() == {"mine": "plain"}
    await error_of(await client.get("/no/such/path"), 404, "not_found")  # our catch-all, on this app


async def test_a_config_without_a_namespace_our_routes_need_is_refused_at_setup(aiohttp_client, make_config) -> None:
    config = make_config({"namespaces": {"profile": {"enabled": False}}})
    for serve in (lambda: create_app(config), lambda: setup(web.Application(), config, routes="/ondemand")):
        with pytest.raises(ConfigError) as info:
            serve()
        assert info.value.key == "namespaces.profile.enabled"
        assert "/api/users/{user_id}/profile" in str(info.value)
    # Without our routes nothing needs it: the user's app runs with the namespaces it has.
    app = web.Application()
    setup(app, config)
    await aiohttp_client(app)
    assert sorted(app[RUNTIME].dispatcher.namespaces) == ["messages", "session"]


# -- README's example, run from the README ------------------------------------------------------


def readme_example() -> dict[str, Any]:
    """The one Python block of README's "Use it in your aiohttp app", executed as a module (not as
    __main__: its `web.run_app` stays unrun)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Use it in your aiohttp app\n", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    module: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README.md (Use it in your aiohttp app)", "exec"), module)
    return module


async def test_readme_example_runs_as_documented(aiohttp_client, make_config) -> None:
    example = readme_example()
    client = await aiohttp_client(example["make_app"](make_config(example["OVERRIDES"])))
    assert await (await client.get("/hello/ada")).json() == {"hello": "ada", "visits": 1}
    assert await (await client.get("/hello/ada")).json() == {"hello": "ada", "visits": 2}
    assert "letters and digits" in await error_of(await client.get("/hello/a-b"), 400, "invalid_input")
    assert await (await client.get("/ondemand/api/ns/visits/ada")).json() == {"id": "ada", "value": 2,
                                                                              "source": "redis"}
    page = await client.get("/ondemand/")
    assert page.status == 200 and page.content_type == "text/html"
    document = await (await client.get("/ondemand/api/openapi.json")).json()
    assert {"/ondemand/api/ns/visits/{id}", "/ondemand/api/sessions/{session_id}"} <= set(document["paths"])
    assert (await client.get("/ondemand/metrics")).status == 200
