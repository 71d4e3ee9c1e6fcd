"""Child processes we own: spawned so that they can never outlive us, stopped by their PID.

Used for redis-server by the subprocess lifecycle and for the embedded PostgreSQL. A child:
- runs in its own process group (a Ctrl-C to our terminal is ours to handle, not theirs);
- gets PR_SET_PDEATHSIG=SIGKILL before exec, then checks getppid() so that a parent that died
  between fork and prctl is noticed too: no orphan even when we are SIGKILLed;
- writes stdout and stderr to a log file whose tail goes into every error we raise about it; the log
  is opened for appending, created 0600, never through a symlink and only if it is a regular file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs

from ondemand.errors import OndemandError

_PR_SET_PDEATHSIG = 1


class ProcessError(OndemandError):
    """A child could not be executed, exited while starting, or was not ready in time. The message
    names the child and carries the tail of its log. Each caller maps it to its own error (a Redis
    that will not start is a ProcessError, a PostgreSQL that will not start a PostgresUnavailable)."""

    code = "process_error"


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """Return a preexec_fn that binds the child's life to `parent_pid`."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def minimal_environment() -> dict[str, str]:
    """What a server child needs from our environment, and nothing else: no tokens or DSNs."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "HOME")
    return {name: os.environ[name] for name in keep if name in os.environ}


def open_log(path: Path) -> int:
    """The child's log, for appending: created 0600; never through a symlink (O_NOFOLLOW), never a FIFO
    or device someone planted (O_NONBLOCK makes a FIFO fail instead of blocking). ProcessError otherwise."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        why = "is a symbolic link, which is never followed" if exc.errno == errno.ELOOP else exc.strerror
        raise ProcessError(f"cannot open the log {path}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ProcessError(f"cannot open the log {path}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file, or a note that there is none."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


@attrs.define
class ChildProcess:
    """A running child owned by this process."""

    name: str
    argv: tuple[str, ...]
    log_path: Path
    process: asyncio.subprocess.Process
    started_at: float = attrs.field(factory=time.monotonic)
    owner_pid: int = attrs.field(factory=os.getpid)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    def describe_exit(self) -> str:
        code = self.process.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        return f"{self.name} (pid {self.pid}) {how}; last lines of {self.log_path}:\n{log_tail(self.log_path)}"

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        inherit_output: bool = False,
    ) -> ChildProcess:
        """Start `argv`; raises ProcessError if it cannot be executed at all.

        Output goes to `log_path`, or to our own stdout/stderr with `inherit_output` (workers, whose
        log lines the operator wants to see). Without `env` the child gets `minimal_environment()`.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            log = None if inherit_output else stack.enter_context(os.fdopen(open_log(log_path), "ab"))
            try:
                # Spawned from the event loop's thread on purpose: PDEATHSIG fires when the *thread*
                # that forked the child exits, so a worker thread would kill it too early.
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=None if log is None else asyncio.subprocess.STDOUT,
                    env=minimal_environment() if env is None else env,
                    cwd=cwd,
                    user=user,
                    process_group=0,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            except OSError as exc:
                raise ProcessError(f"cannot execute {argv[0]!r} for {name}: {exc.strerror or exc}") from exc
        return cls(name=name, argv=tuple(argv), log_path=log_path, process=process)

    async def wait_ready(
        self,
        probe: Callable[[], Awaitable[bool]],
        *,
        timeout: float,
        interval: float = 0.001,
        max_interval: float = 0.005,
    ) -> float:
        """Poll `probe` until it returns True; returns seconds taken.

        An early exit of the child is noticed at once and raised with its log tail, rather than
        waiting out the timeout. Polls start at 1 ms and stay at most 5 ms apart: a probe that finds
        no socket yet costs microseconds, and every millisecond here is a millisecond of cold start.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + timeout
        exited = asyncio.ensure_future(self.process.wait())
        try:
            while True:
                if exited.done():
                    raise ProcessError(self.describe_exit())
                with contextlib.suppress(OSError, asyncio.TimeoutError, EOFError):
                    async with asyncio.timeout(max(0.001, min(0.5, deadline - loop.time()))):
                        if await probe():
                            return loop.time() - start
                if loop.time() >= deadline:
                    raise ProcessError(
                        f"{self.name} (pid {self.pid}) was not ready within {timeout:g} s; "
                        f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                    )
                await asyncio.wait({exited}, timeout=min(interval, max(0.0, deadline - loop.time())))
                interval = min(interval * 1.5, max_interval)
        finally:
            exited.cancel()

    def signal(self, signum: int) -> None:
        """Signal our child by PID; a reaped child is never signalled (its PID may be reused), and a
        forked copy of us never signals the parent's child."""
        if self.process.returncode is None and os.getpid() == self.owner_pid:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def stop(self, *, grace: float, kill_after: float = 2.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit status."""
        if self.process.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), kill_after)
        return self.process.returncode
