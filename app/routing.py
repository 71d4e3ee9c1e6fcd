"""Redis Cluster routing: hash slots (CRC16 with hash tags) and the map of slots to nodes.

A key's slot is CRC16-XMODEM of the key modulo 16384, where a key holding `{...}` with something
between the braces hashes only that part (its hash tag). Our keys are `{prefix}:{namespace}:{<id>}`:
the id is the tag, so a key and its tombstone (`<key>\\0deleted`) always share a slot, and so do the
keys of every script we run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SLOTS = 16384


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _table()


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes | str) -> int:
    """The cluster slot of `key`, honouring a hash tag (the first `{...}` with something inside)."""
    if isinstance(key, str):
        key = key.encode()
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc16(key) % SLOTS


Address = tuple[str, int]


class SlotMap:
    """Which master serves each slot; filled from CLUSTER SLOTS, patched by MOVED replies."""

    def __init__(self) -> None:
        self._owner: list[Address | None] = [None] * SLOTS

    @classmethod
    def from_cluster_slots(cls, reply: Sequence[Any], default_host: str = "127.0.0.1") -> SlotMap:
        """From a CLUSTER SLOTS reply: [[start, end, [host, port, id, ...], replicas...], ...]."""
        slot_map = cls()
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            address = (host or default_host, int(master[1]))
            for slot in range(start, end + 1):
                slot_map._owner[slot] = address
        return slot_map

    def owner(self, slot: int) -> Address | None:
        return self._owner[slot]

    def move(self, slot: int, address: Address) -> None:
        self._owner[slot] = address

    def masters(self) -> list[Address]:
        return sorted({address for address in self._owner if address is not None})

    def covered(self) -> bool:
        return all(address is not None for address in self._owner)

    def slots_of(self, address: Address) -> int:
        return sum(1 for owner in self._owner if owner == address)


def parse_redirect(message: str) -> tuple[int, Address]:
    """`MOVED 3999 127.0.0.1:6381` or `ASK 3999 127.0.0.1:6381` -> (3999, ("127.0.0.1", 6381))."""
    _, slot, where = message.split(" ", 2)
    host, _, port = where.strip().rpartition(":")
    return int(slot), (host or "127.0.0.1", int(port))
