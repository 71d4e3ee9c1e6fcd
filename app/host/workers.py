"""Serving: one process, or a supervisor of N worker processes sharing one port (SO_REUSEPORT).

Why not gunicorn's worker: no dependency, each worker is a plain aiohttp server (`ondemand.web.serving.run_app`
with reuse_port) and the kernel spreads connections; the supervision we need (restart a dead worker with a backoff, stop
all on SIGTERM, never orphan one) is a few dozen lines over ChildProcess. The workers share the built-in
servers by adopting them; what they must share and cannot arrange themselves is a host service, started
here before them (`ondemand_host_services`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import attrs
import orjson
from aiohttp import web

from ondemand.config import Config, unstructure
from ondemand.config.load import config_from_dict, merge
from ondemand.errors import MAX_ERROR_CHARS, OndemandError, StartupError, one_line
from ondemand.host.net import free_port, listening_sockets
from ondemand.host.process import ChildProcess
from ondemand.host.services import HostService
from ondemand.plugin_manager import Plugins

log = logging.getLogger("ondemand.workers")

WORKER_CONFIG_ENV = "ONDEMAND_WORKER_CONFIG"
WORKER_ERROR_ENV = "ONDEMAND_WORKER_ERROR_FILE"  # where a worker that cannot start writes its one-line error
# A worker that dies soon after starting is restarted after a doubling delay: never in a storm.
_RESTART_DELAY, _RESTART_DELAY_MAX, _STABLE_SECONDS = 0.5, 30.0, 30.0
# A worker that cannot start exits with this status (as serve does); this many in a row and the supervisor
# gives up: the same config and host would fail the same way forever.
STARTUP_FAILURE_STATUS, _MAX_STARTUP_FAILURES = 2, 3


async def freeze_startup_objects(app: web.Application) -> None:
    """Runs after the app's startup (the Runtime included): what exists now lives as long as the
    server, so move it out of the collector's sight. Full collections then stay short; measured,
    they set the HTTP p99 otherwise (up to 52 ms each). Done by the server process only, never by
    create_app, which embedding applications and tests also call."""
    gc.collect()
    gc.freeze()


def run_single(config: Config, *, reuse_port: bool = False) -> int:
    """Serve in this process until SIGINT or SIGTERM; StartupError when it cannot start serving."""
    from ondemand.web import create_app
    from ondemand.web.serving import run_app

    app = create_app(config)
    app.on_startup.append(freeze_startup_objects)
    run_app(app, config, reuse_port=reuse_port)
    return 0


def serve_workers(config: Config) -> int:
    if config.server.workers == 1:
        return run_single(config)
    return asyncio.run(Supervisor(config).run())


@attrs.define
class Supervisor:
    config: Config
    workers: dict[int, ChildProcess] = attrs.field(factory=dict)
    restart_delays: dict[int, float] = attrs.field(factory=dict)
    startup_failures: dict[int, int] = attrs.field(factory=dict)  # worker index -> failed starts in a row
    given_up: StartupError | None = None
    _rundir: Path | None = None  # private (0700): the workers' error files

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT (0); StartupError when the workers keep failing to start."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        config = self._prepare_config()
        # The workers will bind the port with SO_REUSEPORT: a port another server holds fails here, in one
        # line, before anything starts (a worker that still cannot bind says so itself, see _restart).
        for sock in listening_sockets(config.server.host, config.server.port, reuse_port=True):
            sock.close()
        services: list[HostService] = []
        self._rundir = Path(tempfile.mkdtemp(prefix="ondemand-workers-"))
        try:
            for service in Plugins(config.plugins.disable).host_services(config):
                overrides = await service.start()
                services.append(service)
                log.info("host service %s started for the workers", service.name)
                config = config_from_dict(merge(unstructure(config), overrides), source=config.source)
            payload = orjson.dumps(unstructure(config)).decode()
            for index in range(config.server.workers):
                self.workers[index] = await self._spawn(index, payload)
            log.info("serving on http://%s:%s with %d workers", config.server.host, config.server.port,
                     config.server.workers)
            while not stopping.is_set():
                waits = {asyncio.ensure_future(w.process.wait()): i for i, w in self.workers.items()}
                stop_wait = asyncio.ensure_future(stopping.wait())
                done, _ = await asyncio.wait({stop_wait, *waits}, return_when=asyncio.FIRST_COMPLETED)
                for fut in (stop_wait, *waits):
                    fut.cancel()
                for fut in done:
                    if fut in waits and not stopping.is_set():
                        await self._restart(waits[fut], payload, stopping)
                if self.given_up is not None:
                    break
        finally:
            await self._stop_workers(config.server.shutdown_timeout + 5)
            for service in reversed(services):
                try:
                    await service.stop()
                except Exception:
                    log.exception("host service %s did not stop cleanly", service.name)
            shutil.rmtree(self._rundir, ignore_errors=True)
        if self.given_up is not None:
            raise self.given_up
        return 0

    def _error_file(self, index: int) -> Path:
        assert self._rundir is not None
        return self._rundir / f"worker-{index}.error"

    async def _restart(self, index: int, payload: str, stopping: asyncio.Event) -> None:
        dead = self.workers[index]
        status = dead.returncode
        how = f"was killed by signal {-status}" if status is not None and status < 0 else f"exited with status {status}"
        what = f"worker {index} (pid {dead.pid}) {how}"
        if status == STARTUP_FAILURE_STATUS and dead.uptime() < _STABLE_SECONDS:
            error = self._worker_error(index)
            failures = self.startup_failures[index] = self.startup_failures.get(index, 0) + 1
            what = f"worker {index} (pid {dead.pid}) could not start: {error}"
            if failures >= _MAX_STARTUP_FAILURES:
                log.error("%s; giving up after %d attempts in a row", what, failures)
                self.given_up = StartupError(f"worker {index} could not start ({failures} attempts): {error}")
                return
        else:
            self.startup_failures.pop(index, None)
        delay = _RESTART_DELAY
        if dead.uptime() < _STABLE_SECONDS:
            delay = min(self.restart_delays.get(index, _RESTART_DELAY / 2) * 2, _RESTART_DELAY_MAX)
        self.restart_delays[index] = delay
        log.warning("%s; restarting it in %.1f s", what, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        if not stopping.is_set():
            self.workers[index] = await self._spawn(index, payload)

    def _worker_error(self, index: int) -> str:
        """The line a worker that could not start wrote (it is also on our stderr, which it shares)."""
        try:
            with self._error_file(index).open("rb") as f:
                return f.read(MAX_ERROR_CHARS).decode(errors="replace").strip() or "no error reported"
        except OSError:
            return "no error reported (it died before it could write one)"

    def _prepare_config(self) -> Config:
        config = self.config
        server = config.server
        if server.port == 0:  # every worker must bind the same port
            server = attrs.evolve(server, port=free_port(server.host))
        return attrs.evolve(config, server=server)

    async def _spawn(self, index: int, payload: str) -> ChildProcess:
        error_file = self._error_file(index)
        error_file.unlink(missing_ok=True)
        env = {**os.environ, WORKER_CONFIG_ENV: payload, WORKER_ERROR_ENV: str(error_file)}
        # -P: the working directory is not put on sys.path, so a project's own `ondemand` (or anything else
        # there) never shadows the installed package in the worker. Its output is ours (inherit_output): the
        # log path is never written.
        child = await ChildProcess.spawn(
            f"worker {index}", [sys.executable, "-P", "-m", "ondemand.host.workers"], env=env,
            log_path=error_file.with_suffix(".log"), inherit_output=True,
        )
        log.info("worker %d started (pid %d)", index, child.pid)
        return child

    async def _stop_workers(self, grace: float) -> None:
        await asyncio.gather(*(w.stop(grace=grace) for w in self.workers.values()), return_exceptions=True)


def worker_main() -> int:
    """Entry of one worker process: the config comes from the supervisor, already resolved. A worker that
    cannot start prints one line, leaves it in its error file for the supervisor, and exits 2."""
    from ondemand.logs import configure_logging

    config = config_from_dict(orjson.loads(os.environ.pop(WORKER_CONFIG_ENV)), source="supervisor")
    error_file = os.environ.pop(WORKER_ERROR_ENV, None)
    configure_logging("INFO", config.server.log_format)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            return run_single(config, reuse_port=True)
    except OndemandError as exc:
        line = one_line(exc)
        print(f"startup error: {line}", file=sys.stderr)
        if error_file:
            with contextlib.suppress(OSError):
                Path(error_file).write_text(line)
        return STARTUP_FAILURE_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
