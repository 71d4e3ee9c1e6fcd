"""What runs once per host for N workers: the HostService protocol (`ondemand_host_services`).

A durable plugin whose server serves one data directory (the embedded PostgreSQL) cannot let every
worker start its own. The supervisor of `run.py --workers N` asks every plugin for such services,
starts them before the workers, hands the workers the config overrides each returns (where the
server listens), and stops them after the last worker is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class HostService(Protocol):
    name: str

    async def start(self) -> Mapping[str, Any]:
        """Start it, bounded in time; returns config overrides for the workers, as TOML-shaped tables
        (`{"postgres": {"dsn": "host=/tmp/... dbname=postgres"}}`)."""

    async def stop(self) -> None:
        """Stop it, bounded in time."""
