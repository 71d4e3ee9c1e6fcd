"""The plugin system: built-ins as plugins, entry points, blocking, duplicates, unknown names; one test
per hook; plugin-owned config sections (the example plugin's [example]); register hooks and events."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import stat
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import ondemand_example
import pytest
from aiohttp import web
from ondemand_example import ExampleConfig

from ondemand import InvalidInput, Runtime, hookimpl, hookspecs
from ondemand import plugin_manager as app_plugins
from ondemand.config import Config, SectionRegistry, between, unstructure
from ondemand.config.load import load_config
from ondemand.errors import ConfigError, PluginError
from ondemand.events import Events
from ondemand.hookspecs import PROJECT
from ondemand.plugin_manager import ENTRY_POINT_GROUP, Plugins
from ondemand.plugins.lifecycle_noop import NoopLifecycle
from ondemand.plugins.storage_redis import RedisStorage
from ondemand.redis.lifecycle import LifecycleContext
from ondemand.store.protocols import StorageContext
from ondemand.web import RUNTIME, create_app, get_runtime, setup
from tests.support import pid_gone, redis_children, wait_for


def test_builtins_and_entry_point_plugin_are_registered(make_config) -> None:
    names = set(Plugins(make_config().plugins.disable).names())
    assert {"lifecycle_subprocess", "lifecycle_external", "lifecycle_noop", "storage_redis"} <= names
    assert "example" in names, f"the example plugin is found through the {ENTRY_POINT_GROUP!r} entry points"


async def test_third_party_lifecycle_is_used_by_name_from_config(make_config) -> None:
    ondemand_example.SEEN_EVENTS.clear()
    async with Runtime(make_config({"lifecycle": {"plugin": "example-subprocess"}})) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        status = rt.status()["redis"]
        assert status["lifecycle"] == "example-subprocess" and status["example_plugin"] is True
        assert len(redis_children()) == 1
        assert rt.lifecycles.owner("example-subprocess") == "example"
    assert ("ready", {"lifecycle": "example-subprocess", "pid": status["pid"]}) in ondemand_example.SEEN_EVENTS


async def test_disable_blocks_plugins_before_loading(make_config) -> None:
    config = make_config({"plugins": {"disable": ["example", "lifecycle_noop"]},
                          "lifecycle": {"plugin": "noop"}})
    with pytest.raises(PluginError) as info:
        async with Runtime(config):
            pass
    assert "unknown lifecycle 'noop'" in str(info.value)
    assert "available: external, subprocess" in str(info.value)


async def test_duplicate_name_names_both_plugins(make_config) -> None:
    class Shadow:
        @hookimpl
        def ondemand_register_lifecycles(self, registry):
            registry.add("subprocess", lambda runtime: None)

    with pytest.raises(PluginError) as info:
        async with Runtime(make_config(), plugins=[Shadow()]):
            pass
    message = str(info.value)
    assert "'subprocess' is registered twice" in message and "lifecycle_subprocess" in message


async def test_unknown_storage_lists_available(make_config) -> None:
    with pytest.raises(PluginError, match=r"unknown storage 'memcached'; available: .*redis"):
        async with Runtime(make_config({"storage": {"cache": "memcached"}})):
            pass


async def test_observer_that_raises_does_not_break_the_service(make_config) -> None:
    class Broken:
        @hookimpl
        def ondemand_redis_ready(self, lifecycle, pid, endpoint, seconds):
            raise RuntimeError("observer bug")

    async with Runtime(make_config(), plugins=[Broken()]) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        assert await rt.cache.get_profile("u") == {"v": 1}


async def test_configure_hook_is_historic(make_config) -> None:
    seen = []

    class Late:
        @hookimpl
        def ondemand_configure(self, config):
            seen.append(config.redis.key_prefix)

    async with Runtime(make_config({"redis": {"key_prefix": "late"}}), plugins=[Late()]):
        pass
    assert seen == ["late"]


def test_every_hook_is_documented_in_the_readme() -> None:
    from pathlib import Path

    from ondemand import hookspecs

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("ondemand_")]
    assert hooks
    missing = [name for name in hooks if f"`{name}" not in readme]
    assert not missing, f"hooks missing from README.md: {missing}"


# -- helpers -------------------------------------------------------------------------------------------


def plugin(name: str, **hooks: Callable[..., Any]) -> types.ModuleType:
    """A plugin as a module named `name` (pluggy registers it under that name), its functions hooks."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, function if hasattr(function, f"{PROJECT}_impl") else hookimpl(function))
    return module


@attrs.frozen
class WidgetConfig:
    size: int = attrs.field(default=1, validator=between(1, 10))
    label: str = "widget"


def widget_plugin(seen: list[Config] | None = None) -> types.ModuleType:
    def ondemand_config_sections(sections: SectionRegistry) -> None:
        sections.add("widget", WidgetConfig)

    def ondemand_configure(config: Config) -> None:
        if seen is not None:
            seen.append(config)

    return plugin("widget", ondemand_config_sections=ondemand_config_sections, ondemand_configure=ondemand_configure)


OBSERVER_HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("ondemand_")
                        and f".hook.{name}" not in Path(app_plugins.__file__).read_text())


class Recorder:
    """A plugin observing every event; `seen` lists (hook, fields) in the order they came."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def of(self, hook: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.seen if name == hook]

    @hookimpl
    def ondemand_redis_spawned(self, lifecycle: str, pid: int, endpoint: str) -> None:
        self.seen.append(("ondemand_redis_spawned", {"lifecycle": lifecycle, "pid": pid, "endpoint": endpoint}))

    @hookimpl
    def ondemand_redis_ready(self, lifecycle: str, pid: int | None, endpoint: str, seconds: float) -> None:
        self.seen.append(("ondemand_redis_ready",
                          {"lifecycle": lifecycle, "pid": pid, "endpoint": endpoint, "seconds": seconds}))

    @hookimpl
    def ondemand_redis_idle_stopped(self, lifecycle: str, pid: int | None, idle_seconds: float) -> None:
        self.seen.append(("ondemand_redis_idle_stopped",
                          {"lifecycle": lifecycle, "pid": pid, "idle_seconds": idle_seconds}))

    @hookimpl
    def ondemand_degraded(self, component: str, reason: str) -> None:
        self.seen.append(("ondemand_degraded", {"component": component, "reason": reason}))

    @hookimpl
    def ondemand_recovered(self, component: str, down_seconds: float) -> None:
        self.seen.append(("ondemand_recovered", {"component": component, "down_seconds": down_seconds}))

    @hookimpl
    def ondemand_shutdown(self, lifecycle: str, pid: int | None) -> None:
        self.seen.append(("ondemand_shutdown", {"lifecycle": lifecycle, "pid": pid}))


# -- one test per hook (tests/test_architecture.py checks that every hook has one) ----------------------


def test_hook_ondemand_config_sections_declares_a_table_validated_like_the_core(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[widget]\nsize = 4\n")
    config = load_config(path, environ={}, plugins=[widget_plugin()])
    assert config.section(WidgetConfig) == WidgetConfig(size=4, label="widget")
    assert unstructure(config)["widget"] == {"size": 4, "label": "widget"}

    path.write_text("[widget]\nsize = 11\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={}, plugins=[widget_plugin()])
    assert (info.value.source, info.value.key) == (str(path), "widget.size")
    assert "expected an integer from 1 to 10, got 11" in str(info.value)


async def test_hook_ondemand_configure_is_historic_for_a_plugin_registered_later(make_config) -> None:
    seen: list[Config] = []
    async with Runtime(make_config()) as rt:
        rt.plugins.pm.register(plugin("late", ondemand_configure=lambda config: seen.append(config)))
        assert seen == [rt.config], "a plugin registered after startup still receives the config, at once"


async def test_hook_ondemand_register_lifecycles_builds_the_configured_one_from_a_context(make_config) -> None:
    made: list[tuple[LifecycleContext, NoopLifecycle]] = []

    def factory(context: LifecycleContext) -> NoopLifecycle:
        made.append((context, NoopLifecycle(name="quiet")))
        return made[-1][1]

    quiet = plugin("quiet_plugin", ondemand_register_lifecycles=lambda registry: registry.add("quiet", factory))
    async with Runtime(make_config({"lifecycle": {"plugin": "quiet"}}), plugins=[quiet]) as rt:
        [(context, lifecycle)] = made
        assert rt.lifecycle is lifecycle and rt.lifecycles.owner("quiet") == "quiet_plugin"
        assert context.config is rt.config and context.events is rt.plugins.events
        assert rt.status()["redis"]["lifecycle"] == "quiet"
        assert await rt.cache.get_profile("u") is None  # a lifecycle without Redis: reads miss
        assert redis_children() == []


async def test_hook_ondemand_register_storages_serves_the_cache_through_the_registered_one(make_config) -> None:
    made: list[tuple[StorageContext, RedisStorage]] = []

    def factory(context: StorageContext) -> RedisStorage:
        made.append((context, RedisStorage(context.redis, name="second-redis")))
        return made[-1][1]

    second = plugin("second", ondemand_register_storages=lambda registry: registry.add("second-redis", factory))
    async with Runtime(make_config({"storage": {"cache": "second-redis"}}), plugins=[second]) as rt:
        [(context, storage)] = made
        assert rt.cache_storage is storage and rt.storages.owner("second-redis") == "second"
        assert context.config is rt.config and context.redis is rt.on_demand and context.health is rt.redis_health
        await rt.cache.cache_profile("u", {"v": 1})
        assert await rt.cache.get_profile("u") == {"v": 1}
        assert await rt.on_demand.with_connection(lambda r: r.exists("ondemand:profile:u")) == 1


def widget_routes(routes: Any) -> None:
    """A plugin's routes: one documented (reading the runtime, refusing odd ids), one not, one that breaks."""
    key_prefix = routes.config.redis.key_prefix  # the config the app is set up with

    async def widget(request: web.Request) -> web.Response:
        widget_id = request.match_info["widget_id"]
        if int(widget_id) % 2:
            raise InvalidInput(f"widget ids are even, got {widget_id}")
        value = await get_runtime(request).dispatcher.get("profile", f"widget-{widget_id}")
        return web.json_response({"widget_id": widget_id, "value": value, "prefix": key_prefix})

    async def create(request: web.Request) -> web.Response:
        return web.json_response({"created": True}, status=201)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in the plugin")

    routes.add("GET", r"/api/widgets/{widget_id:\d+}", widget, openapi={
        "summary": "Read a widget", "responses": {"200": {"description": "the widget"}}})
    routes.add("post", "/api/widgets", create)  # any case; served, not documented
    routes.add("GET", "/api/widgets/broken", broken)


async def test_hook_ondemand_register_routes_serves_a_plugins_routes_wrapped_like_ours(aiohttp_client,
                                                                                       make_config) -> None:
    widgets = plugin("widgets", ondemand_register_routes=widget_routes)
    app = create_app(make_config({"server": {"api_token": "t0ken"}}), plugins=[widgets])
    client = await aiohttp_client(app)
    auth = {"Authorization": "Bearer t0ken"}
    await app[RUNTIME].cache.cache_profile("widget-2", {"size": 3})
    assert (await client.get("/api/widgets/2")).status == 401  # the token, as on every route but the probes
    resp = await client.get("/api/widgets/2", headers=auth)
    assert await resp.json() == {"widget_id": "2", "value": {"size": 3}, "prefix": "ondemand"}
    resp = await client.get("/api/widgets/3", headers=auth)  # its OndemandError: our JSON error, its status
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_input"
    resp = await client.get("/api/widgets/broken", headers=auth)  # anything else: a 500, no traceback
    assert resp.status == 500 and (await resp.json())["error"]["code"] == "internal_error"
    assert (await client.post("/api/widgets", headers=auth)).status == 201
    resp = await client.delete("/api/widgets", headers=auth)
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    metrics = await (await client.get("/metrics")).text()
    # Prometheus escapes the backslash of the template's regex.
    assert r'ondemand_http_requests_total{method="GET",route="/api/widgets/{widget_id:\\d+}",status="200"} 1.0' \
        in metrics
    paths = (await (await client.get("/api/openapi.json", headers=auth)).json())["paths"]
    operation = paths["/api/widgets/{widget_id}"]["get"]  # the regex is aiohttp's business, not OpenAPI's
    assert operation["parameters"] == [{"name": "widget_id", "in": "path", "required": True,
                                        "schema": {"type": "string"}}]
    assert {"200", "401", "403"} <= set(operation["responses"])
    assert "/api/widgets" not in paths and "/api/widgets/broken" not in paths  # no operation: not documented


async def test_hook_ondemand_register_routes_under_the_prefix_of_a_users_app(aiohttp_client, make_config) -> None:
    widgets = plugin("widgets", ondemand_register_routes=widget_routes)
    app = web.Application()
    setup(app, make_config(), routes="/ondemand", plugins=[widgets])
    client = await aiohttp_client(app)
    assert (await (await client.get("/ondemand/api/widgets/4")).json())["widget_id"] == "4"
    assert (await client.get("/api/widgets/4")).status == 404  # only under the prefix
    paths = (await (await client.get("/ondemand/api/openapi.json")).json())["paths"]
    assert "/ondemand/api/widgets/{widget_id}" in paths


async def test_the_example_plugins_route_through_its_entry_point(aiohttp_client, make_config) -> None:
    client = await aiohttp_client(create_app(make_config({"example": {"greeting": "bonjour"}})))
    assert await (await client.get("/api/example/greet/Ada")).json() == {"greeting": "bonjour, Ada"}
    resp = await client.get("/api/example/greet/A1")
    assert resp.status == 400 and "ASCII letters" in (await resp.json())["error"]["message"]
    document = await (await client.get("/api/openapi.json")).json()
    assert document["paths"]["/api/example/greet/{name}"]["get"] == ondemand_example.GREET_OPERATION
    blocked = await aiohttp_client(create_app(make_config({"plugins": {"disable": ["example"]}})))
    assert (await blocked.get("/api/example/greet/Ada")).status == 404


@pytest.mark.parametrize(("first", "second", "words"), [
    # a plugin against the core, the same path with another variable name: still the same route
    (None, ("GET", "/api/sessions/{sid}"), "route GET /api/sessions/{sid} is registered twice: by plugin 'core' "
                                           "(/api/sessions/{session_id}) and by plugin 'second'"),
    # two plugins: pluggy calls the one registered last first
    (("POST", "/api/things"), ("post", "/api/things"),
     "route POST /api/things is registered twice: by plugin 'second' (/api/things) and by plugin 'first'"),
])
def test_a_route_registered_twice_is_a_startup_error_naming_both(make_config, first, second, words) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    plugins = [plugin(name, ondemand_register_routes=lambda routes, m=route[0], p=route[1]: routes.add(m, p, handler))
               for name, route in (("first", first), ("second", second)) if route is not None]
    with pytest.raises(PluginError) as info:
        create_app(make_config(), plugins=plugins)
    assert str(info.value).startswith(words)
    # Another method on the same path is another route.
    other = plugin("other", ondemand_register_routes=lambda routes: routes.add("PATCH", "/api/sessions/{x}", handler))
    create_app(make_config(), plugins=[other])


@pytest.mark.parametrize(("args", "words"), [
    (("FETCH", "/api/x"), "method 'FETCH'; expected one of GET, POST, PUT, PATCH, DELETE"),
    (("HEAD", "/api/x"), "(a GET route also answers HEAD)"),
    (("GET", "api/x"), "a path starts with '/'"),
    (("GET", "/api/{bad"), "which aiohttp refuses"),
    (("GET", "/api/x", "not a handler"), "handler that is not callable (str)"),
    (("GET", "/api/x", None, {"summary": "no responses"}), "without 'responses'"),
    (("GET", "/api/x", None, {"responses": {}, "x": {1, 2}}), "that is not JSON"),
    (("GET", "/api/x", None, {"responses": {}, "parameters": {}}), "'parameters' is not a list"),
])
def test_a_bad_route_is_a_startup_error_naming_the_plugin(make_config, args: tuple, words: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    method, path, *rest = args
    target = rest[0] if rest and rest[0] is not None else handler
    openapi = rest[1] if len(rest) > 1 else None
    bad = plugin("bad", ondemand_register_routes=lambda routes: routes.add(method, path, target, openapi=openapi))
    with pytest.raises(PluginError) as info:
        create_app(make_config(), plugins=[bad])
    assert str(info.value).startswith("plugin 'bad' ") and words in str(info.value)


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
def test_register_routes_as_a_hook_wrapper_is_refused_naming_the_plugin(make_config, style: str) -> None:
    def routes_wrapper(routes: Any) -> Any:
        yield

    wrapper = plugin("wrapping", ondemand_register_routes=hookimpl(**{style: True})(routes_wrapper))
    with pytest.raises(PluginError, match="plugin 'wrapping' implements ondemand_register_routes as a hook wrapper"):
        create_app(make_config(), plugins=[wrapper])


async def test_hook_ondemand_host_services_are_collected_and_none_is_dropped(make_config) -> None:
    @attrs.define
    class Service:
        name: str = "test service"

        async def start(self) -> dict[str, Any]:
            return {}

        async def stop(self) -> None:
            pass

    offered = plugin("offers", ondemand_host_services=lambda config: Service())
    declines = plugin("declines", ondemand_host_services=lambda config: None)
    config = make_config()  # Redis only: no embedded PostgreSQL to share
    services = Plugins((), [offered, declines]).host_services(config)
    assert sorted(s.name for s in services) == ["shared Redis runtime directory", "test service"]

    shared = next(s for s in services if s.name == "shared Redis runtime directory")
    overrides = await shared.start()
    runtime_dir = Path(overrides["lifecycle"]["runtime_dir"])
    try:
        assert runtime_dir.is_dir() and stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    finally:
        await shared.stop()
    assert not runtime_dir.exists()

    # A runtime_dir of the operator's own: the workers share it, the plugin offers nothing.
    own = make_config({"lifecycle": {"runtime_dir": str(runtime_dir)}})
    assert [s.name for s in Plugins((), [offered, declines]).host_services(own)] == ["test service"]


async def test_hook_ondemand_redis_spawned_names_the_child_before_it_is_ready(make_config) -> None:
    observer = Recorder()
    async with Runtime(make_config(), plugins=[observer]) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        pid = rt.on_demand.lifecycle.pid()
        [spawned] = observer.of("ondemand_redis_spawned")
        assert spawned == {"lifecycle": "subprocess", "pid": pid, "endpoint": rt.status()["redis"]["endpoint"]}
        hooks = [name for name, _ in observer.seen]
        assert hooks.index("ondemand_redis_spawned") < hooks.index("ondemand_redis_ready")


async def test_hook_ondemand_redis_ready_after_the_server_answers(make_config) -> None:
    observer = Recorder()
    async with Runtime(make_config(), plugins=[observer]) as rt:
        t0 = time.monotonic()
        await rt.cache.cache_profile("u", {"v": 1})
        elapsed = time.monotonic() - t0
        [ready] = observer.of("ondemand_redis_ready")
        assert ready["lifecycle"] == "subprocess" and ready["pid"] == rt.on_demand.lifecycle.pid()
        assert ready["endpoint"] == rt.status()["redis"]["endpoint"]
        assert 0 < ready["seconds"] <= elapsed


async def test_hook_ondemand_redis_idle_stopped_after_idle_timeout(make_config) -> None:
    observer = Recorder()
    async with Runtime(make_config({"lifecycle": {"idle_timeout": 0.3}}), plugins=[observer]) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        pid = rt.on_demand.lifecycle.pid()
        await wait_for(lambda: observer.of("ondemand_redis_idle_stopped"), timeout=5)
        [stopped] = observer.of("ondemand_redis_idle_stopped")
        assert stopped["lifecycle"] == "subprocess" and stopped["pid"] == pid
        assert stopped["idle_seconds"] >= 0.3
        assert pid_gone(pid) and rt.on_demand.state == "stopped"


async def test_hook_ondemand_degraded_when_the_redis_server_dies(make_config) -> None:
    observer = Recorder()
    async with Runtime(make_config({"lifecycle": {"restart_backoff": 5.0}}), plugins=[observer]) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        assert observer.of("ondemand_degraded") == []
        pid = rt.on_demand.lifecycle.pid()
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: observer.of("ondemand_degraded"), timeout=5)
        [degraded] = observer.of("ondemand_degraded")
        assert degraded["component"] == "redis"
        assert degraded["reason"] == rt.redis_health.last_error and str(pid) in degraded["reason"]


async def test_hook_ondemand_recovered_with_the_length_of_the_outage(make_config) -> None:
    observer = Recorder()
    async with Runtime(make_config({"lifecycle": {"restart_backoff": 0.05}}), plugins=[observer]) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        os.kill(rt.on_demand.lifecycle.pid(), signal.SIGKILL)
        await wait_for(lambda: observer.of("ondemand_degraded"), timeout=5)
        down_at = time.monotonic()
        await asyncio.sleep(0.2)
        assert observer.of("ondemand_recovered") == [], "no recovery before Redis serves again"
        await rt.cache.get_profile("u")  # (a miss while the breaker is open) starts Redis again
        await wait_for(lambda: observer.of("ondemand_recovered"), timeout=5)
        [recovered] = observer.of("ondemand_recovered")
        assert recovered["component"] == "redis"
        assert 0.2 <= recovered["down_seconds"] <= time.monotonic() - down_at + 0.1


async def test_hook_ondemand_shutdown_when_the_runtime_closes(make_config) -> None:
    observer = Recorder()
    async with Runtime(make_config(), plugins=[observer]) as rt:
        pass
    assert observer.of("ondemand_shutdown") == [{"lifecycle": "subprocess", "pid": None}], "no server ran"

    observer = Recorder()
    async with Runtime(make_config(), plugins=[observer]) as rt:
        await rt.cache.cache_profile("u", {"v": 1})
        pid = rt.on_demand.lifecycle.pid()
    assert observer.seen[-1] == ("ondemand_shutdown", {"lifecycle": "subprocess", "pid": pid}), "the last event"
    assert pid_gone(pid), "the server is stopped before shutdown is announced"


# -- the example plugin's own [example] section ------------------------------------------------------


async def test_example_plugin_is_configured_from_toml_and_shows_it_in_its_status(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[lifecycle]\nplugin = "example-subprocess"\n[storage]\ndurable = ""\n'
                    '[example]\ngreeting = "bonjour"\nlevel = 3\n')
    config = load_config(path, environ={})
    assert config.section(ExampleConfig) == ExampleConfig(greeting="bonjour", level=3)
    async with Runtime(config) as rt:
        assert rt.status()["redis"]["example"] == {"greeting": "bonjour", "level": 3}
    assert load_config(None, environ={}).section(ExampleConfig) == ExampleConfig(), "no [example]: defaults"


def test_example_plugin_is_configured_from_its_environment_variables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[example]\ngreeting = "from the file"\nlevel = 2\n')
    assert load_config(path, environ={"ONDEMAND_EXAMPLE__LEVEL": "4"}).section(ExampleConfig).level == 4
    # The alias the plugin declared, above ONDEMAND_EXAMPLE__GREETING and the file (as DATABASE_URL is).
    environ = {"EXAMPLE_GREETING": "hi there", "ONDEMAND_EXAMPLE__GREETING": "not this"}
    assert load_config(path, environ=environ).section(ExampleConfig) == ExampleConfig(greeting="hi there", level=2)
    assert load_config(path, environ={"ONDEMAND_EXAMPLE__GREETING": "ciao"}).section(ExampleConfig).greeting == "ciao"


@pytest.mark.parametrize(
    ("toml", "environ", "source", "key", "expected"),
    [
        ("level = 9", {}, "file", "example.level", "expected an integer from 1 to 5, got 9"),
        ("level = 'high'", {}, "file", "example.level", "expected int, got str"),
        ("greeting = '42'", {}, "file", "example.greeting", "expected 1 to 40 letters, spaces, ',' or '!'"),
        ("level = 2", {"ONDEMAND_EXAMPLE__LEVEL": "0"}, "environment variable ONDEMAND_EXAMPLE__LEVEL",
         "example.level", "expected an integer from 1 to 5, got 0"),
        ("greeting = 'hello'", {"EXAMPLE_GREETING": "<b>hi</b>"}, "environment variable EXAMPLE_GREETING",
         "example.greeting", "expected 1 to 40 letters"),
    ],
)
def test_example_plugin_bad_value_names_its_origin_key_and_expectation(
    tmp_path: Path, toml: str, environ: dict[str, str], source: str, key: str, expected: str,
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[example]\n{toml}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ)
    source = str(path) if source == "file" else source
    message = str(info.value)
    assert (info.value.source, info.value.key) == (source, key)
    assert message.startswith(f"{source}: {key}: ") and expected in message
    if environ:
        assert str(path) not in message, "a variable set the bad value, not the file"


def test_example_plugin_unknown_key_lists_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[example]\ncolour = 'red'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key == "example.colour"
    assert "unknown key 'colour' in [example]; its keys are: api_key, greeting, level, upstream" in str(info.value)


def test_example_section_is_unknown_when_the_plugin_is_disabled(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[plugins]\ndisable = ["example"]\n[example]\nlevel = 2\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert (info.value.source, info.value.key) == (str(path), "example")
    message = str(info.value)
    assert "unknown section [example]; known sections: " in message
    listed = message.split("known sections: ", 1)[1].split(", ")
    known = {*Plugins(["example"]).config_sections().tables(), "pools", "namespaces"}
    assert listed == sorted(known) and "example" not in listed
    assert {"lifecycle", "namespaces", "plugins", "pools", "postgres", "redis", "server", "storage"} <= set(listed)
    path.write_text('[plugins]\ndisable = ["example"]\n')
    with pytest.raises(PluginError, match="no config section ExampleConfig"):
        load_config(path, environ={}).section(ExampleConfig)


# -- the mechanisms: sections, register hooks, events ---------------------------------------------------


@pytest.mark.parametrize(("table", "owner"), [("example", "example"), ("server", "core"), ("lifecycle",
                                                                                             "lifecycle_subprocess")])
def test_a_config_key_declared_twice_names_both_plugins(table: str, owner: str) -> None:
    key = {"example": "level", "server": "port", "lifecycle": "redis_binary"}[table]
    rival_config = attrs.make_class("RivalConfig", {key: attrs.field(default=None)}, frozen=True)
    rival = plugin("rival", ondemand_config_sections=lambda sections: sections.add(table, rival_config))
    with pytest.raises(PluginError) as info:
        load_config(None, environ={}, plugins=[rival])
    message = str(info.value)
    # (which one is "first" is pluggy's call order: the later registered plugin is called first)
    assert message.startswith(f"config key {table}.{key} is declared twice: by plugin ")
    assert f"plugin {owner!r}" in message and "plugin 'rival'" in message


class NotAttrs:
    size = 1


@attrs.frozen
class NeedsAValue:
    size: int


@pytest.mark.parametrize(
    ("table", "cls", "words"),
    [
        ("Widget", WidgetConfig, "declared a config section named 'Widget'; expected lowercase letters"),
        ("wid-get", WidgetConfig, "named 'wid-get'"),
        ("", WidgetConfig, "named ''"),
        ("environment", WidgetConfig, "not one of environment, namespaces, pools, source"),
        ("pools", WidgetConfig, "named 'pools'"),
        ("widget", NotAttrs, "declared [widget] with <class"),
        ("widget", NeedsAValue, "declared [widget] with NeedsAValue, which cannot be built from its defaults"),
    ],
)
def test_a_section_with_a_bad_table_name_or_class_is_refused(table: str, cls: type, words: str) -> None:
    odd = plugin("odd", ondemand_config_sections=lambda sections: sections.add(table, cls))
    with pytest.raises(PluginError) as info:
        load_config(None, environ={}, plugins=[odd])
    assert str(info.value).startswith("plugin 'odd' ") and words in str(info.value)


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
@pytest.mark.parametrize("hook", ["ondemand_config_sections", "ondemand_register_lifecycles",
                                  "ondemand_register_storages"])
async def test_a_register_hook_as_a_hook_wrapper_is_refused_naming_the_plugin(make_config, hook: str,
                                                                              style: str) -> None:
    def registry_wrapper(registry: Any) -> Any:  # the register hooks take `registry`...
        yield

    def sections_wrapper(sections: Any) -> Any:  # ...the config one `sections`
        yield

    function = sections_wrapper if hook == "ondemand_config_sections" else registry_wrapper
    wrapper = plugin("wrapping", **{hook: hookimpl(**{style: True})(function)})
    with pytest.raises(PluginError) as info:
        async with Runtime(make_config(), plugins=[wrapper]):
            pass
    assert str(info.value) == (f"plugin 'wrapping' implements {hook} as a hook wrapper; register hooks take "
                               "plain implementations only")


def test_events_has_one_method_per_observer_hook_and_nothing_else() -> None:
    """Every hook is either collected by a typed method of Plugins or emitted by one method of Events
    with the hookspec's own fields, and each Events method reaches its hook."""
    hooks = sorted(name for name in dir(hookspecs) if name.startswith("ondemand_"))
    assert {"ondemand_config_sections", "ondemand_register_lifecycles"}.isdisjoint(OBSERVER_HOOKS)
    assert {"ondemand_degraded", "ondemand_shutdown"} <= set(OBSERVER_HOOKS) < set(hooks)
    methods = sorted(name for name, _ in inspect.getmembers(Events, inspect.isfunction) if not name.startswith("_"))
    assert methods == sorted(hook.removeprefix("ondemand_") for hook in OBSERVER_HOOKS)

    observer = Recorder()
    events = Plugins((), [observer]).events
    for hook in OBSERVER_HOOKS:
        method = getattr(events, hook.removeprefix("ondemand_"))
        params = inspect.signature(method).parameters
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), hook
        spec_args = list(inspect.signature(getattr(hookspecs, hook)).parameters)
        assert list(params) == spec_args, f"Events.{method.__name__} and {hook} take different fields"
        fields = {name: f"{hook}:{name}" for name in spec_args}
        method(**fields)
        assert observer.seen[-1] == (hook, fields)
    assert len(observer.seen) == len(OBSERVER_HOOKS)


def test_an_event_emitted_with_a_wrong_field_is_our_error_not_hidden() -> None:
    observer = Recorder()
    events = Plugins((), [observer]).events
    with pytest.raises(TypeError, match=r"ondemand_degraded takes \['component', 'reason'\], emitted with "
                                        r"\['component', 'why'\]"):
        events._emit("ondemand_degraded", component="redis", why="typo")
    assert observer.seen == [], "no observer saw the malformed event"


async def test_runtime_validates_the_section_of_a_plugin_unknown_when_the_config_was_loaded(make_config) -> None:
    seen: list[Config] = []
    config = make_config()  # loaded without the widget plugin: its [widget] section is not in it
    with pytest.raises(PluginError):
        config.section(WidgetConfig)
    async with Runtime(config, plugins=[widget_plugin(seen)]) as rt:
        assert rt.config.section(WidgetConfig) == WidgetConfig()
        assert seen == [rt.config], "ondemand_configure sees the config with the section"

    # Data holding a [widget] table (a Config built by hand, or loaded elsewhere) is validated, not ignored.
    with_table = attrs.evolve(config, data={**config.data, "widget": {"size": 7}})
    async with Runtime(with_table, plugins=[widget_plugin()]) as rt:
        assert rt.config.section(WidgetConfig) == WidgetConfig(size=7)
    bad = attrs.evolve(config, data={**config.data, "widget": {"size": 70}})
    with pytest.raises(ConfigError) as info:
        async with Runtime(bad, plugins=[widget_plugin()]):
            pass
    assert info.value.key == "widget.size" and "from 1 to 10, got 70" in str(info.value)
