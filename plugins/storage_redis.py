"""The `redis` storage: namespaced JSON values in the on-demand Redis, through the pipelined path.

Every call goes to `runtime.on_demand`, so the first one starts the server and concurrent ones
coalesce into pipelines. With the `noop` lifecycle reads miss and writes do nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from ondemand.errors import RedisCommandError
from ondemand.hookspecs import hookimpl
from ondemand.plugins.redis_leases import RedisLeases, sidecar
from ondemand.redis.cluster import scan_pattern, unlink
from ondemand.redis.server import OnDemandRedis
from ondemand.registry import Registry
from ondemand.store.protocols import Entry, Namespace, StorageFactory, Target


async def _nothing() -> None:
    """What a read or write does with the noop lifecycle."""


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# Durable namespaces keep one hash per id, so that nothing (eviction included) can separate a value from its
# version: {v: <value>, n: <version>} for a value, {n: <version>} for a tombstone, {n: <version>, u: 1} for a
# tombstone whose version is not known (a write whose outcome is unknown: no put-back until it expires).
# Every write is one script, atomic against the others whichever process or connection runs them. A record is
# changed in place, never deleted and written again: a value's script writes first (a server out of memory
# refuses it whole, as it refuses a SET), and a key that vanished halfway would be refused in a slot being
# migrated ("non local key": the command was routed while it existed).
# - _SET writes a value when its version is newer than the value held and not older than a tombstone
#   (mode w: a write-through; p: a put-back, also refused under an unknown tombstone; r: a put-back that
#   replaces a corrupt value of its own version; f: no version, written whatever is there, as version 0);
# - _TOMBSTONE replaces an older value or tombstone with a tombstone for DELETED_HOLD seconds.
# Anything else under the key (a string, as the previous release wrote) counts as absent, version 0. Versions
# are compared as decimal text (exact beyond Lua's 2^53), by length first. Ids never contain NUL or braces
# that matter: on a cluster every key of one script shares the id's slot (see Namespace).
# Every delete and every durable write is preceded, in the same batch, by a DEL of the key's sidecar (its
# get_or_compute lease and meta: ondemand.plugins.redis_leases), so that a load that began before it is not
# installed (a cache-only write needs none: the install sees that the value changed). A command of its own: a
# multi-key command meets TRYAGAIN in a slot being migrated.
DELETED_HOLD = 30.0  # seconds a tombstone is kept: far longer than a put-back may be late (the dispatcher's bound)
_OLDER = """
local function older(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
"""
_SET = _OLDER + """
local key, version, mode = KEYS[1], ARGV[2], ARGV[4]
local kind = redis.call('TYPE', key).ok
if kind == 'hash' and mode ~= 'f' then
  local held = redis.call('HMGET', key, 'n', 'v', 'u')
  local n = held[1] or '0'
  if held[2] then
    if not older(n, version) and not (mode == 'r' and n == version) then return 0 end
  elseif older(version, n) or (held[3] and mode ~= 'w') then
    return 0
  end
elseif kind ~= 'none' and kind ~= 'hash' then
  redis.call('DEL', key)
end
redis.call('HSET', key, 'v', ARGV[1], 'n', version)
if kind == 'hash' then redis.call('HDEL', key, 'u') end
if ARGV[3] ~= '0' then redis.call('PEXPIRE', key, ARGV[3]) elseif kind == 'hash' then redis.call('PERSIST', key) end
return 1
"""
_TOMBSTONE = _OLDER + """
local removed = 0
for i, key in ipairs(KEYS) do
  local version, n, had = ARGV[i + 1], '0', false
  local kind = redis.call('TYPE', key).ok
  if kind == 'hash' then
    local held = redis.call('HMGET', key, 'n', 'v')
    n, had = held[1] or '0', held[2] ~= false
  end
  if version == '' or older(n, version) then
    if kind == 'hash' then
      if had then removed = removed + 1; redis.call('HDEL', key, 'v') end
    elseif kind ~= 'none' then
      redis.call('DEL', key)
    end
    if version == '' then redis.call('HSET', key, 'n', n, 'u', '1')
    else redis.call('HSET', key, 'n', version); redis.call('HDEL', key, 'u') end
    redis.call('PEXPIRE', key, ARGV[1])
  end
end
return removed
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


class _Script:
    """A Lua script, sent by its SHA1 (EVALSHA) and by its body only when the server lacks it (NOSCRIPT)."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def as_eval(self, command: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVAL", self.body, *command[2:])


SET, TOMBSTONE, APPEND = _Script(_SET), _Script(_TOMBSTONE), _Script(_APPEND)
_SCRIPTS = {script.sha: script for script in (SET, TOMBSTONE, APPEND)}


def _as_eval(command: Sequence[Any]) -> Sequence[Any]:
    """EVALSHA of one of ours as EVAL (the server lost its scripts: a restart, a failover); others unchanged."""
    if command[0] == "EVALSHA":
        return _SCRIPTS[command[1]].as_eval(command)
    return command


def _milliseconds(ttl: float) -> int:
    """A ttl in whole milliseconds, at least 1 (PX 0 is an error, and 0 means no expiry to our scripts)."""
    return max(1, int(ttl * 1000))


def _set_command(ns: Namespace, key: str, value: bytes, ttl: float | None, version: int | None,
                 mode: str = "w") -> tuple[Any, ...]:
    if ns.durable:
        px = 0 if ttl is None else _milliseconds(ttl)
        return SET.command((key,), (value, 0, px, "f") if version is None else (value, version, px, mode))
    if ttl is None:
        return ("SET", key, value)
    return ("SET", key, value, "PX", _milliseconds(ttl))


@attrs.define
class RedisStorage:
    on_demand: OnDemandRedis
    name: str = "redis"
    leases: RedisLeases = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.leases = RedisLeases(self.on_demand, self._eval, _Script)
        _SCRIPTS.update((script.sha, script) for script in self.leases.scripts)

    async def open(self) -> None:
        """Nothing to prepare: the server starts on the first operation."""

    async def close(self) -> None:
        """The runtime closes on_demand itself, after every storage; the leases' subscription is ours."""
        await self.leases.close()

    async def ping(self) -> None:
        if not self.on_demand.disabled:
            await self.on_demand.execute("PING")

    async def _eval(self, command: tuple[Any, ...], connection_id: str, near_key: str | None = None) -> Any:
        """One script by its SHA1; by its body if the server does not have it (yet, or any more). `near_key`: a
        near-cached durable record's key, read back (tracked) right behind the script."""
        def run(script: Sequence[Any]) -> Awaitable[Any]:
            if near_key is None:
                return self.on_demand.execute(*script, connection_id=connection_id)
            return self.on_demand.write_tracked(near_key, script, ("HMGET", near_key, "v", "n"), True,
                                                connection_id=connection_id)
        try:
            return await run(command)
        except RedisCommandError as exc:
            if exc.kind != "noscript":
                raise
        return await run(_as_eval(command))

    async def _grouped(self, by_pool: dict[str, list[tuple[Any, ...]]]) -> list[Any]:
        """Each pool's commands in one batch (see OnDemandRedis.execute_grouped), again with the scripts' bodies
        if the server lacked them (every command is one that can be repeated: versioned, or last-write-wins)."""
        try:
            return await self.on_demand.execute_grouped(by_pool)
        except RedisCommandError as exc:
            if exc.kind != "noscript":
                raise
        return await self.on_demand.execute_grouped({pool: [_as_eval(c) for c in commands]
                                                     for pool, commands in by_pool.items()})

    # get and set return on_demand's awaitable instead of awaiting it in a frame of their own: one coroutine
    # less per operation on the hot path (callers await them all the same).
    def get(self, ns: Namespace, item_id: str) -> Awaitable[bytes | None]:
        if self.on_demand.disabled:
            return _nothing()
        if ns.near_cache:  # kept by the connection that answers, with the record's version (ondemand.redis.tracking)
            key = ns.key_prefix + item_id + ns.key_suffix
            return self.on_demand.read_tracked(key, ("HMGET", key, "v", "n") if ns.durable else ("GET", key),
                                               ns.durable, connection_id=ns.connection_id)
        if ns.durable:  # the value field of the id's record (a tombstone has none: a miss)
            return self.on_demand.execute("HGET", ns.key_prefix + item_id + ns.key_suffix, "v",
                                          connection_id=ns.connection_id)
        return self.on_demand.execute("GET", ns.key_prefix + item_id + ns.key_suffix, connection_id=ns.connection_id)

    async def get_many(self, ns: Namespace, ids: Sequence[str]) -> list[bytes | None]:
        if self.on_demand.disabled or not ids:
            return [None] * len(ids)
        keys = [ns.key_prefix + i + ns.key_suffix for i in ids]
        if ns.near_cache:  # one tracked read per key, all in one batch
            replies = await asyncio.gather(*(self.get(ns, item_id) for item_id in ids), return_exceptions=True)
        elif not ns.durable:
            return await self.on_demand.execute("MGET", *keys, connection_id=ns.connection_id)
        else:
            replies = await asyncio.gather(*(self.on_demand.execute("HGET", key, "v", connection_id=ns.connection_id)
                                             for key in keys), return_exceptions=True)
        for reply in replies:  # a value of another type (the previous release's string) is a miss, put back anew
            if isinstance(reply, BaseException) and not (isinstance(reply, RedisCommandError)
                                                         and reply.kind == "wrongtype"):
                raise reply
        return [None if isinstance(reply, BaseException) else reply for reply in replies]

    def set(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None,
            version: int | None = None) -> Awaitable[Any]:
        """See CacheStorage.set: a plain SET in a cache-only namespace, the versioned script in a durable one."""
        if self.on_demand.disabled:
            return _nothing()
        key = ns.key_prefix + item_id + ns.key_suffix
        if ns.durable:  # the sidecar's DEL first: a load that began before this write is not installed
            command = _set_command(ns, key, value, ttl, version)
            if ns.near_cache:
                return self._revoking(ns, key, lambda: self._eval(command, ns.connection_id, key))
            if self.on_demand.cluster:  # a cluster's commands are routed coroutines: one batch instead
                return self._grouped({ns.connection_id: [("DEL", sidecar(key)), command]})
            return self._revoking(ns, key, lambda: self._eval(command, ns.connection_id))
        if ns.near_cache:  # read back right behind the write: our next read of it is a hit (ondemand.redis.tracking)
            return self.on_demand.write_tracked(key, _set_command(ns, key, value, ttl, None), ("GET", key), False,
                                                connection_id=ns.connection_id)
        return self.on_demand.execute(*_set_command(ns, key, value, ttl, None), connection_id=ns.connection_id)

    def _revoking(self, ns: Namespace, key: str, write: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        """The sidecar's DEL, then `write` queued right behind it on the same connection (one round trip, no
        frame of ours); with no connection open yet (or a cluster's routed command), the DEL's reply first."""
        revoke = self.on_demand.execute("DEL", sidecar(key), connection_id=ns.connection_id)
        if isinstance(revoke, asyncio.Future):
            revoke.add_done_callback(_retrieved)  # its failure is the write's too (the same connection)
            return write()
        return self._in_turn(revoke, write)

    @staticmethod
    async def _in_turn(revoke: Awaitable[Any], write: Callable[[], Awaitable[Any]]) -> Any:
        await revoke
        return await write()

    async def set_many(self, entries: Sequence[Entry]) -> Any:
        if self.on_demand.disabled or not entries:
            return None
        by_pool: dict[str, list[tuple[Any, ...]]] = {}
        for e in entries:
            key = e.namespace.key(e.id)
            commands = by_pool.setdefault(e.namespace.connection_id, [])
            if e.namespace.durable:
                commands.append(("DEL", sidecar(key)))
            commands.append(_set_command(e.namespace, key, e.value, e.ttl, e.version))
        return await self._grouped(by_pool)

    async def put_back(self, ns: Namespace, item_id: str, value: bytes, ttl: float | None, version: int, *,
                       repair: bool = False) -> bool:
        """See CacheStorage.put_back: the versioned script, refused under any tombstone of an unknown version."""
        if self.on_demand.disabled:
            return False
        command = _set_command(ns, ns.key(item_id), value, ttl, version, "r" if repair else "p")
        return bool(await self._eval(command, ns.connection_id))

    async def invalidate(self, targets: Sequence[Target]) -> None:
        """See CacheStorage.invalidate: DEL in cache-only namespaces, versioned tombstones in durable ones (one
        script per id on a cluster, where each id's record lives in its own slot)."""
        if self.on_demand.disabled or not targets:
            return
        await self._grouped(self._invalidations(targets))

    def _invalidations(self, targets: Sequence[Target]) -> dict[str, list[tuple[Any, ...]]]:
        by_pool: dict[str, list[tuple[Any, ...]]] = {}
        batched: dict[str, tuple[list[str], list[Any]]] = {}  # one script for every key, on one server
        hold = _milliseconds(DELETED_HOLD)
        for ns, item_id, version in targets:
            key = ns.key(item_id)
            commands = by_pool.setdefault(ns.connection_id, [])
            commands.append(("DEL", sidecar(key)))
            if not ns.durable:
                commands.append(("DEL", key))
            elif ns.key_suffix:
                commands.append(TOMBSTONE.command((key,), (hold, "" if version is None else version)))
            else:
                keys, versions = batched.setdefault(ns.connection_id, ([], []))
                keys.append(key)
                versions.append("" if version is None else version)
        for pool, (keys, versions) in batched.items():
            by_pool[pool].append(TOMBSTONE.command(keys, (hold, *versions)))
        return by_pool

    async def delete(self, ns: Namespace, ids: Sequence[str]) -> int:
        """DEL; in a durable namespace a tombstone of an unknown version per id (no put-back for DELETED_HOLD
        seconds, even of an id the cache did not hold); returns how many values existed."""
        if self.on_demand.disabled or not ids:
            return 0
        if not ns.durable:
            keys = [ns.key_prefix + i + ns.key_suffix for i in ids]
            revoked = [sidecar(key) for key in keys]  # first: a load installs nothing after it
            return (await self.on_demand.execute_grouped({ns.connection_id: [("DEL", *revoked), ("DEL", *keys)]}))[1]
        replies = await self._grouped(self._invalidations([Target(ns, i) for i in dict.fromkeys(ids)]))
        return sum(replies)

    async def delete_keys(self, keys: Sequence[str]) -> int:
        """DEL of full keys, unconditionally (a server out of memory still serves it)."""
        if self.on_demand.disabled or not keys:
            return 0
        revoked = [sidecar(key) for key in keys]
        return (await self.on_demand.execute_grouped({"default": [("DEL", *revoked), ("DEL", *keys)]}))[1]

    async def delete_prefix(self, prefix: str, *, batch: int = 1000) -> int:
        """SCAN and UNLINK every key under `prefix`, master by master (on a cluster UNLINK goes slot by slot to
        the master SCAN found the keys on); the bounded fallback when too many keys went stale."""
        if self.on_demand.disabled:
            return 0
        removed = 0
        pattern = scan_pattern(prefix)
        for scan in await self.on_demand.per_master():  # one server, or every master of a cluster
            cursor = b"0"
            while True:
                cursor, keys = await scan("SCAN", cursor, "MATCH", pattern, "COUNT", batch)
                if keys:
                    removed += await unlink(scan, keys, cluster=self.on_demand.cluster)
                if cursor in (b"0", 0):
                    break
        return removed

    async def expire(self, ns: Namespace, item_id: str, ttl: float) -> bool:
        if self.on_demand.disabled:
            return False
        reply = await self.on_demand.execute("PEXPIRE", ns.key_prefix + item_id + ns.key_suffix, _milliseconds(ttl),
                                             connection_id=ns.connection_id)
        return bool(reply)

    async def append_list(self, ns: Namespace, item_id: str, items: bytes, count: int, ttl: float | None,
                          max_items: int) -> int:
        """See CacheStorage.append_list: one script, so concurrent appends from anywhere all land."""
        if self.on_demand.disabled:
            return count
        px = 0 if ttl is None else _milliseconds(ttl)
        try:
            return await self._eval(APPEND.command((ns.key(item_id),), (items, count, px, max_items)),
                                    ns.connection_id)
        except RedisCommandError as exc:
            reason = str(exc).removeprefix("ERR ")  # Redis 7 and Valkey prefix a script's own error with ERR
            if reason.startswith("NOTLIST"):
                raise ns.not_a_list(item_id) from None
            if reason.startswith("TOOLONG"):
                raise ns.list_too_long(item_id, int(reason.split()[1]), max_items) from None
            raise

    def status(self) -> dict[str, Any]:
        return {"backend": "redis", "state": self.on_demand.state}


@hookimpl
def ondemand_register_storages(registry: Registry[StorageFactory]) -> None:
    registry.add("redis", lambda context: RedisStorage(context.redis))
