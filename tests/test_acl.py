"""ACL users, for real: a user with exactly the rules README.md lists (read from it, so the two cannot drift)
runs every route of the HTTP API and the recovery paths without one refusal, on a standalone server, a
cluster and a Sentinel group; a user missing one permission gets one clear error naming the endpoint, the
user and the command, never a 500 and never a hang."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ondemand import Runtime
from ondemand.redis.resp import RespConnection
from ondemand.web import RUNTIME, create_app
from ondemand.web.page import ASSETS
from tests.support import ROOT, local_cluster, plain_server, sentinel_group

PASSWORD = "acl-user-pw"


def readme_rules() -> dict[str, str]:
    """The `user ondemand ...` lines of README's "ACL users" (without `user `: the name and the rules), by the
    comment above each, the password filled in."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("**ACL users.**"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    rules, comment = {}, ""
    for line in block.splitlines():
        if line.startswith("#"):
            comment = line
        elif line.startswith("user ondemand on "):
            kind = next(k for k in ("standalone", "cluster", "Sentinel group's master", "every sentinel")
                        if k in comment)
            rules[kind] = line.removeprefix("user ").replace(">CHANGE-ME", f">{PASSWORD}")
    assert set(rules) == {"standalone", "cluster", "Sentinel group's master", "every sentinel"}, rules
    return rules


def without(rule: str, permission: str) -> str:
    """`rule` without the one token `+permission` (not `+evalsha` when asked for `+eval`)."""
    tokens = rule.split(" ")
    assert f"+{permission}" in tokens
    return " ".join(token for token in tokens if token != f"+{permission}")


class Walk:
    """Calls every route of the app and records which it reached; fails on a 5xx."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.reached: set[tuple[str, str]] = set()
        app.on_response_prepare.append(self._record)

    async def _record(self, request: web.Request, response: web.StreamResponse) -> None:
        route = request.match_info.route
        if route.resource is not None:
            self.reached.add((request.method, route.resource.canonical))

    def missing(self) -> set[tuple[str, str]]:
        routes = {(r.method, r.resource.canonical) for r in self.app.router.routes()
                  if r.resource is not None and r.method not in ("HEAD", "*")}
        return routes - self.reached


async def walk_the_api(client: Any, server_call: Any, key_prefix: str = "ondemand") -> None:
    """Every route, with the paths our commands take: a session put back from the durable store (EVAL), an
    append (EVAL), a durable delete (EVAL with tombstones), a warm-up (pipelined SETs)."""

    async def call(method: str, path: str, body: Any = None, status: int | tuple[int, ...] = 200) -> Any:
        resp = await client.request(method, path, json=body) if body is not None else \
            await client.request(method, path)
        expected = status if isinstance(status, tuple) else (status,)
        assert resp.status in expected, f"{method} {path}: {resp.status} {await resp.text()}"
        return await resp.json() if resp.content_type == "application/json" else await resp.read()

    await call("PUT", "/api/sessions/s1?ttl=600", {"user": 1})
    assert (await call("GET", "/api/sessions/s1"))["source"] == "redis"
    await server_call("DEL", f"{key_prefix}:session:s1")  # gone from Redis: read from PostgreSQL, put back
    assert (await call("GET", "/api/sessions/s1"))["source"] == "postgres"
    assert (await call("GET", "/api/sessions/s1"))["source"] == "redis"
    await call("DELETE", "/api/sessions/s1", status=204)
    await call("GET", "/api/sessions/s1", status=404)
    await call("PUT", "/api/users/u1/messages", [{"t": 1}])
    assert (await call("POST", "/api/users/u1/messages", {"t": 2}))["count"] == 2
    assert (await call("GET", "/api/users/u1/messages?last=1"))["messages"] == [{"t": 2}]
    await call("DELETE", "/api/users/u1/messages", status=204)
    await call("PUT", "/api/users/u1/profile", {"name": "A"})
    assert (await call("GET", "/api/users/u1/profile"))["profile"] == {"name": "A"}
    await call("DELETE", "/api/users/u1/profile", status=204)
    await call("POST", "/api/users/u2/warmup", {"session": {"s": 1}, "messages": [1, 2], "profile": {"p": 1}})
    assert (await call("GET", "/api/users/u2/messages"))["messages"] == [1, 2]
    assert (await call("GET", "/api/cache/test"))["ok"] is True
    assert (await call("POST", "/api/cache/session/test", {}))["ok"] is True
    assert (await call("POST", "/api/cache/batch/test", {}))["ok"] is True
    for namespace in ("session", "messages", "profile"):  # every configured namespace's own routes
        await call("PUT", f"/api/ns/{namespace}/n1?ttl=60", [namespace])
        assert (await call("GET", f"/api/ns/{namespace}/n1"))["value"] == [namespace]
        await call("DELETE", f"/api/ns/{namespace}/n1", status=204)
    for method in ("GET", "PUT", "DELETE"):  # a namespace the config lacks: 404 naming the configured ones
        await call(method, "/api/ns/nope/n1", body=[1] if method == "PUT" else None, status=404)
    await call("GET", "/api/example/greet/ada")  # the example plugin's route (installed by requirements-dev)
    await call("GET", "/api/cache/status")
    await call("GET", "/api/cache/history")
    await call("GET", "/healthz")
    await call("GET", "/readyz")
    await call("GET", "/metrics")
    await call("GET", "/api/openapi.json")
    for path in ASSETS:
        await call("GET", path)
    # The recovery paths no route takes on a healthy day: expiry, deleting invalidated keys, clearing a prefix.
    rt = client.app[RUNTIME]
    assert await rt.dispatcher.expire("profile", "u2", 30) is True
    await rt.cache_storage.delete_keys([f"{key_prefix}:profile:none"])
    assert await rt.cache_storage.delete_prefix(f"{key_prefix}:messages:") >= 1


# Every namespace keeps a near cache: the rules must let its connections track (HELLO 3, CLIENT TRACKING and
# CACHING, PTTL with each tracked read); a refusal there would silently mean no near cache.
NEAR = {"namespaces": {name: {"near_cache": True} for name in ("session", "messages", "profile")}}


def no_refusal(rt: Runtime) -> None:
    near = rt.near_cache_status()
    assert near is not None and near["refused"] == {} and near["connections"] >= 1, near
    status = rt.dispatcher.status()
    assert status["error_replies"] == {}, status["error_replies"]
    assert all(ns["cache_errors"] == 0 for ns in status["namespaces"].values()), status["namespaces"]
    assert rt.dispatcher.breaker.closed, rt.dispatcher.breaker.status()


async def test_the_readme_acl_user_runs_the_whole_http_api(tmp_path: Path, aiohttp_client, durable_config) -> None:
    async with plain_server(tmp_path / "redis", users=[readme_rules()["standalone"]]) as server:
        url = f"redis://ondemand:{PASSWORD}@127.0.0.1:{server.port}/0"
        config = durable_config({"lifecycle": {"plugin": "external", "redis_url": url}, **NEAR})
        app = create_app(config)
        walk = Walk(app)
        client = await aiohttp_client(app)
        await walk_the_api(client, server.call)
        assert client.app[RUNTIME].near_cache_status()["installs"] > 0, "the near cache kept nothing"
        assert not walk.missing(), (f"routes this test does not call: {sorted(walk.missing())}; call them here, and "
                                    "add what they send to README's ACL rules")
        no_refusal(client.app[RUNTIME])
        # Everything we wrote is the user's, under the prefix its key pattern allows.
        assert await server.call("ACL", "WHOAMI") == b"default"
        keys = await server.call("KEYS", "*")
        assert keys and all(k.startswith(b"ondemand:") for k in keys)


@pytest.mark.parametrize("permission", ["eval", "info"])
async def test_a_user_missing_one_permission_gets_one_clear_error(permission: str, tmp_path: Path, aiohttp_client,
                                                                  make_config, caplog) -> None:
    rule = without(readme_rules()["standalone"], permission)
    async with plain_server(tmp_path / "redis", users=[rule]) as server:
        url = f"redis://ondemand:{PASSWORD}@127.0.0.1:{server.port}/0"
        client = await aiohttp_client(create_app(make_config({"lifecycle": {"plugin": "external", "redis_url": url}})))
        where = f"Redis at redis://ondemand:***@127.0.0.1:{server.port}/0"
        with caplog.at_level(logging.WARNING):
            async with asyncio.timeout(10):  # never a hang
                for _ in range(3):
                    # An append is a script (EVAL): refused, it is dropped like any refused cache-only write.
                    resp = await client.post("/api/users/u1/messages", json={"t": 1})
                    assert resp.status == 200, await resp.text()
                    assert (await client.get("/api/users/u1/profile")).status == 404  # a miss, not a 500
        status = (await (await client.get("/api/cache/status")).json())
        records = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        if permission == "eval":
            refusal = ("NOPERM User ondemand has no permissions to run the 'eval' command "
                       f"({where}; README: ACL users lists the permissions ondemand needs)")
            assert [r for r in records if "NOPERM" in r] == [refusal]  # logged once, however many refusals
            assert status["dispatcher"]["error_replies"]["noperm"] == 3
        else:  # no INFO: no connection at all; the breaker opens, naming the command
            refusal = (f"{where} refused the connection: NOPERM User ondemand has no permissions to run the 'info' "
                       "command (README: ACL users lists the permissions ondemand needs)")
            breaker = status["dispatcher"]["breaker"]
            assert breaker["state"] != "closed" and breaker["last_reason"] == refusal
            assert f"cache breaker open: {refusal}" in records
        assert PASSWORD not in str(status) and PASSWORD not in "".join(records)


async def test_the_readme_acl_users_on_a_cluster(tmp_path: Path, make_config) -> None:
    rules = readme_rules()["cluster"].split()[1:]  # after the name: what ACL SETUSER takes
    async with local_cluster(tmp_path, masters=3, replicas=0) as cluster:
        for node in cluster.nodes:
            async with await RespConnection.open(node.endpoint) as conn:
                await conn.call("ACL", "SETUSER", "ondemand", *rules)
        seed = cluster.master_nodes()[0]
        url = f"redis://ondemand:{PASSWORD}@127.0.0.1:{seed.port}/0"
        config = make_config({"lifecycle": {"plugin": "external", "topology": "cluster", "redis_url": url}, **NEAR})
        async with Runtime(config) as rt:
            ids = [f"user{i}" for i in range(40)]
            for i in ids:
                await rt.cache.cache_profile(i, {"id": i})
                await rt.dispatcher.append("messages", i, [i], max_items=10)  # a script, on each node
            assert [await rt.cache.get_profile(i) for i in ids] == [{"id": i} for i in ids]

            async def load() -> dict:
                return {"loaded": True}

            # get_or_compute: its lease scripts (TIME), its install's PUBLISH, its process's SUBSCRIBE
            assert await rt.cache_storage.leases.listen(2.0)
            for _ in range(2):
                assert await rt.cache.get_or_compute("profile", "aside", load, stale_ttl=5) == {"loaded": True}
            assert rt.dispatcher.status()["aside"]["namespaces"]["profile"]["loads"] == 1
            await rt.dispatcher.delete("profile", ids[0])
            assert await rt.cache_storage.delete_prefix("ondemand:messages:") == len(ids)  # SCAN on every master
            no_refusal(rt)


async def test_the_readme_acl_users_on_a_sentinel_group(make_config) -> None:
    rules = readme_rules()
    async with sentinel_group(data_users=(rules["Sentinel group's master"],),
                              sentinel_users=(rules["every sentinel"],)) as group:
        lifecycle = {**group.config()["lifecycle"], "redis_username": "ondemand", "redis_password": PASSWORD,
                     "sentinel_username": "ondemand", "sentinel_password": PASSWORD}
        async with Runtime(make_config({"lifecycle": lifecycle, **NEAR})) as rt:
            await rt.cache.cache_profile("p", [1])
            assert await rt.cache.get_profile("p") == [1]
            # The subscription to +switch-master is up (SUBSCRIBE and the channel allowed): failovers are seen.
            for _ in range(100):
                if any(s["subscribed"] for s in rt.lifecycle.status()["sentinel"]["sentinels"]):
                    break
                await asyncio.sleep(0.05)
            sentinels = rt.lifecycle.status()["sentinel"]["sentinels"]
            assert any(s["subscribed"] for s in sentinels), sentinels
            assert all(s["last_error"] is None for s in sentinels), sentinels
            no_refusal(rt)


async def test_a_sentinel_user_without_the_channel_is_an_error_not_a_silence(make_config) -> None:
    rules = readme_rules()
    deaf = rules["every sentinel"].replace(" &+switch-master", "")
    async with sentinel_group(data_users=(rules["Sentinel group's master"],), sentinel_users=(deaf,)) as group:
        lifecycle = {**group.config()["lifecycle"], "redis_username": "ondemand", "redis_password": PASSWORD,
                     "sentinel_username": "ondemand", "sentinel_password": PASSWORD}
        async with Runtime(make_config({"lifecycle": lifecycle})) as rt:
            await rt.cache.cache_profile("p", [1])  # discovery works: only following failovers would not
            for _ in range(100):
                errors = [s["last_error"] or "" for s in rt.lifecycle.status()["sentinel"]["sentinels"]]
                if any("SUBSCRIBE" in e for e in errors):
                    break
                await asyncio.sleep(0.05)
            assert any(re.search(r"refused SUBSCRIBE \+switch-master: NOPERM", e) for e in errors), errors
