"""The `redis` storage: namespaced JSON values in the on-demand Redis, through the pipelined path.

Every call goes to `runtime.on_demand`, so the first one starts the server and concurrent ones
coalesce into pipelines. With the `noop` lifecycle reads miss and writes do nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import attrs

from ondemand.errors import RedisCommandError
from ondemand.hookspecs import hookimpl
from ondemand.redis.server import OnDemandRedis
from ondemand.registry import Registry
from ondemand.store.protocols import Entry, Namespace, StorageFactory


async def _nothing() -> None:
    """What a read or write does with the noop lifecycle."""


# A read that missed Redis puts the durable value back with SET NX. If the value is deleted between
# that read of the durable store and the put-back, SET NX alone would bring it back until its ttl
# runs out (a logged-out session that still works). So deleting from a durable namespace leaves a
# tombstone beside the key for DELETED_HOLD seconds, and the put-back skips a key with one. Both are
# scripts, so each is atomic against the other whichever process or connection runs them. The window
# between reading the durable store and putting the value back is one round trip of our own; the
# hold is far longer. Ids never contain NUL (check_id refuses control characters), so a tombstone
# key can never be another id's key.
DELETED_HOLD = 30.0  # seconds
_TOMBSTONE = "\x00deleted"
_PUT_BACK = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if ARGV[2] == '0' then return redis.call('SET', KEYS[1], ARGV[1], 'NX') end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
"""
# Appending to a JSON list in one atomic step. The stored text is never re-encoded (Redis's cjson would
# round numbers): the new items' array text is spliced in after the stored one's. cjson only checks the
# stored value and counts it. Stored text that is not JSON counts as an empty list (a corrupt value is
# replaced, as a read would treat it as absent); JSON that is not an array is refused.
_APPEND = """
local current = redis.call('GET', KEYS[1])
local length = 0
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok then
    if not string.match(current, '^%s*%[') then return redis.error_reply('NOTLIST') end
    length = #decoded
  end
end
local merged = ARGV[1]
if length > 0 then
  if ARGV[2] == '0' then
    merged = current
  else
    merged = string.sub(current, 1, string.find(current, '%]%s*$') - 1) .. ',' .. string.sub(ARGV[1], 2)
  end
end
length = length + tonumber(ARGV[2])
if length > tonumber(ARGV[4]) then return redis.error_reply('TOOLONG ' .. length) end
if ARGV[3] == '0' then redis.call('SET', KEYS[1], merged) else redis.call('SET', KEYS[1], merged, 'PX', ARGV[3]) end
return length
"""
_DELETE_WITH_TOMBSTONES = """
local half = #KEYS / 2
local removed = 0
for i = 1, half do
  removed = removed + redis.call('DEL', KEYS[i])
  redis.call('SET', KEYS[half + i], '1', 'PX', ARGV[1])
end
return removed
"""


def _milliseconds(ttl: float) -> int:
    """A ttl in whole milliseconds, at least 1 (PX 0 is an error, and 0 means no expiry to our scripts)."""
    return max(1, int(ttl * 1000))


def _set_command(key: str, value: bytes, ttl: float | None) -> tuple[Any, ...]:
    if ttl is None:
        return ("SET", key, value)
    return ("SET", key, value, "PX", _milliseconds(ttl))


@attrs.define
class RedisStorage:
    on_demand: OnDemandRedis
    name: str = "redis"

    async def open(self) -> None:
        """Nothing to prepare: the server starts on the first operation."""

    async def close(self) -> None:
        """The runtime closes on_demand itself, after every storage."""

    async def ping(self) -> None:
        if not self.on_demand.disabled:
            await self.on_demand.execute("PING")

    # get, set and set_many return on_demand's awaitable instead of awaiting it in a frame of their
    # own: one coroutine less per operation on the hot path (callers await them all the same).
    def get(self, ns: Namespace, item_id: str) -> Awaitable[bytes | None]:
        if self.on_demand.disabled:
            return _nothing()
        return self.on_demand.execute("GET", ns.key_prefix + item_id + ns.key_suffix, connection_id=ns.connection_id)

    async def get_many(self, ns: Namespace, ids: Sequence[str]) -> list[bytes | None]:
        if self.on_demand.disabled or not ids:
            return [None] * len(ids)
        keys = [ns.key_prefix + i + ns.key_suffix for i in ids]
        return await self.on_demand.execute("MGET", *keys, connection_id=ns.connection_id)

    def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None) -> Awaitable[Any]:
        if self.on_demand.disabled:
            return _nothing()
        return self.on_demand.execute(*_set_command(ns.key_prefix + item_id + ns.key_suffix, value, ttl),
                                      connection_id=ns.connection_id)

    async def set_if_absent(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None) -> bool:
        """SET NX, unless the id was deleted in the last DELETED_HOLD seconds: puts a value read from the
        durable store back without overwriting a newer one or reviving a deleted one."""
        if self.on_demand.disabled:
            return False
        key = ns.key_prefix + item_id + ns.key_suffix
        px = 0 if ttl is None else _milliseconds(ttl)
        reply = await self.on_demand.execute("EVAL", _PUT_BACK, 2, key, key + _TOMBSTONE, value, px,
                                             connection_id=ns.connection_id)
        return reply is not None

    async def append_list(self, ns: Namespace, item_id: str, items: bytes, count: int, ttl: float | None,
                          max_items: int) -> int:
        """See CacheStorage.append_list: one script, so concurrent appends from anywhere all land."""
        if self.on_demand.disabled:
            return count
        px = 0 if ttl is None else _milliseconds(ttl)
        try:
            return await self.on_demand.execute("EVAL", _APPEND, 1, ns.key(item_id), items, count, px, max_items,
                                                connection_id=ns.connection_id)
        except RedisCommandError as exc:
            reason = str(exc).removeprefix("ERR ")  # Redis 7 and Valkey prefix a script's own error with ERR
            if reason.startswith("NOTLIST"):
                raise ns.not_a_list(item_id) from None
            if reason.startswith("TOOLONG"):
                raise ns.list_too_long(item_id, int(reason.split()[1]), max_items) from None
            raise

    def set_many(self, entries: Sequence[Entry]) -> Awaitable[Any]:
        if self.on_demand.disabled or not entries:
            return _nothing()
        by_pool: dict[str, list[tuple[Any, ...]]] = {}
        for e in entries:
            command = _set_command(e.namespace.key(e.id), e.value, e.ttl)
            by_pool.setdefault(e.namespace.connection_id, []).append(command)
        return self.on_demand.execute_grouped(by_pool)

    async def delete(self, ns: Namespace, ids: Sequence[str]) -> int:
        """DEL; in a durable namespace also a tombstone per id (see DELETED_HOLD)."""
        if self.on_demand.disabled or not ids:
            return 0
        keys = [ns.key_prefix + i + ns.key_suffix for i in ids]
        if not ns.durable:
            return await self.on_demand.execute("DEL", *keys, connection_id=ns.connection_id)
        hold = _milliseconds(DELETED_HOLD)
        if ns.key_suffix:  # a cluster: one script per id, so that each script's keys share a slot
            removed = await asyncio.gather(*(
                self.on_demand.execute("EVAL", _DELETE_WITH_TOMBSTONES, 2, k, k + _TOMBSTONE, hold,
                                       connection_id=ns.connection_id) for k in keys))
            return sum(removed)
        return await self.on_demand.execute(
            "EVAL", _DELETE_WITH_TOMBSTONES, 2 * len(keys), *keys, *(k + _TOMBSTONE for k in keys),
            hold, connection_id=ns.connection_id)

    async def delete_keys(self, keys: Sequence[str]) -> int:
        """DEL of full keys, for invalidation after an outage."""
        if self.on_demand.disabled or not keys:
            return 0
        return await self.on_demand.execute("DEL", *keys)

    async def delete_prefix(self, prefix: str, *, batch: int = 1000) -> int:
        """SCAN and UNLINK every key under `prefix`; the bounded fallback when too many keys went stale."""
        if self.on_demand.disabled:
            return 0
        removed = 0
        pattern = prefix.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?").replace("[", "\\[") + "*"
        for scan in await self.on_demand.per_master():  # one server, or every master of a cluster
            cursor = b"0"
            while True:
                cursor, keys = await scan("SCAN", cursor, "MATCH", pattern, "COUNT", batch)
                if keys:
                    removed += await self.on_demand.execute("UNLINK", *keys)  # split by slot on a cluster
                if cursor in (b"0", 0):
                    break
        return removed

    async def expire(self, ns: Namespace, item_id: str, ttl: float) -> bool:
        if self.on_demand.disabled:
            return False
        reply = await self.on_demand.execute("PEXPIRE", ns.key_prefix + item_id + ns.key_suffix, _milliseconds(ttl),
                                             connection_id=ns.connection_id)
        return bool(reply)

    def status(self) -> dict[str, Any]:
        return {"backend": "redis", "state": self.on_demand.state}


@hookimpl
def ondemand_register_storages(registry: Registry[StorageFactory]) -> None:
    registry.add("redis", lambda context: RedisStorage(context.redis))
