"""A loopback TLS terminator: what the TLS tests and benchmark put in front of a server that speaks no TLS
(the bundled Valkey builds have none; pgserver's PostgreSQL was built without SSL).

    proxy = await TlsProxy(("127.0.0.1", redis_port), cert=..., key=...).start()   # a free 127.0.0.1 port
    proxy = await TlsProxy(..., client_ca=ca_pem)      # requires a client certificate that CA signed
    proxy = await TlsProxy(..., postgres=True)         # PostgreSQL's SSLRequest first, then TLS
    ...
    await proxy.close()

Clients connect with TLS to `proxy.host:proxy.port`; the proxy forwards the plaintext to the target (host and
port, or a unix socket path). It counts connections accepted and handshakes that failed (and why), so a
test can tell a client that refused the proxy's certificate from one that never came.

`plaintext_too=True`: a client whose first byte opens no TLS handshake is passed through in plaintext. A
node of a Sentinel group or a cluster then announces the proxy's port: sentinels and replicas (no TLS in
these builds) reach it there, and so does a client, through TLS, at the address the sentinels, the slot
map or a MOVED name.

`postgres=True`: a PostgreSQL client asks for TLS in plaintext first (SSLRequest, answered 'S'; a
GSSENCRequest is answered 'N'), then speaks TLS on the same connection; the proxy forwards what follows to
a server that never sees TLS.

It runs inside the caller's event loop (`TlsProxy`), or as its own process (`python tests/tls_proxy.py
--target HOST:PORT --cert C --key K [--client-ca CA] [--listen HOST:PORT]`, which prints `listening PORT`,
exits when stdin closes and dies with its parent): the benchmark runs it so, on a core of its own. Only the
standard library: the file runs as a script from anywhere. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import ssl
import struct
import sys
from pathlib import Path
from typing import Any

_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_context(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsProxy:
    def __init__(self, target: tuple[str, int] | str, *, cert: str | Path, key: str | Path,
                 client_ca: str | Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 postgres: bool = False, plaintext_too: bool = False, chunk: int = 262144) -> None:
        if (isinstance(target, tuple) and not _loopback(target[0])) or not _loopback(host):
            raise ValueError("loopback addresses only")
        self.target = target
        self.host, self.port = host, port
        self.context = server_context(cert, key, client_ca)
        self.postgres = postgres
        # Plaintext passes through too (a first byte that opens no TLS handshake): sentinels and replicas,
        # which speak no TLS here, reach a node at the address it announces, which leads clients through TLS.
        self.plaintext_too = plaintext_too
        self.chunk = chunk
        self.accepted = 0
        self.tls_connections = 0  # handshakes that succeeded
        self.plaintext_connections = 0
        self.handshake_failures: list[str] = []  # OpenSSL's reason for each failed handshake
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> TlsProxy:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = asyncio.ensure_future(self._accept_loop())
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> TlsProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _failed(self, exc: BaseException) -> None:
        self.handshake_failures.append(str(getattr(exc, "reason", None) or exc or type(exc).__name__))

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            self.accepted += 1
            task = asyncio.ensure_future(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # as asyncio's own transports: no Nagle delays
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        closing: list[Any] = [sock]
        tasks: list[asyncio.Task[None]] = []
        try:
            tls = True
            if self.postgres:
                tls = await self._postgres_request(loop, sock)
                if not tls:
                    return
            elif self.plaintext_too:
                tls = await _peek(loop, sock) == b"\x16"  # a TLS record: a ClientHello
            if tls:
                # The server side of TLS on an SSLSocket of our own (not asyncio's transport): a failed handshake
                # sends its alert (certificate required, unknown CA) to the client, as a real server's does.
                sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                closing.append(sock)
                try:
                    async with asyncio.timeout(5.0):
                        await _ssl_call(loop, sock, sock.do_handshake)
                except (ssl.SSLError, OSError, TimeoutError) as exc:
                    self._failed(exc)
                    return
                self.tls_connections += 1
                await _TlsSplice.run(self, loop, sock, self.target)  # type: ignore[arg-type]
                return
            self.plaintext_connections += 1
            try:
                if isinstance(self.target, str):
                    up_reader, upstream = await asyncio.open_unix_connection(self.target, limit=self.chunk)
                else:
                    up_reader, upstream = await asyncio.open_connection(*self.target, limit=self.chunk)
            except OSError:
                return
            closing.append(upstream.transport)
            reader, writer = await asyncio.open_connection(sock=sock, limit=self.chunk)
            closing.append(writer.transport)
            tasks = [asyncio.ensure_future(self._pipe(reader, upstream)),
                     asyncio.ensure_future(self._pipe(up_reader, writer))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)  # one side closed: so does the other
        except OSError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for thing in reversed(closing):
                with contextlib.suppress(Exception):
                    if isinstance(thing, asyncio.BaseTransport):
                        thing.abort()
                    else:
                        thing.close()

    async def _postgres_request(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
        """Answer the client's plaintext request for encryption; True when it asked for TLS."""
        while True:
            head = b""
            while len(head) < 8:
                data = await loop.sock_recv(sock, 8 - len(head))
                if not data:
                    return False
                head += data
            length, code = struct.unpack("!II", head)
            if length == 8 and code == _GSSENC_REQUEST:
                await loop.sock_sendall(sock, b"N")
                continue
            if length == 8 and code == _SSL_REQUEST:
                await loop.sock_sendall(sock, b"S")
                return True
            return False  # a plaintext startup: this proxy serves TLS only

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(self.chunk):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass


class _TlsSplice(asyncio.Protocol):
    """One TLS client spliced to its upstream with callbacks, no task per direction: the TLS socket's reader
    stays registered (no epoll change per read), what it decrypts is written to the upstream transport at once,
    and what upstream sends is encrypted straight into the socket (buffered only when the socket is full).
    Backpressure both ways: a full upstream pauses reading TLS, a full TLS socket pauses reading upstream."""

    def __init__(self, proxy: TlsProxy, loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
        self.proxy, self.loop, self.tls, self.fd = proxy, loop, tls, tls.fileno()
        self.upstream: asyncio.Transport | None = None
        self.pending = bytearray()  # encrypted-to-be, waiting for room in the socket
        self.done: asyncio.Future[None] = loop.create_future()
        self.reading = self.writing = False

    @classmethod
    async def run(cls, proxy: TlsProxy, loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket,
                  target: tuple[str, int] | str) -> None:
        splice = cls(proxy, loop, tls)
        try:
            if isinstance(target, str):
                await loop.create_unix_connection(lambda: splice, target)
            else:
                await loop.create_connection(lambda: splice, *target)
        except OSError:
            return
        try:
            splice._read_tls()  # what arrived with the handshake's last flight
            if not splice.done.done():
                splice._resume_tls()
            await splice.done
        finally:
            splice._close()

    # upstream -> TLS
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.upstream = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.pending += data
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:  # upstream is full: stop reading TLS
        self._pause_tls()

    def resume_writing(self) -> None:
        self._resume_tls()

    def _flush(self) -> None:
        try:
            while self.pending:
                sent = self.tls.send(self.pending[:262144])
                del self.pending[:sent]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError:
            self._finish()
            return
        if self.pending and not self.writing:
            self.loop.add_writer(self.fd, self._flush)
            self.writing = True
            if self.upstream is not None:
                self.upstream.pause_reading()
        elif not self.pending and self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
            if self.upstream is not None:
                self.upstream.resume_reading()

    # TLS -> upstream
    def _resume_tls(self) -> None:
        if not self.reading and not self.done.done():
            self.loop.add_reader(self.fd, self._read_tls)
            self.reading = True

    def _pause_tls(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def _read_tls(self) -> None:
        try:
            while True:
                data = self.tls.recv(262144)
                if not data:
                    self._finish()
                    return
                assert self.upstream is not None
                self.upstream.write(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLError as exc:
            self.proxy._failed(exc)  # an alert after the handshake (TLS 1.3: the client refused our certificate)
        except OSError:
            pass
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _close(self) -> None:
        self._pause_tls()
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        if self.upstream is not None:
            self.upstream.abort()
        self._finish()


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    ready = loop.create_future()
    fd = sock.fileno()
    if write:
        loop.add_writer(fd, ready.set_result, None)
    else:
        loop.add_reader(fd, ready.set_result, None)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _ssl_call(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, call: Any, *args: Any) -> Any:
    """`call(*args)` on a non-blocking SSLSocket (the handshake), waiting as OpenSSL asks."""
    while True:
        try:
            return call(*args)
        except ssl.SSLWantReadError:
            await _ready(loop, sock, write=False)
        except ssl.SSLWantWriteError:
            await _ready(loop, sock, write=True)


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The first byte the client sends, left in the socket for whoever reads it next."""
    while True:
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            await _ready(loop, sock, write=False)


# -- as its own process ------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    listen_host, _, listen_port = args.listen.rpartition(":")
    proxy = await TlsProxy((host, int(port)), cert=args.cert, key=args.key, client_ca=args.client_ca,
                           host=listen_host, port=int(listen_port), plaintext_too=args.plaintext_too).start()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    sys.stdout.write(f"listening {proxy.port}\n")
    sys.stdout.flush()
    try:
        while await stdin.readline():
            pass
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward the plaintext to (loopback)")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca", help="require a client certificate signed by this CA")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: a free one)")
    parser.add_argument("--plaintext-too", action="store_true", help="pass plaintext clients through as well")
    args = parser.parse_args(argv)
    _die_with_parent(os.getppid())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
