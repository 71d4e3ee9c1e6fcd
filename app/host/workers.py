"""Serving: one process, or a supervisor of N worker processes sharing one port (SO_REUSEPORT).

Why not gunicorn's worker: no dependency, each worker is a plain `web.run_app(..., reuse_port=True)`
and the kernel spreads connections; the supervision we need (restart a dead worker with a backoff, stop
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
import signal
import sys
import tempfile
from pathlib import Path

import attrs
import orjson
from aiohttp import web

from ondemand.config import Config, unstructure
from ondemand.config.load import config_from_dict, merge
from ondemand.host.net import free_port
from ondemand.host.process import ChildProcess
from ondemand.host.services import HostService
from ondemand.plugin_manager import Plugins

log = logging.getLogger("ondemand.workers")

WORKER_CONFIG_ENV = "ONDEMAND_WORKER_CONFIG"
# A worker that dies soon after starting is restarted after a doubling delay: never in a storm.
_RESTART_DELAY, _RESTART_DELAY_MAX, _STABLE_SECONDS = 0.5, 30.0, 30.0


async def freeze_startup_objects(app: web.Application) -> None:
    """Runs after the app's startup (the Runtime included): what exists now lives as long as the
    server, so move it out of the collector's sight. Full collections then stay short; measured,
    they set the HTTP p99 otherwise (up to 52 ms each). Done by the server process only, never by
    create_app, which embedding applications and tests also call."""
    gc.collect()
    gc.freeze()


def run_single(config: Config, *, reuse_port: bool = False) -> int:
    from ondemand.web import create_app

    app = create_app(config)
    app.on_startup.append(freeze_startup_objects)
    web.run_app(app, host=config.server.host, port=config.server.port, reuse_port=reuse_port,
                shutdown_timeout=config.server.shutdown_timeout, print=None, access_log=None)
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

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        config = self._prepare_config()
        services: list[HostService] = []
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
        finally:
            await self._stop_workers(config.server.shutdown_timeout + 5)
            for service in reversed(services):
                try:
                    await service.stop()
                except Exception:
                    log.exception("host service %s did not stop cleanly", service.name)
        return 0

    async def _restart(self, index: int, payload: str, stopping: asyncio.Event) -> None:
        dead = self.workers[index]
        delay = _RESTART_DELAY
        if dead.uptime() < _STABLE_SECONDS:
            delay = min(self.restart_delays.get(index, _RESTART_DELAY / 2) * 2, _RESTART_DELAY_MAX)
        self.restart_delays[index] = delay
        log.warning("%s; restarting it in %.1f s", dead.describe_exit().splitlines()[0], delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        if not stopping.is_set():
            self.workers[index] = await self._spawn(index, payload)

    def _prepare_config(self) -> Config:
        config = self.config
        server = config.server
        if server.port == 0:  # every worker must bind the same port
            server = attrs.evolve(server, port=free_port(server.host))
        return attrs.evolve(config, server=server)

    async def _spawn(self, index: int, payload: str) -> ChildProcess:
        env = {**os.environ, WORKER_CONFIG_ENV: payload}
        # -P: the working directory is not put on sys.path, so a project's own `ondemand` (or anything else
        # there) never shadows the installed package in the worker.
        child = await ChildProcess.spawn(
            f"worker {index}", [sys.executable, "-P", "-m", "ondemand.host.workers"], env=env,
            log_path=Path(tempfile.gettempdir()) / f"ondemand-worker-{index}.log", inherit_output=True,
        )
        log.info("worker %d started (pid %d)", index, child.pid)
        return child

    async def _stop_workers(self, grace: float) -> None:
        await asyncio.gather(*(w.stop(grace=grace) for w in self.workers.values()), return_exceptions=True)


def worker_main() -> int:
    """Entry of one worker process: the config comes from the supervisor, already resolved."""
    from ondemand.logs import configure_logging

    config = config_from_dict(orjson.loads(os.environ.pop(WORKER_CONFIG_ENV)), source="supervisor")
    configure_logging("INFO", config.server.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        return run_single(config, reuse_port=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
