"""A loopback TCP proxy that can cut a route: the fault tool for "a host cut off from a shared Redis".

    proxy = await TcpProxy("127.0.0.1", redis_port).start()   # listens on a free 127.0.0.1 port
    ...                                                     # point a client at proxy.port
    await proxy.cut("refuse")      # every open connection closed; new connects are refused
    await proxy.cut("blackhole")   # every open connection closed; new ones accepted, nothing forwarded
    await proxy.restore()          # forwards again, on the same port
    await proxy.close()            # every socket closed

Two modes of a cut:
- `refuse`: the listener is closed, so a connect gets ECONNREFUSED at once (a host that is down, a
  firewall that rejects). `restore` binds the same port again.
- `blackhole`: the listener stays; a connect succeeds (the kernel completes the handshake) and then
  nothing comes back, whatever the client sends (a dead route, a firewall that drops): the client only
  learns it from its own timeouts. The black-holed connections are held open, reading and discarding,
  until `restore` (or `close`) closes them.
With `keep_open=True` a blackhole cut also freezes the connections already open instead of closing
them: their bytes are discarded both ways, so a command in flight times out rather than failing fast.

Bounded: at most `max_connections` connections at once (one more is closed as soon as it is
accepted), and each direction copies at most `chunk` bytes at a time and waits for the other side to
drain before reading more. Loopback only: it listens on and connects to 127.0.0.1 / ::1 / localhost.

It runs inside the caller's event loop (`TcpProxy`), or as its own process (`ProxyProcess`, which runs
this file: `python tests/tcp_proxy.py --target 127.0.0.1:6379 [--port P]`, controlled by one command a
line on stdin, `cut refuse`, `cut blackhole [keep_open]`, `restore`, `status`, `quit`, each answered by
one line on stdout; it exits when stdin closes, and dies with its parent). Only the standard library:
the file runs as a script from anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
from typing import Any

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
MODES = ("refuse", "blackhole")


class _Link:
    """One client connection and, while forwarding, its upstream connection and two copy tasks."""

    __slots__ = ("client", "frozen", "tasks", "upstream")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.frozen = False  # open, but every byte is dropped both ways

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection at once (no waiting for buffered data: the route is gone)."""
    with contextlib.suppress(Exception):
        writer.transport.abort()


class TcpProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = 64,
        connect_timeout: float = 2.0,
        chunk: int = 65536,
    ) -> None:
        for name in (host, target_host):
            if name not in LOOPBACK:
                raise ValueError(f"loopback addresses only, not {name!r}")
        self.target = (target_host, target_port)
        self.host = host
        self.port = port  # the bound port once started (the same after every restore)
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.chunk = chunk
        self.state = "stopped"  # forwarding | refuse | blackhole | closed
        self.keep_open = False
        self._server: asyncio.AbstractServer | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.accepted = 0  # connections accepted, all modes
        self.rejected = 0  # closed at once: over max_connections, or the upstream did not answer
        self.cuts = 0

    # -- control -----------------------------------------------------------------------------------

    async def start(self) -> TcpProxy:
        await self._listen()
        self.state = "forwarding"
        return self

    async def cut(self, mode: str = "refuse", *, keep_open: bool = False) -> None:
        """Cut the route: every open connection is closed (or, blackhole with `keep_open`, frozen) and new
        ones are refused (`refuse`) or accepted and ignored (`blackhole`). When this returns, nothing
        more reaches the target through the proxy."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if keep_open and mode != "blackhole":
            raise ValueError("keep_open applies to a blackhole cut only")
        self._check_open()
        self.cuts += 1
        self.state, self.keep_open = mode, keep_open
        if mode == "refuse":
            await self._unlisten()
        elif self._server is None:  # blackhole after refuse: accept again, forward nothing
            await self._listen()
        if keep_open:
            for link in self._links:
                link.frozen = True
        else:
            self._close_links()

    async def restore(self) -> None:
        """Forward again. Connections black-holed or frozen meanwhile are closed (their clients gave up
        on them long ago); new connections are forwarded."""
        self._check_open()
        if self.state == "forwarding":
            return
        if self.state == "blackhole":
            self._close_links()
        self.state, self.keep_open = "forwarding", False
        if self._server is None:
            await self._listen()

    async def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        await self._unlisten()
        self._close_links()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "port": self.port, "connections": len(self._links),
                "accepted": self.accepted, "rejected": self.rejected, "cuts": self.cuts}

    # -- internals ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state in ("stopped", "closed"):
            raise RuntimeError(f"the proxy is {self.state}")

    async def _listen(self) -> None:
        # The same port after a refuse cut: SO_REUSEADDR (asyncio's default) lets us bind it again at
        # once; another process could only take it in between if it asked for this very port.
        last: OSError | None = None
        for _ in range(50):
            try:
                self._server = await asyncio.start_server(self._accept, self.host, self.port, backlog=128,
                                                          reuse_address=True)
                break
            except OSError as exc:
                last = exc
                await asyncio.sleep(0.02)
        else:
            raise OSError(f"cannot listen on {self.host}:{self.port} again: {last}")
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()  # (3.11 leaves accepted connections alone; _close_links handles them)
            await server.wait_closed()

    def _close_links(self) -> None:
        links, self._links = self._links, set()
        for link in links:
            link.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.state not in ("forwarding", "blackhole") or len(self._links) >= self.max_connections:
            self.rejected += 1
            _abort(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            if self.state == "blackhole":
                link.frozen = True
                await self._pipe(reader, None, link)
                return
            try:
                async with asyncio.timeout(self.connect_timeout):
                    up_reader, up_writer = await asyncio.open_connection(*self.target)
            except (OSError, TimeoutError):
                self.rejected += 1
                return
            if link not in self._links:  # cut while we were connecting
                _abort(up_writer)
                return
            link.upstream = up_writer
            link.tasks = [asyncio.ensure_future(self._pipe(reader, up_writer, link)),
                          asyncio.ensure_future(self._pipe(up_reader, writer, link))]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            self._handlers.discard(handler)
            self._links.discard(link)
            link.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, link: _Link) -> None:
        """Copy one direction (drop it, while the link is frozen) until EOF or an error; then the whole
        link closes, both directions, as a TCP connection through a real route would."""
        try:
            while data := await reader.read(self.chunk):
                if link.frozen or writer is None:
                    continue
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._links.discard(link)
            link.close()


# -- as its own process ------------------------------------------------------------------------------


class ProxyProcess:
    """A TcpProxy in a child process of ours, driven over its stdin/stdout; stopped by its PID."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, target_host: str, target_port: int, *, port: int = 0,
                    max_connections: int = 64, timeout: float = 15.0) -> ProxyProcess:
        argv = [sys.executable, os.path.abspath(__file__), "--target", f"{target_host}:{target_port}",
                "--port", str(port), "--max-connections", str(max_connections)]
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, process_group=0)
        try:
            async with asyncio.timeout(timeout):
                line = (await process.stdout.readline()).decode()  # type: ignore[union-attr]
            if not line.startswith("listening "):
                raise RuntimeError(f"the proxy process did not start: {line!r}")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        return cls(process, int(line.split()[1]))

    async def command(self, line: str, timeout: float = 10.0) -> dict[str, Any]:
        async with self._lock, asyncio.timeout(timeout):
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(line.encode() + b"\n")
            await self.process.stdin.drain()
            answer = (await self.process.stdout.readline()).decode()
        if not answer.startswith("ok "):
            raise RuntimeError(f"proxy command {line!r} failed: {answer.strip() or 'the process exited'}")
        return json.loads(answer[3:])

    async def cut(self, mode: str = "refuse", *, keep_open: bool = False) -> None:
        await self.command(f"cut {mode}{' keep_open' if keep_open else ''}")

    async def restore(self) -> None:
        await self.command("restore")

    async def status(self) -> dict[str, Any]:
        return await self.command("status")

    async def close(self, timeout: float = 5.0) -> int | None:
        if self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.command("quit", timeout=timeout)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)  # our child, not yet reaped: its PID is ours
                await self.process.wait()
        return self.process.returncode


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    proxy = await TcpProxy(host, int(port), port=args.port, max_connections=args.max_connections).start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    answer(f"listening {proxy.port}")
    try:
        while line := (await reader.readline()).decode():
            words = line.split()
            try:
                if words[:1] == ["cut"] and len(words) in (2, 3):
                    await proxy.cut(words[1], keep_open=words[2:] == ["keep_open"])
                elif words == ["restore"]:
                    await proxy.restore()
                elif words == ["quit"]:
                    answer("ok " + json.dumps(proxy.status()))
                    return
                elif words != ["status"]:
                    raise ValueError(f"unknown command {line.strip()!r}")
                answer("ok " + json.dumps(proxy.status()))
            except (ValueError, RuntimeError, OSError) as exc:
                answer(f"error {exc}")
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to (loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--max-connections", type=int, default=64)
    args = parser.parse_args(argv)
    _die_with_parent(os.getppid())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

