"""The plugin system: built-ins as plugins, entry points, blocking, duplicates, unknown names."""

from __future__ import annotations

import ondemand_example
import pytest

from app import Runtime, hookimpl
from app.errors import PluginError
from app.plugins import ENTRY_POINT_GROUP, Plugins
from tests.support import redis_children


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

    from app import hookspecs

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("ondemand_")]
    assert hooks
    missing = [name for name in hooks if f"`{name}" not in readme]
    assert not missing, f"hooks missing from README.md: {missing}"
