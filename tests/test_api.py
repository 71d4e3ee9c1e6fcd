"""The REST API through aiohttp_client: every endpoint, success and each error status."""

from __future__ import annotations

import asyncio

import pytest

from ondemand.config import redact
from ondemand.config.load import load_config
from ondemand.errors import ConfigError
from ondemand.web import RUNTIME, create_app
from ondemand.web.routes import NAMESPACE_PATH

TOKEN = "s3cr3t-token"
JSON_NULL = {"data": "null", "headers": {"Content-Type": "application/json"}}


@pytest.fixture
async def client(aiohttp_client, make_config):
    return await aiohttp_client(create_app(make_config()))


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


async def error_of(resp, status: int, code: str | None = None) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    if code is not None:
        assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]["message"]


# -- sessions -----------------------------------------------------------------------------------


async def test_session_put_get_delete(client) -> None:
    resp = await client.put("/api/sessions/s1", json={"user": 1, "roles": ["a"]})
    assert resp.status == 200
    assert await resp.json() == {"session_id": "s1", "ttl": 86400.0}
    resp = await client.get("/api/sessions/s1")
    assert resp.status == 200
    assert await resp.json() == {"session_id": "s1", "value": {"user": 1, "roles": ["a"]}, "source": "redis"}
    # any JSON value but null can be stored
    assert (await client.put("/api/sessions/s2", json="just a string")).status == 200
    assert (await (await client.get("/api/sessions/s2")).json())["value"] == "just a string"
    resp = await client.delete("/api/sessions/s1")
    assert resp.status == 204 and await resp.read() == b""
    await error_of(await client.get("/api/sessions/s1"), 404, "not_found")
    await error_of(await client.delete("/api/sessions/s1"), 404, "not_found")


async def test_session_ttl_query_parameter(client) -> None:
    resp = await client.put("/api/sessions/short?ttl=30", json={"x": 1})
    assert resp.status == 200 and (await resp.json())["ttl"] == 30.0
    rt = client.app[RUNTIME]
    ttl = await rt.on_demand.with_connection(lambda r: r.pttl("ondemand:session:short"))
    assert 0 < ttl <= 30_000


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/api/sessions/bad%0Aid", "control characters"),
        ("/api/sessions/" + "x" * 257, "at most 256 bytes"),
        ("/api/sessions/s?ttl=-1", "from 0.001"),
        ("/api/sessions/s?ttl=0", "from 0.001"),
        ("/api/sessions/s?ttl=1e-9", "from 0.001"),  # gone before anyone could read it
        ("/api/sessions/s?ttl=0.0009", "from 0.001"),
        ("/api/sessions/s?ttl=abc", "number of seconds"),
        ("/api/sessions/s?ttl=nan", "number of seconds"),
        ("/api/sessions/s?ttl=1e12", "ten years"),
        ("/api/sessions/s?ttl=5&ttl=10", "given once"),
        ("/api/sessions/s?ttl=5&ttl=5", "given once"),
    ],
)
async def test_session_bad_id_or_ttl_is_400_naming_the_rule(client, path, rule) -> None:
    message = await error_of(await client.put(path, json={"x": 1}), 400, "invalid_input")
    assert rule in message


async def test_session_body_errors(client) -> None:
    url = "/api/sessions/s"
    await error_of(await client.put(url, data="x", headers={"Content-Type": "text/plain"}),
                   415, "unsupported_media_type")
    assert "required" in await error_of(await client.put(url), 400, "invalid_input")
    assert "valid JSON" in await error_of(
        await client.put(url, data="{nope", headers={"Content-Type": "application/json"}), 400, "invalid_input")
    assert "null" in await error_of(await client.put(url, **JSON_NULL), 400, "invalid_input")
    assert "32 levels" in await error_of(await client.put(url, json=nested(33)), 400, "invalid_input")
    assert (await client.put(url, json=nested(32))).status == 200
    resp = await client.post(url, json={})
    await error_of(resp, 405, "method_not_allowed")
    assert set(resp.headers["Allow"].split(",")) == {"PUT", "GET", "HEAD", "DELETE"}
    assert (await resp.json())["error"]["message"] == "POST is not allowed here; allowed: DELETE, GET, HEAD, PUT"
    await error_of(await client.get("/api/sessions/"), 404, "not_found")
    head = await client.head(url)  # HEAD is served wherever GET is, without a body
    assert head.status == 200 and head.content_type == "application/json" and await head.read() == b""


async def test_body_over_the_cap_is_413(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config({"server": {"max_body_bytes": 1024}})))
    await error_of(await client.put("/api/sessions/big", json={"data": "x" * 4096}), 413, "payload_too_large")
    await error_of(await client.post("/api/users/u/messages", json=["x" * 4096]), 413, "payload_too_large")


async def test_session_falls_back_to_postgres_when_the_redis_key_is_gone(aiohttp_client, durable_config) -> None:
    client = await aiohttp_client(create_app(durable_config()))
    assert (await client.put("/api/sessions/durable-1", json={"user": 42})).status == 200
    rt = client.app[RUNTIME]
    assert await rt.on_demand.with_connection(lambda r: r.delete("ondemand:session:durable-1")) == 1
    body = await (await client.get("/api/sessions/durable-1")).json()
    assert body == {"session_id": "durable-1", "value": {"user": 42}, "source": "postgres"}
    # put back into Redis by that read
    assert (await (await client.get("/api/sessions/durable-1")).json())["source"] == "redis"
    assert (await client.delete("/api/sessions/durable-1")).status == 204
    await error_of(await client.get("/api/sessions/durable-1"), 404)


# -- messages -----------------------------------------------------------------------------------


async def test_messages_replace_append_get_last_delete(client) -> None:
    url = "/api/users/u1/messages"
    await error_of(await client.get(url), 404, "not_found")
    resp = await client.put(url, json=[{"n": 1}, {"n": 2}])
    assert resp.status == 200 and await resp.json() == {"user_id": "u1", "count": 2, "ttl": 3600.0}
    resp = await client.post(url, json={"n": 3})
    assert await resp.json() == {"user_id": "u1", "appended": 1, "count": 3, "ttl": 3600.0}
    resp = await client.post(url + "?ttl=60", json=[{"n": 4}, {"n": 5}])
    assert await resp.json() == {"user_id": "u1", "appended": 2, "count": 5, "ttl": 60.0}
    body = await (await client.get(url)).json()
    assert body == {"user_id": "u1", "messages": [{"n": i} for i in range(1, 6)], "total": 5, "source": "redis"}
    assert [m["n"] for m in (await (await client.get(url + "?last=2")).json())["messages"]] == [4, 5]
    assert (await (await client.get(url + "?last=0")).json())["messages"] == []
    assert len((await (await client.get(url + "?last=99")).json())["messages"]) == 5
    assert (await client.put(url, json=[])).status == 200
    assert (await (await client.get(url)).json())["messages"] == []
    assert (await client.delete(url)).status == 204
    await error_of(await client.delete(url), 404, "not_found")


async def test_append_creates_the_list(client) -> None:
    resp = await client.post("/api/users/new/messages", json={"text": "hi"})
    assert resp.status == 200 and (await resp.json())["count"] == 1
    assert (await (await client.get("/api/users/new/messages")).json())["messages"] == [{"text": "hi"}]


async def test_concurrent_appends_all_land(client) -> None:
    url = "/api/users/race/messages"
    results = await asyncio.gather(*(client.post(url, json={"i": i}) for i in range(50)))
    assert all(r.status == 200 for r in results)
    assert sorted([(await r.json())["count"] for r in results]) == list(range(1, 51))  # each its own length
    messages = (await (await client.get(url)).json())["messages"]
    assert sorted(m["i"] for m in messages) == list(range(50))


async def test_append_keeps_the_stored_text_and_refuses_a_non_list(client) -> None:
    rt = client.app[RUNTIME]
    url = "/api/users/shape/messages"
    big = 2**53 + 1  # a number cjson would round if it re-encoded the list
    assert (await client.put(url, json=[{"n": big, "f": 0.1}])).status == 200
    assert (await (await client.post(url, json={"n": 2})).json())["count"] == 2
    assert (await (await client.get(url)).json())["messages"] == [{"n": big, "f": 0.1}, {"n": 2}]
    await rt.dispatcher.set("messages", "obj", {"not": "a list"})
    assert "not a JSON list" in await error_of(await client.post("/api/users/obj/messages", json={}), 409,
                                              "conflict")
    assert await rt.dispatcher.get("messages", "obj") == {"not": "a list"}  # nothing written
    # A corrupt stored value counts as no list, as a read treats it as absent.
    await rt.on_demand.execute("SET", rt.dispatcher.namespace("messages").key("junk"), b"\x80not json")
    assert (await (await client.post("/api/users/junk/messages", json={"a": 1})).json())["count"] == 1
    assert (await (await client.get("/api/users/junk/messages")).json())["messages"] == [{"a": 1}]
    # Appending nothing (the API refuses it; the dispatcher allows it) keeps the list and renews its ttl.
    assert await rt.dispatcher.append("messages", "shape", [], 60, max_items=10) == 2
    assert (await (await client.get(url)).json())["total"] == 2


@pytest.mark.parametrize(
    ("method", "query", "body", "rule"),
    [
        ("put", "", {"not": "a list"}, "JSON list"),
        ("post", "", [], "non-empty"),
        ("post", "", "text", "JSON object"),
        ("post", "", 5, "JSON object"),
        ("get", "?last=-1", None, "non-negative"),
        ("get", "?last=x", None, "non-negative"),
        ("put", "?ttl=-5", [], "from 0.001"),
        ("get", "?last=1&last=2", None, "given once"),
    ],
)
async def test_messages_bad_input_is_400(client, method, query, body, rule) -> None:
    await client.put("/api/users/u2/messages", json=[{"n": 1}])
    kwargs = {} if method == "get" else {"json": body}
    resp = await getattr(client, method)(f"/api/users/u2/messages{query}", **kwargs)
    assert rule in await error_of(resp, 400, "invalid_input")


async def test_messages_stored_as_non_list_is_409(client) -> None:
    await client.app[RUNTIME].dispatcher.set("messages", "odd", {"not": "a list"})
    await error_of(await client.get("/api/users/odd/messages"), 409, "conflict")
    await error_of(await client.post("/api/users/odd/messages", json={"n": 1}), 409, "conflict")


async def test_messages_wrong_method_and_content_type(client) -> None:
    await error_of(await client.patch("/api/users/u/messages", json=[]), 405, "method_not_allowed")
    await error_of(await client.post("/api/users/u/messages", data="hi", headers={"Content-Type": "text/plain"}),
                   415, "unsupported_media_type")


# -- profiles -----------------------------------------------------------------------------------


async def test_profile_put_get_delete(client) -> None:
    url = "/api/users/u1/profile"
    await error_of(await client.get(url), 404, "not_found")
    resp = await client.put(url + "?ttl=120", json={"name": "Ada"})
    assert resp.status == 200 and await resp.json() == {"user_id": "u1", "ttl": 120.0}
    assert await (await client.get(url)).json() == {"user_id": "u1", "profile": {"name": "Ada"}, "source": "redis"}
    assert (await client.delete(url)).status == 204
    await error_of(await client.delete(url), 404, "not_found")
    await error_of(await client.put(url, **JSON_NULL), 400, "invalid_input")
    await error_of(await client.put("/api/users/bad%01id/profile", json={}), 400, "invalid_input")
    await error_of(await client.put(url, data="x", headers={"Content-Type": "text/html"}), 415)
    await error_of(await client.post(url, json={}), 405, "method_not_allowed")


# -- any namespace: /api/ns/{namespace}/{id} -----------------------------------------------------


@pytest.fixture
async def ns_client(aiohttp_client, make_config):
    """A config with a namespace of its own, added to the built-in ones."""
    return await aiohttp_client(create_app(make_config({"namespaces": {"weather": {"ttl": 600}}})))


async def test_a_configured_namespace_put_get_delete(ns_client) -> None:
    url = "/api/ns/weather/paris"
    await error_of(await ns_client.get(url), 404, "not_found")
    resp = await ns_client.put(url, json={"c": 21})
    assert resp.status == 200 and await resp.json() == {"id": "paris", "ttl": 600.0}  # the namespace's ttl
    assert await (await ns_client.get(url)).json() == {"id": "paris", "value": {"c": 21}, "source": "redis"}
    assert (await ns_client.put(url + "?ttl=30", json=[1, "two"])).status == 200
    ttl = await ns_client.app[RUNTIME].on_demand.with_connection(lambda r: r.pttl("ondemand:weather:paris"))
    assert 0 < ttl <= 30_000
    assert (await (await ns_client.get(url)).json())["value"] == [1, "two"]
    resp = await ns_client.delete(url)
    assert resp.status == 204 and await resp.read() == b""
    await error_of(await ns_client.delete(url), 404, "not_found")
    head = await ns_client.head("/api/ns/weather/absent")
    assert head.status == 404


async def test_a_namespace_has_the_value_rules_and_errors_of_sessions(ns_client) -> None:
    url = "/api/ns/weather/x"
    assert "null" in await error_of(await ns_client.put(url, **JSON_NULL), 400, "invalid_input")
    assert "required" in await error_of(await ns_client.put(url), 400, "invalid_input")
    assert "32 levels" in await error_of(await ns_client.put(url, json=nested(33)), 400, "invalid_input")
    assert "from 0.001" in await error_of(await ns_client.put(url + "?ttl=0", json=1), 400, "invalid_input")
    assert "number of seconds" in await error_of(await ns_client.put(url + "?ttl=1_0", json=1), 400)
    assert "control characters" in await error_of(await ns_client.get("/api/ns/weather/a%0Ab"), 400)
    assert "at most 256 bytes" in await error_of(await ns_client.delete("/api/ns/weather/" + "x" * 257), 400)
    await error_of(await ns_client.put(url, data="x", headers={"Content-Type": "text/plain"}), 415)
    resp = await ns_client.post(url, json={})
    await error_of(resp, 405, "method_not_allowed")
    assert set(resp.headers["Allow"].split(",")) == {"PUT", "GET", "HEAD", "DELETE"}


async def test_an_unknown_namespace_is_a_404_naming_the_configured_ones(ns_client) -> None:
    for method in ("GET", "PUT", "DELETE"):
        resp = await ns_client.request(method, "/api/ns/nope/x", json={"a": 1})
        message = await error_of(resp, 404, "not_found")
        assert message == "no namespace 'nope'; configured: messages, profile, session, weather", method


async def test_the_seed_routes_and_api_ns_share_their_namespaces(ns_client) -> None:
    assert (await ns_client.put("/api/ns/session/s1", json={"user": 1})).status == 200
    assert (await (await ns_client.get("/api/sessions/s1")).json())["value"] == {"user": 1}
    assert (await ns_client.put("/api/users/u1/profile", json={"name": "Ada"})).status == 200
    assert (await (await ns_client.get("/api/ns/profile/u1")).json())["value"] == {"name": "Ada"}
    # /api/ns stores any value: a messages value that is not a list is then a 409 on the messages route.
    assert (await ns_client.put("/api/ns/messages/u2", json={"not": "a list"})).status == 200
    await error_of(await ns_client.get("/api/users/u2/messages"), 409)


async def test_openapi_lists_one_resource_per_configured_namespace(ns_client) -> None:
    paths = (await (await ns_client.get("/api/openapi.json")).json())["paths"]
    ns_paths = sorted(path for path in paths if path.startswith("/api/ns/"))
    assert ns_paths == [f"/api/ns/{name}/{{id}}" for name in ("messages", "profile", "session", "weather")]
    assert set(paths["/api/ns/weather/{id}"]) == {"put", "get", "delete"}
    assert paths["/api/ns/weather/{id}"]["get"]["parameters"] == [{"$ref": "#/components/parameters/id"}]


# -- warm-up ------------------------------------------------------------------------------------


async def test_warmup_writes_everything_in_one_call(client) -> None:
    body = {"session": {"s": 1}, "messages": [{"m": 1}], "profile": {"name": "Ada"}}
    resp = await client.post("/api/users/w1/warmup?ttl=60", json=body)
    assert resp.status == 200
    assert await resp.json() == {"user_id": "w1", "written": ["session", "messages", "profile"]}
    assert (await (await client.get("/api/sessions/w1")).json())["value"] == {"s": 1}
    assert (await (await client.get("/api/users/w1/messages")).json())["messages"] == [{"m": 1}]
    assert (await (await client.get("/api/users/w1/profile")).json())["profile"] == {"name": "Ada"}
    resp = await client.post("/api/users/w2/warmup", json={"profile": {"p": 2}})
    assert (await resp.json())["written"] == ["profile"]


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({}, "at least one"),
        ({"sessoin": {}}, "unknown field"),
        ({"messages": {"not": "list"}}, "JSON list"),
        ({"profile": None}, "null"),
        ([1], "JSON object"),
        ({"profile": nested(33)}, "32 levels"),
    ],
)
async def test_warmup_bad_input_is_400(client, body, rule) -> None:
    assert rule in await error_of(await client.post("/api/users/w/warmup", json=body), 400, "invalid_input")


async def test_warmup_other_errors(client) -> None:
    await error_of(await client.post("/api/users/w/warmup?ttl=0", json={"profile": {}}), 400, "invalid_input")
    await error_of(await client.post("/api/users/w/warmup", data="x", headers={"Content-Type": "text/plain"}), 415)
    await error_of(await client.get("/api/users/w/warmup"), 405, "method_not_allowed")


# -- health, readiness, metrics -----------------------------------------------------------------


async def test_healthz_and_readyz_when_everything_is_fine(client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready"
    assert body["redis"] == {"ok": True, "state": "stopped", "breaker": "closed", "last_error": None}
    assert body["durable"] is None
    await error_of(await client.post("/healthz", json={}), 405)


async def test_readyz_503_when_redis_fails_without_durable_store(aiohttp_client, make_config) -> None:
    """Nothing can store anything: Redis is down and there is no durable store. Not ready, whatever a cache-only
    read says (a miss)."""
    client = await aiohttp_client(create_app(make_config({"lifecycle": {"redis_binary": "/nonexistent/redis"}})))
    await error_of(await client.get("/api/users/u/profile"), 404)  # cache-only: a miss, not an error
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "unavailable", body
    assert body["redis"]["ok"] is False and "/nonexistent/redis" in body["redis"]["last_error"]
    assert body["durable"] is None


async def test_readyz_and_status_carry_the_whole_error(aiohttp_client, make_config) -> None:
    """Not only its first line ("... last lines of .../redis.log:"), but the log tail that says why."""
    config = make_config({"lifecycle": {"redis_options": {"bogus-directive": "1"}}})
    client = await aiohttp_client(create_app(config))
    assert (await client.put("/api/users/u/profile", json=1)).headers["Ondemand-Write"] == "dropped"
    ready = await (await client.get("/readyz")).json()
    status = await (await client.get("/api/cache/status")).json()
    for error in (ready["redis"]["last_error"], status["redis"]["last_error"]):
        assert "last lines of" in error and "Bad directive or wrong number of arguments" in error, error
        assert "bogus-directive" in error


async def test_readyz_degraded_when_redis_fails_and_the_durable_store_serves(aiohttp_client, durable_config) -> None:
    client = await aiohttp_client(create_app(durable_config({"lifecycle": {"redis_binary": "/nonexistent/redis"}})))
    assert (await client.put("/api/sessions/s", json={"v": 1})).status == 200  # durable: PostgreSQL takes it
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "degraded", body
    assert body["redis"]["ok"] is False and body["durable"]["ok"] is True


async def test_readyz_503_when_redis_and_the_durable_store_are_down(aiohttp_client, make_config) -> None:
    config = make_config({
        "lifecycle": {"redis_binary": "/nonexistent/redis"},
        "storage": {"durable": "postgres"},
        "postgres": {"dsn": "postgresql://ondemand@127.0.0.1:1/none", "connect_timeout": 0.2,
                     "statement_timeout": 0.2},
    })
    client = await aiohttp_client(create_app(config))
    await error_of(await client.get("/api/sessions/s"), 503)
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "unavailable", body
    assert body["durable"]["ok"] is False and body["durable"]["state"] == "down"
    assert body["redis"]["ok"] is False


async def test_metrics_exposes_http_and_runtime_metrics(client) -> None:
    await client.put("/api/sessions/m1", json={"a": 1})
    await client.get("/api/sessions/m1")
    await client.get("/api/sessions/absent")
    await client.get("/api/users/nobody/profile")
    await client.get("/no/such/path")
    await client.post("/healthz")
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert 'ondemand_http_requests_total{method="GET",route="/api/sessions/{session_id}",status="200"} 1.0' in text
    assert 'ondemand_http_requests_total{method="GET",route="/api/sessions/{session_id}",status="404"} 1.0' in text
    assert 'ondemand_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'ondemand_http_requests_total{method="POST",route="unmatched",status="405"} 1.0' in text
    assert 'ondemand_http_request_duration_seconds_count{method="PUT",route="/api/sessions/{session_id}"} 1.0' in text
    assert 'ondemand_cache_hits_total{namespace="session"} 1.0' in text
    assert 'ondemand_cache_misses_total{namespace="profile"} 1.0' in text
    assert 'ondemand_dropped_writes_total{namespace="messages"} 0.0' in text
    assert 'ondemand_fallback_reads_total{namespace="session"} 0.0' in text
    assert "ondemand_redis_spawns_total 1.0" in text
    assert "ondemand_redis_idle_stops_total 0.0" in text
    assert "ondemand_breaker_state 0.0" in text
    assert 'ondemand_redis_state{state="running"} 1.0' in text
    assert "ondemand_redis_pools " in text
    assert "m1" not in text  # ids never become labels


async def test_each_app_has_its_own_registry(aiohttp_client, make_config) -> None:
    first = await aiohttp_client(create_app(make_config()))
    second = await aiohttp_client(create_app(make_config()))
    await first.get("/healthz")
    text = await (await second.get("/metrics")).text()
    assert 'route="/healthz"' not in text


# -- bearer token -------------------------------------------------------------------------------


@pytest.fixture
async def secured(aiohttp_client, make_config):
    return await aiohttp_client(create_app(make_config({"server": {"api_token": TOKEN}})))


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/api/sessions/s"), ("put", "/api/users/u/profile"), ("get", "/api/cache/status"),
     ("get", "/api/nope")],
)
async def test_token_required_on_api_paths(secured, method, path) -> None:
    resp = await getattr(secured, method)(path, json={})
    await error_of(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await getattr(secured, method)(path, json={}, headers={"Authorization": f"Basic {TOKEN}"})
    await error_of(resp, 401, "unauthorized")
    resp = await getattr(secured, method)(path, json={}, headers={"Authorization": "Bearer wrong"})
    await error_of(resp, 403, "forbidden")
    resp = await getattr(secured, method)(path, json={}, headers={"Authorization": "Bearer s3cr3t-tokén"})
    await error_of(resp, 403, "forbidden")


async def test_right_token_passes_and_probes_stay_open(secured) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await secured.put("/api/sessions/s", json={"a": 1}, headers=auth)).status == 200
    assert (await secured.get("/api/sessions/s", headers={"Authorization": f"bearer {TOKEN}"})).status == 200
    await error_of(await secured.get("/api/nope", headers=auth), 404, "not_found")
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await secured.get(path)).status == 200, path
        # Only their GET is open: another method is unrouted, and unrouted requests need the token first.
        await error_of(await secured.post(path), 401, "unauthorized")
        await error_of(await secured.post(path, headers=auth), 405, "method_not_allowed")


def test_api_token_from_environment_and_redacted() -> None:
    config = load_config(None, environ={"ONDEMAND_SERVER__API_TOKEN": "from-env"})
    assert config.server.api_token == "from-env"
    assert redact(config)["server"]["api_token"] == "***"
    assert redact(load_config(None, environ={}))["server"]["api_token"] is None
    with pytest.raises(ConfigError, match=r"server\.api_token"):
        load_config(None, overrides={"server": {"api_token": "has space"}}, environ={})
    with pytest.raises(ConfigError, match=r"server\.api_token"):
        load_config(None, overrides={"server": {"api_token": ""}}, environ={})


# -- OpenAPI ------------------------------------------------------------------------------------


async def test_openapi_document_lists_every_registered_route(client) -> None:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    document = await resp.json()
    assert document["openapi"] == "3.1.0"
    registered = {
        (route.method.lower(), route.resource.canonical)
        for route in client.app.router.routes()
        # "*": the catch-all for 404/405; NAMESPACE_PATH only answers 404 for a namespace the config lacks
        if route.resource is not None and route.method not in ("HEAD", "*")
        and route.resource.canonical != NAMESPACE_PATH
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert registered <= documented, registered - documented
    assert documented <= registered, documented - registered  # nothing documented that is not served
    for path, item in document["paths"].items():
        for method, op in item.items():
            assert "200" in op["responses"] or "204" in op["responses"], (method, path)


async def test_openapi_leaves_out_disabled_test_endpoints(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config({"server": {"test_endpoints": False}})))
    paths = (await (await client.get("/api/openapi.json")).json())["paths"]
    assert "/api/cache/test" not in paths and "/api/cache/status" in paths and "/api/sessions/{session_id}" in paths


@pytest.mark.parametrize("text", ["%2030", "30%20", "1_000", "%D9%A3"])  # " 30", "30 ", "1_000", Arabic-Indic 3
async def test_ttl_and_last_are_plain_ascii_numbers(client, text) -> None:
    """float()/int() would take these; the OpenAPI document promises a number, so they are a 400."""
    assert "number of seconds" in await error_of(await client.put(f"/api/sessions/s?ttl={text}", json=1), 400)
    assert (await client.put("/api/users/u/messages", json=[1])).status == 200
    assert "non-negative integer" in await error_of(await client.get(f"/api/users/u/messages?last={text}"), 400)


async def test_message_list_is_capped(aiohttp_client, make_config) -> None:
    from ondemand.web.api import MAX_MESSAGES

    client = await aiohttp_client(create_app(make_config()))
    resp = await client.put("/api/users/cap/messages", json=[{"i": i} for i in range(MAX_MESSAGES)])
    assert resp.status == 200
    resp = await client.post("/api/users/cap/messages", json={"one": "more"})
    assert resp.status == 400 and "at most" in (await resp.json())["error"]["message"]
    resp = await client.put("/api/users/cap/messages", json=[{}] * (MAX_MESSAGES + 1))
    assert resp.status == 400
