"""The `external` lifecycle: a Redis managed by someone else (Docker Compose), reached by URL.

No process management: `start` checks that the server answers PING within `redis.connect_timeout`
and `stop` does nothing. The URL is `lifecycle.redis_url`, which `REDIS_URL` overrides.

With `lifecycle.topology = "sentinel"` there is no URL: the master of `lifecycle.sentinel_master` is
discovered from `lifecycle.sentinels` (SentinelLifecycle below) and followed through failovers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import hiredis

from ondemand.config import SECRET, Config, FieldError, SectionRegistry
from ondemand.errors import ConfigError, RedisTimeout, RedisUnavailable, SpawnError
from ondemand.hookspecs import hookimpl
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.lifecycle import LifecycleContext, LifecycleFactory, WithoutProcess
from ondemand.redis.resp import RespConnection, probe, tls_hint
from ondemand.redis.tls import TlsFailure, TlsOptions, warn_unverified
from ondemand.registry import Registry
from ondemand.tasks import stop_tasks

log = logging.getLogger("ondemand.redis")


def parse_address(text: str) -> tuple[str, int]:
    """"host:port" (an IPv6 host in brackets: "[::1]:26379") as (host, port); ValueError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected \"host:port\", got {text!r}")
    return host, int(port)


def _optional_name(_inst: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not (value and value.isprintable() and not value.isspace() and " " not in value):
        raise FieldError(attribute.name, "expected a non-empty name without spaces or control characters")


def _optional_path(_inst: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and (not value or "\x00" in value):
        raise FieldError(attribute.name, "expected a file path")


def _addresses(_inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for text in value:
        try:
            parse_address(text)
        except ValueError as exc:
            raise FieldError(attribute.name, str(exc)) from None


@attrs.frozen
class ExternalConfig:
    """This plugin's keys of [lifecycle]; `REDIS_URL` sets `redis_url` and `REDIS_PASSWORD` `redis_password`."""

    redis_url: str | None = attrs.field(default=None, metadata={SECRET: "url"})
    # lifecycle.topology = "sentinel": where the sentinels listen, the master's name they monitor, and the
    # passwords of the sentinels and of the data nodes (master and replicas share one, as Sentinel requires).
    sentinels: tuple[str, ...] = attrs.field(default=(), validator=_addresses)
    sentinel_master: str | None = None
    sentinel_password: str | None = attrs.field(default=None, metadata={SECRET: "token"})
    # The data nodes' credentials when the URL has none (and with Sentinel, which has no URL); the ACL user.
    redis_password: str | None = attrs.field(default=None, metadata={SECRET: "token"})
    redis_username: str | None = attrs.field(default=None, validator=_optional_name)
    sentinel_username: str | None = attrs.field(default=None, validator=_optional_name)
    # TLS to the data nodes (a rediss:// URL turns it on too; its ssl_* query parameters are the same settings).
    redis_tls: bool = False
    redis_tls_ca_file: str | None = attrs.field(default=None, validator=_optional_path)
    redis_tls_cert_file: str | None = attrs.field(default=None, validator=_optional_path)
    redis_tls_key_file: str | None = attrs.field(default=None, validator=_optional_path)
    redis_tls_server_name: str | None = attrs.field(default=None, validator=_optional_name)
    redis_tls_verify: bool = True
    redis_tls_check_hostname: bool = True
    # TLS to the sentinels: the same CA, client certificate and verification; None: as the data nodes.
    sentinel_tls: bool | None = None
    sentinel_tls_server_name: str | None = attrs.field(default=None, validator=_optional_name)

    def tls_options(self) -> TlsOptions:
        """The data nodes' TLS settings given as keys (each away from its default, with its key)."""
        given = {name: (value, f"lifecycle.{key}") for name, key, value, default in (
            ("ca_file", "redis_tls_ca_file", self.redis_tls_ca_file, None),
            ("cert_file", "redis_tls_cert_file", self.redis_tls_cert_file, None),
            ("key_file", "redis_tls_key_file", self.redis_tls_key_file, None),
            ("server_name", "redis_tls_server_name", self.redis_tls_server_name, None),
            ("verify", "redis_tls_verify", self.redis_tls_verify, True),
            ("check_hostname", "redis_tls_check_hostname", self.redis_tls_check_hostname, True),
        ) if value != default}
        return TlsOptions(self.redis_tls, given)

    def sentinel_tls_options(self) -> TlsOptions:
        """The sentinels' TLS settings: on as `sentinel_tls` says (unset: as the data nodes), with the data
        nodes' CA, client certificate and verification, and a server name of their own."""
        enabled = self.redis_tls if self.sentinel_tls is None else self.sentinel_tls
        given = {name: value for name, value in self.tls_options().given.items() if name != "server_name"} \
            if enabled else {}
        if self.sentinel_tls_server_name is not None:
            given["server_name"] = (self.sentinel_tls_server_name, "lifecycle.sentinel_tls_server_name")
        return TlsOptions(enabled, given)


def _with_credentials(endpoint: RedisEndpoint, section: ExternalConfig) -> RedisEndpoint:
    """`endpoint` (from a URL) with the user and password the keys give when the URL has none; given in
    both places differently is a ConfigError (which would win is not obvious)."""
    found = {"password": endpoint.password, "username": endpoint.username}
    for name, key, value in (("password", "redis_password", section.redis_password),
                             ("username", "redis_username", section.redis_username)):
        if value is None:
            continue
        if found[name] is not None and found[name] != value:
            raise ConfigError(f"the Redis {'user name' if name == 'username' else name} is given twice, differently: "
                              f"in lifecycle.redis_url and in lifecycle.{key}; give it in one place",
                              key=f"lifecycle.{key}")
        found[name] = value
    if found["username"] is not None and found["password"] is None:
        raise ConfigError("an ACL user name without a password: AUTH needs both (give the password in the URL, "
                          "lifecycle.redis_password or REDIS_PASSWORD(_FILE))", key="lifecycle.redis_username")
    return attrs.evolve(endpoint, **found)


def _warn_unverified(endpoint: RedisEndpoint, what: str = "Redis") -> None:
    warning = warn_unverified(endpoint.tls)
    if warning is not None:
        log.warning("%s at %s: %s", what, endpoint.describe(), warning)


@attrs.define
class ExternalLifecycle(WithoutProcess):
    """A Redis reached by URL. With `lifecycle.topology = "cluster"` the URL names seed nodes (several,
    comma-separated, are tried in order); the cluster's other nodes are discovered from the first that
    answers (app/cluster.py)."""

    config: Config
    name: str = "external"
    provides_redis: bool = True
    endpoints: list[RedisEndpoint] = attrs.field(init=False)
    endpoint: RedisEndpoint = attrs.field(init=False)  # the one that answered last (the first, before)

    def __attrs_post_init__(self) -> None:
        url = self.config.section(ExternalConfig).redis_url
        if not url:
            raise ConfigError("the external lifecycle needs a Redis URL: set REDIS_URL or lifecycle.redis_url",
                              source=self.config.source, key="lifecycle.redis_url")
        cluster = self.config.lifecycle.topology == "cluster"
        section = self.config.section(ExternalConfig)
        urls = [part.strip() for part in url.split(",") if part.strip()] if cluster else [url]
        self.endpoints = [attrs.evolve(_with_credentials(RedisEndpoint.from_url(u, tls=section.tls_options()), section),
                                       cluster=cluster) for u in urls]
        self.endpoint = self.endpoints[0]
        _warn_unverified(self.endpoint)

    def status(self) -> dict[str, Any]:
        return {"url": self.endpoint.describe(), "seeds": [e.describe() for e in self.endpoints],
                "tls": self.endpoint.tls.status() if self.endpoint.tls else None}

    async def start(self) -> RedisEndpoint:
        errors: list[RedisUnavailable] = []
        for endpoint in self.endpoints:
            try:
                await self._check(endpoint)
            except RedisUnavailable as exc:
                errors.append(exc)
                continue
            self.endpoint = endpoint
            return endpoint
        if len(errors) == 1:
            raise errors[0]
        raise RedisUnavailable("no seed node answers: " + "; ".join(str(e) for e in errors))

    async def _check(self, endpoint: RedisEndpoint) -> None:
        timeout = self.config.redis.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                ready = await probe(endpoint, expected_pid=None)
        except TimeoutError:
            # (A Redis without TLS takes a ClientHello for the start of an inline command and waits for more.)
            hint = " (a server that speaks no TLS leaves the TLS handshake unanswered: is this its TLS port?)" \
                if endpoint.tls else ""
            raise RedisTimeout(f"external Redis at {endpoint.describe()} did not answer within "
                               f"{timeout:g} s{hint}") from None
        except TlsFailure as exc:
            raise RedisUnavailable(f"external Redis at {endpoint.describe()}: {exc.reason}") from None
        except (EOFError, ConnectionResetError) as exc:
            raise RedisUnavailable(f"external Redis at {endpoint.describe()} closed the connection before it "
                                   f"answered{tls_hint(endpoint)}") from exc
        except hiredis.ProtocolError:
            raise RedisUnavailable(f"external Redis at {endpoint.describe()} answered something that is not "
                                   f"RESP{tls_hint(endpoint, 'answers so')}") from None
        except (OSError, SpawnError) as exc:
            raise RedisUnavailable(f"external Redis at {endpoint.describe()} is unreachable: {exc}") from None
        if not ready:
            raise RedisUnavailable(f"external Redis at {endpoint.describe()} is not ready (PING failed)")


# -- Redis Sentinel ----------------------------------------------------------------------------------------


@attrs.define
class SentinelView:
    """One configured sentinel, as we last saw it (for status)."""

    host: str
    port: int
    state: str = "unknown"  # "up" (answered last time), "down" (did not), "unknown" (not asked yet)
    last_error: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def what(self) -> str:
        return f"sentinel {self.address}"


_WATCH_PING = 1.0  # seconds between PINGs on the subscription (a sentinel that stops answering is left)
_WATCH_BACKOFF = (0.1, 2.0)  # reconnect delay of the subscription after every sentinel failed: first, most


@attrs.define
class SentinelLifecycle(WithoutProcess):
    """The master of `lifecycle.sentinel_master` as the sentinels `lifecycle.sentinels` name it (README, "Redis
    Sentinel").

    - `start` asks the sentinels in turn (the one that answered last first, then the configured order) for
      the master's address, and takes it only once that server's own ROLE says "master": never a replica,
      never an address remembered from before. Every wait is bounded by `redis.connect_timeout`, and rounds
      are repeated only while `redis.op_timeout` lasts: with no master known the operation fails soon (the
      dispatcher serves durable namespaces from the durable store) and the next one looks again.
    - A failover is followed: a subscription to `+switch-master` on one sentinel at a time (PINGed, moved to
      the next sentinel when it stops answering, reconnects bounded by a backoff) and every connection the
      core reports lost (`connection_lost`: a lost connection, a timeout, a READONLY reply) end our use of
      the master (the exit callback with failure=False): the next operation discovers it again.
    """

    config: Config
    name: str = "external"
    provides_redis: bool = True
    sentinels: list[SentinelView] = attrs.field(init=False)
    master_name: str = attrs.field(init=False)
    master: tuple[str, int] | None = None  # the address in use, once ROLE confirmed it
    failovers: int = 0  # +switch-master messages seen for our master (or a change found on resubscribing)
    last_failover: dict[str, Any] | None = None
    discoveries: int = 0  # masters found by start()
    rediscoveries: int = 0  # ends of our use of a master (failover, lost connection, READONLY)
    subscribed: SentinelView | None = None
    _preferred: int = 0  # index of the sentinel that answered last
    _callback: Callable[[str, bool], None] | None = None
    _watcher: asyncio.Task[None] | None = None
    # What every connection to a data node and to a sentinel starts from (credentials, TLS), built once.
    _data_node: RedisEndpoint = attrs.field(init=False)
    _sentinel_node: RedisEndpoint = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        section = self.config.section(ExternalConfig)
        if not section.sentinels:
            raise ConfigError('lifecycle.topology = "sentinel" needs the sentinels\' addresses: set '
                              'lifecycle.sentinels (a list of "host:port")', source=self.config.source,
                              key="lifecycle.sentinels")
        if not section.sentinel_master:
            raise ConfigError('lifecycle.topology = "sentinel" needs the name the sentinels monitor the master '
                              "by: set lifecycle.sentinel_master", source=self.config.source,
                              key="lifecycle.sentinel_master")
        self.sentinels = [SentinelView(*parse_address(a)) for a in section.sentinels]
        self.master_name = section.sentinel_master
        if section.sentinel_username is not None and section.sentinel_password is None:
            raise ConfigError("an ACL user name for the sentinels without a password: AUTH needs both",
                              source=self.config.source, key="lifecycle.sentinel_username")
        self._data_node = _with_credentials(RedisEndpoint(tls=section.tls_options().build()), section)
        self._sentinel_node = RedisEndpoint(password=section.sentinel_password, username=section.sentinel_username,
                                            tls=section.sentinel_tls_options().build())
        _warn_unverified(self._data_node, "the Sentinel master")
        _warn_unverified(self._sentinel_node, "the sentinels")

    def set_exit_callback(self, callback: Callable[[str, bool], None]) -> None:
        self._callback = callback

    def forget_after_fork(self) -> None:
        self._watcher = None  # the parent's loop's task; a child subscribes on its own first start
        self.subscribed = None

    def status(self) -> dict[str, Any]:
        return {
            "url": self._endpoint(self.master).describe() if self.master else None,
            "tls": self._data_node.tls.status() if self._data_node.tls else None,
            "sentinel": {
                "master_name": self.master_name,
                "master": self._show(self.master),
                "sentinels": [{"address": s.address, "state": s.state, "last_error": s.last_error,
                               "subscribed": s is self.subscribed} for s in self.sentinels],
                "tls": self._sentinel_node.tls.status() if self._sentinel_node.tls else None,
                "failovers": self.failovers,
                "last_failover": self.last_failover,
                "discoveries": self.discoveries,
                "rediscoveries": self.rediscoveries,
            },
        }

    @staticmethod
    def _show(address: tuple[str, int] | None) -> str | None:
        return None if address is None else SentinelView(*address).address

    def _endpoint(self, address: tuple[str, int]) -> RedisEndpoint:
        return attrs.evolve(self._data_node, host=address[0], port=address[1])

    def _order(self) -> list[SentinelView]:
        first = self._preferred % len(self.sentinels)
        return self.sentinels[first:] + self.sentinels[:first]

    # -- discovery --------------------------------------------------------------------------------------

    async def start(self) -> RedisEndpoint:
        self._ensure_watcher()
        self.master = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.redis.op_timeout
        errors: dict[str, str] = {}
        while True:
            for sentinel in self._order():
                try:
                    address = await self._ask(sentinel)
                except RedisUnavailable as exc:
                    errors[sentinel.address] = str(exc)
                    continue
                if address is None:
                    errors[sentinel.address] = f"{sentinel.what()} knows no master named {self.master_name!r}"
                    continue
                problem = await self._not_master(address)
                if problem is not None:
                    errors[sentinel.address] = f"{sentinel.what()} names {self._show(address)}, but {problem}"
                    continue
                self._preferred = self.sentinels.index(sentinel)
                self.master = address
                self.discoveries += 1
                return self._endpoint(address)
            if loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        raise RedisUnavailable(f"no master of {self.master_name!r} found: " + "; ".join(errors.values()))

    async def _sentinel(self, sentinel: SentinelView) -> RespConnection:
        """An authenticated connection to `sentinel`; RedisUnavailable naming it when it cannot be had."""
        endpoint = attrs.evolve(self._sentinel_node, host=sentinel.host, port=sentinel.port)
        return await RespConnection.open(endpoint, what=sentinel.what())

    async def _ask(self, sentinel: SentinelView) -> tuple[str, int] | None:
        """The master's address as `sentinel` reports it (None when it knows no such master)."""
        timeout = self.config.redis.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                async with await self._sentinel(sentinel) as conn:
                    reply = await conn.call("SENTINEL", "get-master-addr-by-name", self.master_name)
        except TimeoutError:
            error: RedisUnavailable = RedisTimeout(f"{sentinel.what()} did not answer within {timeout:g} s")
        except RedisUnavailable as exc:
            error = exc
        except (OSError, EOFError) as exc:  # the connection ended mid-command (a TLS alert, a close)
            error = RedisUnavailable(f"{sentinel.what()}: {exc}")
        else:
            sentinel.state, sentinel.last_error = "up", None
            if not isinstance(reply, list) or len(reply) != 2:
                return None
            return reply[0].decode(), int(reply[1])
        sentinel.state, sentinel.last_error = "down", str(error)
        raise error

    async def _not_master(self, address: tuple[str, int]) -> str | None:
        """None when the server at `address` says it is a master; else why it cannot be used."""
        timeout = self.config.redis.connect_timeout
        where = f"Redis at {self._show(address)}"
        try:
            async with asyncio.timeout(timeout):
                async with await RespConnection.open(self._endpoint(address), what=where) as conn:
                    role = await conn.call("ROLE")
        except TimeoutError:
            return f"it did not answer ROLE within {timeout:g} s"
        except (RedisUnavailable, OSError, EOFError) as exc:
            return f"it cannot be used: {exc}"
        kind = role[0].decode() if isinstance(role, list) and role and isinstance(role[0], bytes) else "?"
        return None if kind == "master" else f"its ROLE is {kind!r}, not 'master'"

    # -- following a failover ---------------------------------------------------------------------------

    def connection_lost(self, reason: str) -> None:
        """The core lost a connection to the master (or it answered READONLY, or timed out): stop using it, so
        that the next operation discovers the master again."""
        self._rediscover(f"connection to the master {self._show(self.master)} failed ({reason}); "
                         "asking the sentinels again")

    def _rediscover(self, description: str) -> None:
        # The callback even when no master is recorded: a switch seen while a start was returning the old
        # one leaves the core running on it, and only this ends that (the core ignores it otherwise).
        if self.master is not None:
            self.master = None
            self.rediscoveries += 1
            log.info("sentinel: %s", description)
        if self._callback is not None:
            self._callback(description, False)

    def _switched(self, old: str, new: str, via: str) -> None:
        self.failovers += 1
        self.last_failover = {"from": old, "to": new, "at": time.time(), "seen_by": via}
        log.warning("sentinel: %s failed over from %s to %s (seen by %s)", self.master_name, old, new, via)
        self._rediscover(f"master {self.master_name!r} moved from {old} to {new}")

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        """Stop following: the subscription is closed (nothing of ours runs on the servers)."""
        watcher, self._watcher = self._watcher, None
        self.master = None
        await stop_tasks(watcher)

    async def _watch(self) -> None:
        delay = _WATCH_BACKOFF[0]
        while True:
            for sentinel in self._order():
                try:
                    await self._listen(sentinel)
                except asyncio.CancelledError:
                    raise
                except (RedisUnavailable, OSError, TimeoutError, EOFError, ValueError, IndexError) as exc:
                    sentinel.state = "down"
                    sentinel.last_error = f"subscription: {exc or type(exc).__name__}"
                    if self.subscribed is sentinel:
                        delay = _WATCH_BACKOFF[0]  # it worked for a while: the next sentinel at once
                finally:
                    self.subscribed = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _WATCH_BACKOFF[1])

    async def _listen(self, sentinel: SentinelView) -> None:
        """Subscribe to +switch-master on `sentinel` and follow it until the connection fails."""
        async with asyncio.timeout(self.config.redis.connect_timeout):
            conn = await self._sentinel(sentinel)
            try:
                conn.send("SUBSCRIBE", "+switch-master")
                if isinstance(reply := await conn.reply(), hiredis.ReplyError):
                    # (a sentinel ACL user without the channel: following failovers would silently stop)
                    raise RedisUnavailable(f"{sentinel.what()} refused SUBSCRIBE +switch-master: {reply}")
            except BaseException:
                conn.close()
                raise
        try:
            sentinel.state, sentinel.last_error = "up", None
            self.subscribed = sentinel
            # A switch while nobody listened (every sentinel down, or before this subscription): compare.
            if self.master is not None:
                now = await self._ask(sentinel)
                if now is not None and now != self.master:
                    self._switched(self._show(self.master) or "?", self._show(now) or "?", sentinel.address)
            pinged = False
            while True:
                try:
                    async with asyncio.timeout(_WATCH_PING):
                        message = await conn.reply()
                except TimeoutError:
                    if pinged:
                        raise TimeoutError(f"{sentinel.what()} did not answer PING within {_WATCH_PING:g} s") from None
                    conn.send("PING")
                    pinged = True
                    continue
                pinged = False
                if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                    fields = message[2].decode().split()
                    if len(fields) == 5 and fields[0] == self.master_name:
                        old = self._show((fields[1], int(fields[2])))
                        new = self._show((fields[3], int(fields[4])))
                        self._switched(old or "?", new or "?", sentinel.address)
        finally:
            conn.close()


@hookimpl
def ondemand_config_sections(sections: SectionRegistry) -> None:
    sections.add("lifecycle", ExternalConfig, env={"REDIS_URL": "redis_url", "REDIS_PASSWORD": "redis_password"})


def _external(context: LifecycleContext) -> ExternalLifecycle | SentinelLifecycle:
    if context.config.lifecycle.topology == "sentinel":
        return SentinelLifecycle(context.config)
    return ExternalLifecycle(context.config)


@hookimpl
def ondemand_register_lifecycles(registry: Registry[LifecycleFactory]) -> None:
    registry.add("external", _external)
