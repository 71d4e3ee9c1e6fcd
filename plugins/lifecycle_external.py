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
    config: Config
    name: str = "external"
    provides_redis: bool = True
    endpoint: RedisEndpoint = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        url = self.config.section(ExternalConfig).redis_url
        if not url:
            raise ConfigError("the external lifecycle needs a Redis URL: set REDIS_URL or lifecycle.redis_url",
                              source=self.config.source, key="lifecycle.redis_url")
        self.endpoint = RedisEndpoint.from_url(url)

    def status(self) -> dict[str, Any]:
        return {"url": self.endpoint.describe()}

    async def start(self) -> RedisEndpoint:
        timeout = self.config.redis.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                ready = await probe(self.endpoint, expected_pid=None)
        except TimeoutError:
            raise RedisTimeout(f"external Redis at {self.endpoint.describe()} did not answer within "
                               f"{timeout:g} s") from None
        except (OSError, EOFError, SpawnError) as exc:
            raise RedisUnavailable(f"external Redis at {self.endpoint.describe()} is unreachable: {exc}") from None
        if not ready:
            raise RedisUnavailable(f"external Redis at {self.endpoint.describe()} is not ready (PING failed)")
        return self.endpoint


@hookimpl
def ondemand_config_sections(sections: Any) -> None:
    sections.add("lifecycle", ExternalConfig, env={"REDIS_URL": "redis_url"})


@hookimpl
def ondemand_register_lifecycles(registry: Any) -> None:
    registry.add("external", lambda context: ExternalLifecycle(context.config))
