"""Cluster routing: hash slots with hash tags, the slot map, redirect replies, command keys."""

from __future__ import annotations

import pytest

from ondemand.redis.cluster import command_keys
from ondemand.redis.routing import SLOTS, SlotMap, crc16, key_slot, parse_redirect
from ondemand.store.protocols import Namespace


def test_crc16_is_xmodem() -> None:
    assert crc16(b"123456789") == 0x31C3  # the check value of CRC-16/XMODEM, as Redis Cluster uses
    assert key_slot("123456789") == 0x31C3 % SLOTS


@pytest.mark.parametrize(("key", "same_as"), [
    ("{user1000}.following", "user1000"),
    ("foo{{bar}}zap", "{bar"),  # the first { and the first } after it
    ("foo{bar}{zap}", "bar"),
])
def test_hash_tags(key: str, same_as: str) -> None:
    assert key_slot(key) == key_slot(same_as)


def test_an_empty_tag_hashes_the_whole_key() -> None:
    assert key_slot("foo{}{bar}") == crc16(b"foo{}{bar}") % SLOTS


@pytest.mark.parametrize("item_id", ["s1", "a}b", "{x}", "ü-ñ", "a{b}c"])
def test_a_key_and_its_tombstone_share_a_slot_whatever_the_id(item_id: str) -> None:
    ns = Namespace("session", 60.0, True, "session", "ondemand:session:{=", "}")
    key = ns.key(item_id)
    assert key_slot(key) == key_slot(key + "\x00deleted")
    assert key_slot(key) == key_slot(ns.key(item_id) + "\x00anything")


def test_slot_map_from_cluster_slots_and_moved() -> None:
    reply = [[0, 5460, [b"127.0.0.1", 7000, b"a"]], [5461, 10922, [b"", 7001, b"b"]],
             [10923, 16383, [b"127.0.0.1", 7002, b"c"], [b"127.0.0.1", 7005, b"f"]]]
    slots = SlotMap.from_cluster_slots(reply)
    assert slots.covered() and slots.masters() == [("127.0.0.1", 7000), ("127.0.0.1", 7001), ("127.0.0.1", 7002)]
    assert slots.owner(5461) == ("127.0.0.1", 7001)  # an empty host is the address we asked
    slots.move(5461, ("127.0.0.1", 7003))
    assert slots.owner(5461) == ("127.0.0.1", 7003) and slots.slots_of(("127.0.0.1", 7001)) == 5461


def test_parse_redirect() -> None:
    assert parse_redirect("MOVED 3999 127.0.0.1:6381") == (3999, ("127.0.0.1", 6381))
    assert parse_redirect("ASK 1 ::1:7000") == (1, ("::1", 7000))


def test_command_keys() -> None:
    assert command_keys(("GET", "k")) == ["k"]
    assert command_keys(("SET", "k", b"v", "PX", 5)) == ["k"]
    assert command_keys(("EVAL", "script", 2, "a", "b", "arg")) == ["a", "b"]
    assert command_keys(("DEL", "a", "b")) == ["a", "b"]
    assert command_keys(("MGET", "a", "b")) == ["a", "b"]
    assert command_keys(("PING",)) == [] and command_keys(("SCAN", b"0")) == []
