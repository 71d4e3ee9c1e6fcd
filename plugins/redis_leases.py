"""The redis storage's leases for `get_or_compute` (the `Leases` protocol of ondemand.store.aside).

Beside a value's key, in its slot, lives its sidecar (`<key>\\0a`: an id never holds a control character, so
no id's key is a sidecar), a hash: `l` the lease ("<token> <deadline ms>", server time), `f` the value as the
lease found it (absent, or its SHA-1), and `m` the meta ("<expiry ms> <load ms> <CRC-32 of the value>"), as
long-lived as the value. A delete, and a write in a durable namespace, delete the sidecar first (the lease is
revoked); a cache-only write is a plain SET, seen by the install, which is one script: it writes the value and
its meta only if the lease is still its own and the value is still as the lease found it, and PUBLISHes the key
on the runtime's channel either way. Each process subscribes once, on a connection of its own, and wakes the
callers waiting for that key.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ondemand.redis.resp import RespConnection
from ondemand.redis.server import OnDemandRedis
from ondemand.store.aside import ACQUIRED, PRESENT
from ondemand.store.protocols import Namespace
from ondemand.tasks import stop_tasks

log = logging.getLogger("ondemand.aside")


def sidecar(key: str) -> str:
    """The lease and meta hash of a value's key (in its slot: it shares its hash tag)."""
    return key + "\0a"


_MINE = """
local function state()
  local kind = redis.call('TYPE', KEYS[1]).ok
  if kind == 'string' then return redis.sha1hex(redis.call('GET', KEYS[1])) end
  if kind == 'none' then return '' end
  return kind
end
local function mine(token)
  local held = redis.call('HGET', KEYS[2], 'l')
  return held and string.sub(held, 1, #token + 1) == token .. ' '
end
local function keep(px)
  if px == '0' then redis.call('PERSIST', KEYS[2]) else redis.call('PEXPIRE', KEYS[2], px) end
end
"""
# KEYS: value, sidecar. ARGV: token, lease ms, seen meta ('' on a miss). `f`: the value as the lease found it.
_ACQUIRE = _MINE + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '' then
  local kind = redis.call('TYPE', KEYS[1]).ok
  if kind == 'string' or (kind == 'hash' and redis.call('HEXISTS', KEYS[1], 'v') == 1) then return -2 end
elseif (redis.call('HGET', KEYS[2], 'm') or '') ~= ARGV[3] then
  return -2
end
local held = redis.call('HGET', KEYS[2], 'l')
if held then
  local deadline = tonumber(string.match(held, ' (%d+)$'))
  if deadline > now then return deadline - now end
end
local pttl = redis.call('PTTL', KEYS[2])
redis.call('HSET', KEYS[2], 'l', ARGV[1] .. ' ' .. (now + tonumber(ARGV[2])), 'f', state())
if pttl == -2 or (pttl >= 0 and pttl < tonumber(ARGV[2])) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return -1
"""
# KEYS: value, sidecar. ARGV: token, value, px (0: none), meta, channel.
_INSTALL = _MINE + """
if not mine(ARGV[1]) or redis.call('HGET', KEYS[2], 'f') ~= state() then
  if mine(ARGV[1]) then redis.call('HDEL', KEYS[2], 'l', 'f') end
  redis.call('PUBLISH', ARGV[5], KEYS[1])  -- revoked, or written since: the waiters read what is there
  return 0
end
if ARGV[3] == '0' then redis.call('SET', KEYS[1], ARGV[2]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
redis.call('HDEL', KEYS[2], 'l', 'f')
redis.call('HSET', KEYS[2], 'm', ARGV[4])
keep(ARGV[3])
redis.call('PUBLISH', ARGV[5], KEYS[1])
return 1
"""
# KEYS: value, sidecar. ARGV: meta, px (0: none), channel. After a durable value's versioned write.
_FINISH = _MINE + """
if redis.call('TYPE', KEYS[1]).ok == 'hash' and redis.call('HEXISTS', KEYS[1], 'v') == 1 then
  redis.call('HSET', KEYS[2], 'm', ARGV[1])
  keep(ARGV[2])
end
redis.call('PUBLISH', ARGV[3], KEYS[1])
return 1
"""
# KEYS: value, sidecar. ARGV: token, channel.
_RELEASE = _MINE + """
if mine(ARGV[1]) then
  redis.call('HDEL', KEYS[2], 'l', 'f')
  redis.call('PUBLISH', ARGV[2], KEYS[1])
end
return 1
"""


def _px(ttl: float | None) -> int:
    return 0 if ttl is None else max(1, int(ttl * 1000))


class RedisLeases:
    """Leases, installs and notifications on the on-demand Redis (one per RedisStorage)."""

    def __init__(self, on_demand: OnDemandRedis, run_script: Any, script: Any) -> None:
        """`run_script(command, connection_id)` runs a `script(body)`'s command (the storage's, which also
        sends the body when the server lacks the script)."""
        self.on_demand = on_demand
        self._run = run_script
        self.acquire_script, self.install_script = script(_ACQUIRE), script(_INSTALL)
        self.finish_script, self.release_script = script(_FINISH), script(_RELEASE)
        self.channel = f"{on_demand.config.redis.key_prefix}:aside"
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[bool] | None = None
        self._retry_at = 0.0  # (loop time) no new subscription before this, after one that failed
        self.notifications = 0

    @property
    def scripts(self) -> tuple[Any, ...]:
        return self.acquire_script, self.install_script, self.finish_script, self.release_script

    async def read(self, ns: Namespace, item_id: str) -> tuple[bytes | None, bytes | None]:
        if self.on_demand.disabled:
            return None, None
        key = ns.key(item_id)
        read = ("HGET", key, "v") if ns.durable else ("GET", key)
        value, meta = await self.on_demand.execute_grouped({ns.connection_id: [read, ("HGET", sidecar(key), "m")]})
        return value, meta

    async def acquire(self, ns: Namespace, item_id: str, token: str, lease_ttl: float, seen: bytes | None) -> float:
        if self.on_demand.disabled:
            return ACQUIRED
        key = ns.key(item_id)
        command = self.acquire_script.command((key, sidecar(key)), (token, _px(lease_ttl), seen or ""))
        reply = await self._run(command, ns.connection_id)
        if reply == -1:
            return ACQUIRED
        if reply == -2:
            return PRESENT
        return max(0.0, reply / 1000)

    async def install(self, ns: Namespace, item_id: str, token: str, value: bytes, ttl: float | None,
                      meta: bytes) -> bool:
        if self.on_demand.disabled:
            return True  # nothing to install into
        key = ns.key(item_id)
        command = self.install_script.command((key, sidecar(key)), (token, value, _px(ttl), meta, self.channel))
        return bool(await self._run(command, ns.connection_id))

    async def held(self, ns: Namespace, item_id: str, token: str) -> bool:
        if self.on_demand.disabled:
            return True
        held = await self.on_demand.execute("HGET", sidecar(ns.key(item_id)), "l", connection_id=ns.connection_id)
        return held is not None and held.startswith(token.encode() + b" ")

    async def finish(self, ns: Namespace, item_id: str, meta: bytes, ttl: float | None) -> None:
        if self.on_demand.disabled:
            return
        key = ns.key(item_id)
        await self._run(self.finish_script.command((key, sidecar(key)), (meta, _px(ttl), self.channel)),
                        ns.connection_id)

    async def release(self, ns: Namespace, item_id: str, token: str) -> None:
        if self.on_demand.disabled:
            return
        key = ns.key(item_id)
        await self._run(self.release_script.command((key, sidecar(key)), (token, self.channel)), ns.connection_id)

    # -- notifications ----------------------------------------------------------------------------

    def arrival(self, ns: Namespace, item_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ns.key(item_id), set()).add(future)
        return future

    def forget(self, ns: Namespace, item_id: str, arrival: asyncio.Future[None]) -> None:
        key = ns.key(item_id)
        waiting = self._waiters.get(key)
        if waiting is not None:
            waiting.discard(arrival)
            if not waiting:
                del self._waiters[key]

    async def listen(self, timeout: float) -> bool:
        if self.on_demand.disabled:
            return False
        loop = asyncio.get_running_loop()
        if self._listener is None or self._listener.done():
            if loop.time() < self._retry_at:  # a subscription that failed is not tried again at every miss
                return False
            self._retry_at = loop.time() + 5.0
            self._subscribed = loop.create_future()
            self._listener = loop.create_task(self._listen(self._subscribed))
        assert self._subscribed is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._subscribed), timeout)
        except TimeoutError:
            return False

    async def _listen(self, subscribed: asyncio.Future[bool]) -> None:
        """One subscription per process; ends when its connection does (the next wait starts another)."""
        conn: RespConnection | None = None
        try:
            config = self.on_demand.config.redis
            async with asyncio.timeout(config.connect_timeout + config.op_timeout):
                endpoint = await self.on_demand.ensure()
                conn = await RespConnection.open(endpoint, what="the aside notifications' subscription")
                await conn.call("SUBSCRIBE", self.channel)  # (an error reply, NOPERM say, is raised)
            subscribed.set_result(True)
            self._retry_at = 0.0
            while True:
                message = await conn.reply()
                if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                    self.notifications += 1
                    for future in self._waiters.pop(message[2].decode(errors="replace"), ()):
                        if not future.done():
                            future.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the waiters fall back to their bounds
            log.info("the aside notifications' subscription ended: %s", exc)
        finally:
            if not subscribed.done():
                subscribed.set_result(False)
            if conn is not None:
                conn.close()

    async def close(self) -> None:
        if self._listener is not None:
            await stop_tasks(self._listener, timeout=2.0)
            self._listener = None
