"""The `postgres` storage plugin: PostgreSQL as the durable store (storage.py), with an embedded server
started on demand from the `pgserver` wheel (server.py). This module is the plugin: its [postgres] table
(`DATABASE_URL` sets `postgres.dsn`) and its factory."""

from __future__ import annotations

from ondemand.config import SectionRegistry
from ondemand.hookspecs import hookimpl
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres
from ondemand.plugins.storage_postgres.storage import SCHEMA_VERSION, PostgresConfig, PostgresStorage
from ondemand.registry import Registry
from ondemand.store.protocols import StorageFactory

__all__ = ["SCHEMA_VERSION", "EmbeddedPostgres", "PostgresConfig", "PostgresStorage"]


@hookimpl
def ondemand_config_sections(sections: SectionRegistry) -> None:
    sections.add("postgres", PostgresConfig, env={"DATABASE_URL": "dsn"})


@hookimpl
def ondemand_register_storages(registry: Registry[StorageFactory]) -> None:
    registry.add("postgres", lambda context: PostgresStorage(context.config.section(PostgresConfig),
                                                             health=context.health))


