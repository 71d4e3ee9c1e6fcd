"""What the Python API stores: JSON that reads back equal to what was given, or an InvalidInput naming what
JSON cannot carry (never a value converted on the way: a datetime to text, a tuple to a list); what a write
returns when the cache did not store it; the status history the Runtime keeps."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import decimal
import enum
import uuid
from typing import Any

import orjson
import pytest

from ondemand import Runtime
from ondemand.errors import InvalidInput
from ondemand.store.dispatcher import WriteOutcome
from ondemand.store.values import encode, parse_json
from tests.support import wait_for


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Point:
    x: int


class Name(str):
    pass


NOT_JSON: list[tuple[Any, str]] = [
    (datetime.datetime(2026, 1, 1, 12, 0), "$ is a datetime.datetime"),
    ({"at": datetime.date(2026, 1, 1)}, "$.at is a datetime.date"),
    ((1, 2), "$ is a tuple"),
    ({"roles": ("a", "b")}, "$.roles is a tuple"),
    ([[1], [2, (3,)]], "$[1][1] is a tuple"),
    ({1, 2}, "$ is a set"),
    (b"bytes", "$ is a bytes"),
    (bytearray(b"x"), "$ is a bytearray"),
    ({1: "one"}, "keys must be str; $ has the key 1"),
    ({"a": {None: 1}}, "keys must be str; $.a has the key None"),
    (uuid.UUID(int=1), "$ is a uuid.UUID"),
    ({"id": uuid.UUID(int=1)}, "$.id is a uuid.UUID"),
    (Colour.RED, "is a tests.test_values.Colour"),
    ({"c": [Colour.RED]}, "$.c[0] is a tests.test_values.Colour"),
    (Point(1), "$ is a tests.test_values.Point"),
    (decimal.Decimal("1.1"), "$ is a decimal.Decimal"),
    ([float("nan")], "NaN or infinity"),
    ({"x": float("-inf")}, "NaN or infinity"),
    (orjson.Fragment(b"[1]"), "$ is a orjson.Fragment"),
    (2**64, "64 bits"),
    ({"big": -(2**63) - 1}, "64 bits"),
    (1e20, "$ is 1e+20"),  # a whole number, as 100000000000000000000 is
    ({"x": [1.5e300]}, "$.x[0] is 1.5e+300"),
]


@pytest.mark.parametrize(("value", "where"), NOT_JSON, ids=[repr(v)[:30] for v, _ in NOT_JSON])
def test_what_json_cannot_carry_is_refused_naming_it(value: Any, where: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        encode(value)
    assert where in str(refused.value), str(refused.value)


@pytest.mark.parametrize("value", [
    {"user": 1, "roles": ["a"], "ok": True, "score": 0.1, "none": None},
    [], {}, "text", 0, -0.0, 2**64 - 1, -(2**63), 5e-324, 1.7976931348623157e-300, 1.844674407370955e19,
    -9.223372036854776e18, [[[{"deep": [1]}]]],
])
def test_plain_json_is_stored_and_reads_back_equal(value: Any) -> None:
    raw = encode(value)
    assert orjson.loads(raw) == value and raw == orjson.dumps(value)


@pytest.mark.parametrize("value", [[Level.HIGH], {"n": Name("ada")}, collections.OrderedDict(a=1), Level.HIGH])
def test_subclasses_of_json_types_read_back_equal_as_their_base(value: Any) -> None:
    assert orjson.loads(encode(value)) == value


async def test_the_python_api_refuses_instead_of_converting(runtime: Runtime) -> None:
    with pytest.raises(InvalidInput, match=r"\$\.at is a datetime\.datetime"):
        await runtime.cache.cache_session("s", {"at": datetime.datetime.now()})
    with pytest.raises(InvalidInput, match=r"\$ is a tuple"):
        await runtime.dispatcher.set("profile", "p", (1, 2))
    with pytest.raises(InvalidInput, match=r"\$\[1\] is a set"):
        await runtime.cache.cache_messages("u", [1, {2}])
    with pytest.raises(InvalidInput, match="keys must be str"):
        await runtime.cache.warmup_user_cache("u", profile={1: 2})
    assert await runtime.dispatcher.get("profile", "p") is None  # nothing was written
    assert runtime.dispatcher.stats["profile"].writes == 0


def test_request_bodies_keep_their_numbers_or_are_refused() -> None:
    assert parse_json(b'{"a": 0.1, "b": [1e2, -0.0], "c": "3.141592653589793238462643"}') == \
        {"a": 0.1, "b": [100.0, -0.0], "c": "3.141592653589793238462643"}
    for literal in (b"3.141592653589793238462643383279", b"12345678901234567890.5", b"1e-400", b"1e400"):
        with pytest.raises(InvalidInput, match="read back as the decimal that was sent"):
            parse_json(b"[1, %s]" % literal)
    with pytest.raises(InvalidInput, match="64 bits"):
        parse_json(b"[18446744073709551616]")


async def test_a_write_returns_what_happened_when_the_cache_did_not_take_it(make_config) -> None:
    async with Runtime(make_config({"lifecycle": {"redis_binary": "/nonexistent/redis-server"}})) as rt:
        assert await rt.cache.cache_profile("u", {"n": 1}) is WriteOutcome.DROPPED
        assert await rt.dispatcher.set_many([("profile", "u", 1, None)]) is WriteOutcome.DROPPED
        count = await rt.dispatcher.append("messages", "u", [1, 2], max_items=10)
        assert count == 2 and count.outcome is WriteOutcome.DROPPED


async def test_a_stored_write_returns_none(runtime: Runtime) -> None:
    assert await runtime.cache.cache_profile("u", {"n": 1}) is None
    assert await runtime.dispatcher.set_many([("profile", "u", 1, None), ("session", "u", 2, None)]) is None
    count = await runtime.dispatcher.append("messages", "u", [1, 2], max_items=10)
    assert count == 2 and type(count) is int


async def test_the_runtime_keeps_a_history_of_its_counters_and_health(make_config) -> None:
    config = make_config({"server": {"history_interval": 0.05, "history_seconds": 0.25}})
    async with Runtime(config) as rt:
        await rt.cache.cache_profile("u", 1)
        await rt.cache.get_profile("u")
        await rt.cache.get_profile("nobody")
        first = rt.history.to_json()["samples"][0]
        await wait_for(lambda: rt.history.to_json()["samples"][0]["t"] > first["t"], timeout=10)
        await asyncio.sleep(0.1)  # a sample or two after the traffic
        history = rt.history.to_json()
    samples = history["samples"]
    assert len(samples) <= 0.25 / 0.05 + 1  # a ring: the oldest samples went
    assert samples[0]["t"] > first["t"]
    last = samples[-1]
    assert (last["ops"], last["hits"], last["reads"]) == (3, 1, 2)
    assert last["readiness"] == "ready" and last["redis_ok"] is True and last["durable_ok"] is None
    assert last["redis_state"] == "running" and last["breaker"] == "closed"
