"""What runs once per host for N workers: the HostService protocol (`ondemand_host_services`).

Something the workers of one run must share and cannot arrange among themselves (the subprocess
lifecycle's private runtime directory, when `lifecycle.runtime_dir = "private"`: one directory for all
the workers, so that they adopt one server). The supervisor of `run.py --workers N` asks every plugin
for such services, starts them before the workers, hands the workers the config overrides each returns,
and stops them after the last worker is gone. (The built-in servers are shared by adoption among any
processes on the host, workers or not: they need no host service.)
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
