"""The seed's endpoints through aiohttp_client, success and error shapes."""

from __future__ import annotations

import pytest

from ondemand.web import create_app
from tests.support import redis_children


@pytest.fixture
async def client(aiohttp_client, make_config):
    return await aiohttp_client(create_app(make_config()))


async def test_app_start_spawns_nothing_and_status_shows_it(client) -> None:
    resp = await client.get("/api/cache/status")
    assert resp.status == 200
    body = await resp.json()
    assert body["redis"]["state"] == "stopped" and body["redis"]["pid"] is None
    assert redis_children() == []


async def test_cache_test_endpoint_starts_redis_and_reports_timings(client) -> None:
    resp = await client.get("/api/cache/test")
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is True and body["source"] == "redis"
    assert body["total_ms"] > 0
    status = await (await client.get("/api/cache/status")).json()
    redis = status["redis"]
    assert redis["state"] == "running" and redis["pid"] == redis_children()[0].pid
    assert redis["uptime_seconds"] >= 0 and redis["idle_deadline_in"] > 0
    assert redis["endpoint"].startswith("unix://")
    assert redis["counters"]["spawns"] == 1
    assert "default" in redis["pools"]


async def test_session_test_endpoint(client) -> None:
    resp = await client.post("/api/cache/session/test", json={"session_id": "abc", "data": {"user": 7}})
    body = await resp.json()
    assert resp.status == 200 and body["ok"] is True and body["session"] == {"user": 7}
    resp = await client.post("/api/cache/session/test")
    assert (await resp.json())["ok"] is True


async def test_batch_test_endpoint(client) -> None:
    resp = await client.post("/api/cache/batch/test", json={"user_id": "u1", "profile": {"name": "Ada"}})
    body = await resp.json()
    assert resp.status == 200 and body["ok"] is True
    assert body["written"] == ["session", "messages", "profile"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_input"),
        ({"data": "x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"json": {"session_id": "bad\nid"}}, 400, "invalid_input"),
        ({"json": {"session_id": "s", "ttl": -5}}, 400, "invalid_input"),
        ({"json": [1, 2]}, 400, "invalid_input"),
    ],
)
async def test_bad_input_is_a_json_error(client, kwargs, status, code) -> None:
    resp = await client.post("/api/cache/session/test", **kwargs)
    assert resp.status == status
    body = await resp.json()
    assert body["error"]["code"] == code and body["error"]["message"]


async def test_unknown_route_and_wrong_method_are_json(client) -> None:
    resp = await client.get("/api/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.delete("/api/cache/status")
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_body_over_the_cap_is_413(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config({"server": {"max_body_bytes": 1024}})))
    resp = await client.post("/api/cache/session/test", json={"data": "x" * 4096})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_redis_unavailable_is_503_not_a_traceback(aiohttp_client, make_config) -> None:
    config = make_config({"lifecycle": {"redis_binary": "/nonexistent/redis-server"},
                          "namespaces": {"profile": {"durable": True}}})
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/api/cache/test")
    # Cache-only namespaces degrade to a miss: the test fails, and says so with its status and its error.
    body = await resp.json()
    assert resp.status == 503, body
    assert body["error"]["code"] == "cache_test_failed" and "dropped" in body["error"]["message"]
    assert body["result"]["ok"] is False and body["result"]["source"] == "miss"


async def test_test_endpoints_can_be_turned_off(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config({"server": {"test_endpoints": False}})))
    assert (await client.get("/api/cache/test")).status == 404
    assert (await client.get("/api/cache/status")).status == 200


@pytest.mark.parametrize(
    ("path", "body", "rule"),
    [
        ("/api/cache/session/test", {"data": None}, "null"),  # read back it would look like a miss
        ("/api/cache/session/test", {"session_id": {}}, "string"),  # falsy, yet not "no id"
        ("/api/cache/session/test", {"session_id": 0}, "string"),
        ("/api/cache/batch/test", {"user_id": []}, "string"),
        ("/api/cache/batch/test", {"messages": 3}, "list"),  # else GET .../messages would be a 409
    ],
)
async def test_test_endpoints_refuse_what_their_document_refuses(client, path, body, rule) -> None:
    resp = await client.post(path, json=body)
    assert resp.status == 400, await resp.text()
    assert rule in (await resp.json())["error"]["message"]
    # null or "" still means "pick a random id"
    resp = await client.post(path, json={"session_id": None, "user_id": ""})
    assert resp.status == 200 and (await resp.json())["ok"] is True
