"""Property tests (hypothesis): the config loader, id and ttl validation, and the HTTP API.

Each property is bounded (max_examples) so the whole file runs in a few seconds. No example database
is written (database=None): a failure prints the falsifying example, which is then pinned as a plain
test or an `@example`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import orjson
import pytest
import yarl
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from ondemand.config import (
    Config,
    LifecycleConfig,
    NamespaceConfig,
    PluginsConfig,
    PoolConfig,
    RedisConfig,
    ServerConfig,
    StorageConfig,
    unstructure,
)
from ondemand.config.load import config_from_dict, load_config
from ondemand.errors import ConfigError, InvalidInput
from ondemand.store.values import MAX_ID_BYTES, MAX_TTL, MIN_TTL, check_id, check_ttl
from ondemand.web import RUNTIME, create_app


def fast(max_examples: int) -> settings:
    """Bounded, no example database written to the repository, no per-example deadline (CI is slow)."""
    return settings(max_examples=max_examples, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# -- TOML-ish values ----------------------------------------------------------------------------

# Every table and the classes that share it: the core's and the built-in plugins' (as load_config sees them).
_LOADED = load_config(None, environ={})
SECTIONS: dict[str, tuple[type, ...]] = {
    "server": (ServerConfig,), "lifecycle": (LifecycleConfig,), "redis": (RedisConfig,),
    "storage": (StorageConfig,), "plugins": (PluginsConfig,),
}
for _cls, _table in _LOADED.section_tables.items():
    SECTIONS[_table] = (*SECTIONS.get(_table, ()), _cls)
TABLES_OF: dict[str, type] = {"pools": PoolConfig, "namespaces": NamespaceConfig}
FIELD_NAMES = sorted({f.name for classes in SECTIONS.values() for cls in classes for f in attrs.fields(cls)}
                     | {f.name for cls in TABLES_OF.values() for f in attrs.fields(cls)})

# Values that are close to valid for many fields, so generation reaches the validators, not only types.
plausible = st.sampled_from([
    0, 1, -1, 5, 65535, 65536, 10**6, 2**63 - 1, 0.0, 0.25, -0.5, 1e300, "", "x", "256mb", "0", "12gb", "1tb",
    "auto", "subprocess", "external", "noop", "redis", "postgres", "embedded", "text", "json", "allkeys-lru",
    "redis://:pw@127.0.0.1:6379/0", "unix:///tmp/r.sock?db=2", "token-123", "has space", True, False,
    ["a", "b"], [], {"maxmemory-policy": "noeviction"},
])
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.datetimes(max_value=dt.datetime(9999, 1, 1)),
    st.dates(),
    st.times(),
    plausible,
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=8,
)


@st.composite
def section_tables(draw: st.DrawFn, classes: tuple[type, ...]) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(toml_values)  # not even a table
    names = [f.name for cls in classes for f in attrs.fields(cls)]
    chosen = draw(st.lists(st.sampled_from(names) | st.text(max_size=6), max_size=4, unique=True))
    return {name: draw(toml_values) for name in chosen}


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from([*SECTIONS, *TABLES_OF, "environment", "source", "bogus"]),
                              max_size=5, unique=True)):
        if name in SECTIONS:
            data[name] = draw(section_tables(SECTIONS[name]))
        elif name in TABLES_OF:
            data[name] = draw(st.dictionaries(st.text(max_size=6), section_tables((TABLES_OF[name],)), max_size=3)
                              | toml_values)
        else:
            data[name] = draw(toml_values)
    return data


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but TOML wants non-BMP characters raw and DEL escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_literal(value: Any) -> str:
    """A TOML literal for a generated value: basic strings, inline arrays and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_literal(v)}\n" for k, v in data.items())


env_names = st.one_of(
    st.sampled_from([f"ONDEMAND_{s.upper()}__{f.upper()}" for s in SECTIONS for f in FIELD_NAMES]),
    st.builds(lambda a, b: f"ONDEMAND_{a}__{b}", st.text(string.ascii_uppercase + "_", max_size=8),
              st.text(string.ascii_uppercase + "_", max_size=8)),
    st.sampled_from(["REDIS_URL", "DATABASE_URL", "DOCKER_ENV", "ONDEMAND_POOLS__X__KEEP_ALIVE",
                     "ONDEMAND_NAMESPACES__N__TTL"]),
)
env_texts = st.one_of(st.text(st.characters(blacklist_characters="\x00"), max_size=16),
                      plausible.map(lambda v: toml_literal(v)))


def env_paths_conflict(environ: dict[str, str]) -> bool:
    """Two ONDEMAND_ variables where one names a value and the other a key inside it (a known bug)."""
    paths = [tuple(n[len("ONDEMAND_"):].lower().split("__"))
             for n in environ if n.startswith("ONDEMAND_") and "__" in n]
    return any(a != b and b[: len(a)] == a for a in paths for b in paths)


# -- (a) the config loader ----------------------------------------------------------------------


@fast(100)
@given(config_dicts())
@example({"server": {"port": 2**70}})
@example({"plugins": {"disable": [1]}})
@example({"pools": {"a": 5}})
@example({"namespaces": {"x": {"ttl": float("nan")}}})
def test_config_from_dict_returns_a_config_or_raises_config_error(data: dict[str, Any]) -> None:
    try:
        config = config_from_dict(data)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(config, Config)
        assert config_from_dict(unstructure(config)) == config  # documented round trip
        for namespace in config.namespaces.values():  # what the config accepts, the dispatcher accepts
            check_ttl(namespace.ttl, None)


@fast(60)
@given(config_dicts(), st.dictionaries(env_names, env_texts, max_size=4))
def test_load_config_from_a_toml_file_and_environment(tmp_path_factory: Any, data: dict[str, Any],
                                                      environ: dict[str, str]) -> None:
    assume(not env_paths_conflict(environ))
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_text(toml_document(data), encoding="utf-8")
    try:
        config = load_config(path, environ=environ)
    except ConfigError as exc:
        # The error names where the bad value came from: the file, or the one variable that set it.
        variable = (exc.source or "").removeprefix("environment variable ")
        assert exc.source == str(path) or variable in environ, (exc.source, environ)
        assert str(exc).startswith(exc.source or "")
    else:
        assert isinstance(config, Config) and config.source == str(path)


@fast(100)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_load_config_from_arbitrary_bytes(tmp_path_factory: Any, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_bytes(raw)
    with contextlib.suppress(ConfigError):
        assert isinstance(load_config(path, environ={}), Config)


def test_conflicting_environment_variables_are_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config(None, environ={"ONDEMAND_SERVER__PORT": "1", "ONDEMAND_SERVER__PORT__X": "2"})


def test_plugins_disable_as_a_string_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"plugins\.disable"):
        config_from_dict({"plugins": {"disable": "storage_postgres"}})


@pytest.mark.parametrize("value", [float("inf"), 1e300, MAX_TTL + 1])
def test_namespace_ttl_must_be_finite_and_at_most_ten_years(value: float) -> None:
    with pytest.raises(ConfigError, match=r"namespaces\.n\.ttl"):
        config_from_dict({"namespaces": {"n": {"ttl": value}}})


# -- (b) ids ------------------------------------------------------------------------------------


def id_is_valid(value: str) -> bool:
    """The documented rule, written independently of check_id."""
    if not value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_ID_BYTES
    except UnicodeEncodeError:  # lone surrogates
        return False


# Characters of every UTF-8 width, controls, DEL and lone surrogates.
id_chars = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(min_codepoint=0, max_codepoint=0x1F) | st.just("\x7f"),
    st.characters(min_codepoint=0x80, max_codepoint=0x7FF),
    st.characters(min_codepoint=0x800, max_codepoint=0xFFFF, blacklist_categories=["Cs"]),
    st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
)


@st.composite
def near_the_limit(draw: st.DrawFn) -> str:
    """Strings of one repeated character whose UTF-8 size is just under, at or just over 256 bytes."""
    char = draw(st.sampled_from(["a", "é", "€", "𝄞"]))
    width = len(char.encode())
    count = MAX_ID_BYTES // width + draw(st.integers(-2, 2))
    return char * count + draw(st.sampled_from(["", "a", "\x00", "\x7f"]))


@fast(400)
@given(st.one_of(st.text(id_chars, max_size=80), st.text(max_size=300), near_the_limit()))
@example("")
@example("a" * 256)
@example("a" * 257)
@example("é" * 128)
@example("é" * 129)
@example("\ud800")
@example("\ud800" * 100)
@example("ok\x7f")
def test_check_id_accepts_exactly_the_documented_ids(value: str) -> None:
    if id_is_valid(value):
        assert check_id(value) == value
    else:
        with pytest.raises(InvalidInput):
            check_id(value)


@fast(50)
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=8),
                 st.lists(st.text(max_size=3), max_size=2)))
def test_check_id_refuses_non_strings(value: Any) -> None:
    with pytest.raises(InvalidInput):
        check_id(value)


# -- (c) ttls -----------------------------------------------------------------------------------


@fast(400)
@given(st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.floats(0, MAX_TTL), st.text(max_size=6),
    st.decimals(allow_nan=False, places=2), st.binary(max_size=4),
    st.sampled_from([MAX_TTL, MAX_TTL + 1, 5e-324, MIN_TTL, 0.000999, 1e-9]),
))
@example(float("nan"))
@example(float("inf"))
@example(-0.0)
@example(int(MAX_TTL))
@example(int(MAX_TTL) + 1)
@example(10**400)
def test_check_ttl_accepts_exactly_numbers_from_a_millisecond_to_ten_years(value: Any) -> None:
    default = 123.0
    if value is None:
        assert check_ttl(value, default) == default
        return
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric and not (isinstance(value, float) and math.isnan(value)) and MIN_TTL <= value <= MAX_TTL:
        result = check_ttl(value, default)
        assert isinstance(result, float) and result == float(value)
    else:
        with pytest.raises(InvalidInput):
            check_ttl(value, default)


# -- (d) the HTTP API never answers 500 ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


bodies = st.one_of(
    st.none(),  # no body
    json_values.map(lambda v: ("application/json", json.dumps(v, allow_nan=True).encode())),
    st.builds(lambda d: ("application/json", json.dumps(nested(d)).encode()), st.integers(30, 1100)),
    st.fixed_dictionaries({}, optional=dict.fromkeys(
        ("session", "messages", "profile", "session_id", "user_id", "ttl", "data"), json_values,
    )).map(lambda d: ("application/json", json.dumps(d).encode())),
    st.tuples(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
              st.binary(max_size=40)),
)
PATHS = [
    ("/api/sessions/{id}", ["GET", "PUT", "DELETE", "POST"]),
    ("/api/users/{id}/messages", ["GET", "PUT", "POST", "DELETE"]),
    ("/api/users/{id}/profile", ["GET", "PUT", "DELETE"]),
    ("/api/users/{id}/warmup", ["POST", "GET"]),
    ("/api/cache/session/test", ["POST"]),
    ("/api/cache/batch/test", ["POST"]),
    ("/api/cache/test", ["GET"]),
]
queries = st.dictionaries(
    st.sampled_from(["ttl", "last", "x"]),
    st.one_of(st.sampled_from(["", "nan", "inf", "-inf", "Infinity", "1e309", "-1", "0", "1", "0.001", "1e12",
                               "315360000", "315360001", "5e-324", "abc", "1_0", "0x10", " 5 ", "9" * 3000]),
              st.text(max_size=5)),
    max_size=2,
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], Any]:
    template, methods = draw(st.sampled_from(PATHS))
    method = draw(st.sampled_from(methods))
    item_id = draw(st.one_of(st.text(id_chars, min_size=1, max_size=20), near_the_limit(),
                             st.sampled_from(["u1", "s1", "deep", "junk", ".", "..", "%", "a/b"])))
    # Percent-encode everything, lone surrogates as invalid UTF-8 bytes, like a raw client could send.
    encoded = quote(item_id.encode("utf-8", "surrogatepass"), safe="")
    return method, template.replace("{id}", encoded), draw(queries), draw(bodies)


@pytest.fixture
def http(make_config: Callable[..., Config]) -> Any:
    """(loop, client) for a Redis-only app; hypothesis drives it synchronously from the test."""
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(create_app(make_config())), loop=loop)
    loop.run_until_complete(client.start_server())
    try:
        yield loop, client
    finally:
        loop.run_until_complete(client.close())
        loop.close()


def test_http_api_never_answers_500(http: Any) -> None:
    loop, client = http
    # Values for the ids the generator likes to reuse, so reads hit stored values and appends extend lists.
    loop.run_until_complete(client.put("/api/users/u1/messages", json=[{"n": 1}]))
    loop.run_until_complete(client.put("/api/sessions/s1", json={"s": 1}))
    # Bytes another client could have stored: JSON too deep to answer, and not JSON at all.
    garbage = {"deep": b"[" * 300 + b"]" * 300, "junk": b"\x80\x05not json"}
    rt = client.app[RUNTIME]
    loop.run_until_complete(rt.on_demand.with_connection(lambda r: r.mset({
        f"ondemand:{ns}:{item_id}": raw for ns in ("session", "messages", "profile") for item_id, raw in garbage.items()
    })))

    async def send(method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, bytes, str]:
        url = yarl.URL(path, encoded=True)
        if query:
            url = url.update_query(query)
        kwargs: dict[str, Any] = {}
        if body is not None:
            content_type, data = body
            kwargs = {"data": data, "headers": {"Content-Type": content_type} if content_type else {}}
        async with client.request(method, url, **kwargs) as resp:
            return resp.status, await resp.read(), resp.content_type

    @fast(100)
    @given(requests())
    def check(request: tuple[str, str, dict[str, str], Any]) -> None:
        status, raw, content_type = loop.run_until_complete(send(*request))
        assert status < 500, (status, raw[:300])
        if status >= 400:
            assert content_type == "application/json", raw[:200]
            assert orjson.loads(raw)["error"]["code"]

    check()


def test_fuzz_helpers_make_valid_toml(tmp_path: Path) -> None:
    """The TOML writer used above, checked on a value of every kind."""
    import tomllib

    data = {"a": {"b": [1, 2.5, float("inf"), "x\n\"y\"\x7f\x00𝄞", True, dt.date(2024, 1, 2)], "c\x7fd": {"e": "z"}}}
    assert tomllib.loads(toml_document(data)) == data
