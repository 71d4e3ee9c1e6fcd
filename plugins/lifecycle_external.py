"""The `external` lifecycle: a Redis managed by someone else (Docker Compose), reached by URL.

No process management: `start` checks that the server answers PING within `redis.connect_timeout`
and `stop` does nothing. The URL is `lifecycle.redis_url`, which `REDIS_URL` overrides.
"""

from __future__ import annotations

import asyncio
from typing import Any

import attrs

from app.config import SECRET, Config
from app.errors import ConfigError, RedisTimeout, RedisUnavailable, SpawnError
from app.hookspecs import hookimpl
from app.lifecycle import RedisEndpoint, WithoutProcess, probe


@attrs.frozen
class ExternalConfig:
    """This plugin's key of [lifecycle]; `REDIS_URL` sets it too."""

    redis_url: str | None = attrs.field(default=None, metadata={SECRET: "url"})


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
        urls = [part.strip() for part in url.split(",") if part.strip()] if cluster else [url]
        self.endpoints = [attrs.evolve(RedisEndpoint.from_url(u), cluster=cluster) for u in urls]
        self.endpoint = self.endpoints[0]

    def status(self) -> dict[str, Any]:
        return {"url": self.endpoint.describe(), "seeds": [e.describe() for e in self.endpoints]}

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
            raise RedisTimeout(f"external Redis at {endpoint.describe()} did not answer within "
                               f"{timeout:g} s") from None
        except (OSError, EOFError, SpawnError) as exc:
            raise RedisUnavailable(f"external Redis at {endpoint.describe()} is unreachable: {exc}") from None
        if not ready:
            raise RedisUnavailable(f"external Redis at {endpoint.describe()} is not ready (PING failed)")


@hookimpl
def ondemand_config_sections(sections: Any) -> None:
    sections.add("lifecycle", ExternalConfig, env={"REDIS_URL": "redis_url"})


@hookimpl
def ondemand_register_lifecycles(registry: Any) -> None:
    registry.add("external", lambda context: ExternalLifecycle(context.config))
