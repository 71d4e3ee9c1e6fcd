"""Child processes: a child that cannot run is a ProcessError, which each caller maps to its own error."""

from __future__ import annotations

from pathlib import Path

import pytest

from ondemand.errors import PostgresUnavailable, SpawnError
from ondemand.host.process import ChildProcess, ProcessError
from ondemand.plugins.storage_postgres.server import EmbeddedPostgres


async def test_a_missing_program_is_a_process_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match="no-such-program") as info:
        await ChildProcess.spawn("helper", [str(tmp_path / "no-such-program")], log_path=tmp_path / "log")
    assert not isinstance(info.value, SpawnError), "a child's failure is not a Redis spawn failure"


async def test_a_child_that_exits_while_starting_is_a_process_error_with_its_log(tmp_path: Path) -> None:
    child = await ChildProcess.spawn("shell", ["/bin/sh", "-c", "echo broken setup; exit 3"],
                                     log_path=tmp_path / "log")

    async def never() -> bool:
        return False

    with pytest.raises(ProcessError, match=r"exited with status 3(.|\n)*broken setup"):
        await child.wait_ready(never, timeout=5)


async def test_an_initdb_that_cannot_run_is_postgres_unavailable_not_a_redis_error(tmp_path: Path) -> None:
    # Binaries missing (a broken install): the error reaches a client as postgres_unavailable.
    server = EmbeddedPostgres(tmp_path / "pgdata", startup_timeout=5, bin_dir=tmp_path / "empty-bin")
    with pytest.raises(PostgresUnavailable) as info:
        await server.start()
    assert info.value.code == "postgres_unavailable"
    assert "initdb" in str(info.value)
    await server.stop()
