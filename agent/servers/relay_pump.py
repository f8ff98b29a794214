"""Byte pumps for a paired relay stream: `os.splice` through a pipe, or plain asyncio.

A relay spends nearly all its time moving bytes, so the pump decides its speed.
The splice pump moves socket -> pipe -> socket inside the kernel (no copy into
Python, 1 MiB pipes), driven by the event loop's readiness callbacks; the asyncio
pump is the portable fallback (recv_into a reused buffer, sock_sendall). Both
propagate EOF as a half-close (shutdown(SHUT_WR)), close the pair after
`idle_timeout` seconds with no byte in either direction, obey an optional
Throttle (reserve tokens, move, refund the shortfall, all in one callback so a
shared bucket stays exact), and close both sockets when they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys
from dataclasses import dataclass
from typing import Literal

from agent.servers.relay_core import Throttle

PumpKind = Literal["splice", "asyncio"]

PIPE_SIZE = 1 << 20
"""Pipe capacity asked for with F_SETPIPE_SZ (the default pipe-max-size for unprivileged users)."""

ASYNCIO_CHUNK = 1 << 18
"""Receive buffer of the asyncio pump."""

MAX_BATCH = 8 << 20
"""Bytes one readiness callback may move before yielding, so one fast stream cannot starve the rest."""

THROTTLE_QUANTUM = 16384
"""When throttled, wait until this many bytes are allowed rather than waking for every byte."""

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class Meter:
    """A counter shared by many pumps (the server's "bytes relayed")."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


@dataclass
class PumpResult:
    reason: str
    """"closed" (both directions reached EOF), "idle", "error:<errno name>" or "cancelled"."""
    a_to_b: int
    b_to_a: int


_splice_ok: bool | None = None


def splice_available() -> bool:
    """True when os.splice really moves bytes between TCP-like sockets here (checked once)."""
    global _splice_ok
    if _splice_ok is not None:
        return _splice_ok
    ok = False
    if sys.platform.startswith("linux") and hasattr(os, "splice"):
        a, b = socket.socketpair()
        r, w = os.pipe()
        try:
            a.sendall(b"x")
            ok = os.splice(b.fileno(), w, 1) == 1 and os.read(r, 1) == b"x"
        except OSError:
            ok = False
        finally:
            for s in (a, b):
                s.close()
            os.close(r)
            os.close(w)
    _splice_ok = ok
    return ok


def _err_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        import errno

        return "error:" + errno.errorcode.get(exc.errno, str(exc.errno))
    return f"error:{type(exc).__name__}"


def _shutdown_wr(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


class PairPump:
    """Shared bookkeeping: counters, the idle watchdog, the outcome, closing the sockets."""

    kind: PumpKind

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        a_rest: bytes = b"",
        b_rest: bytes = b"",
        idle_timeout: float = 30.0,
        throttle: Throttle | None = None,
        meter: Meter | None = None,
    ) -> None:
        """`a_rest` is what was already read from `a` (it goes to `b` first), and vice versa."""
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self.a = a
        self.b = b
        self.a_rest = a_rest
        self.b_rest = b_rest
        self.idle_timeout = idle_timeout
        self.throttle = throttle
        self.meter = meter if meter is not None else Meter()
        self.a_to_b = 0
        self.b_to_a = 0
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._done: asyncio.Future[str] = self._loop.create_future()
        self._idle_handle: asyncio.TimerHandle | None = None
        for s in (a, b):
            s.setblocking(False)

    # -- for the directions
    def now(self) -> float:
        return self._loop.time()

    def moved(self, forward: bool, n: int) -> None:
        if forward:
            self.a_to_b += n
        else:
            self.b_to_a += n
        self.meter.bytes += n
        self._last = self._loop.time()

    def finish(self, reason: str) -> None:
        if not self._done.done():
            self._done.set_result(reason)

    def fail(self, exc: BaseException) -> None:
        self.finish(_err_reason(exc))

    # -- lifecycle
    def _check_idle(self) -> None:
        due = self._last + self.idle_timeout
        if self._loop.time() >= due:
            self.finish("idle")
        else:
            self._idle_handle = self._loop.call_at(due, self._check_idle)

    async def run(self) -> PumpResult:
        reason = "cancelled"
        try:
            self._start()
            self._idle_handle = self._loop.call_at(self._last + self.idle_timeout, self._check_idle)
            reason = await self._done
        finally:
            if self._idle_handle is not None:
                self._idle_handle.cancel()
            await self._stop()
            for s in (self.a, self.b):
                s.close()
        return PumpResult(reason, self.a_to_b, self.b_to_a)

    def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- splice


class _SpliceDirection:
    """src -> pipe -> dst, as a state machine fed by readiness callbacks.

    Reading pauses whenever dst pushes back, and resumes once the pipe is empty, so
    the pipe is the only buffer and each callback does bounded work.
    """

    def __init__(self, pump: SplicePump, src: socket.socket, dst: socket.socket, rest: bytes, forward: bool):
        self.pump = pump
        self.loop = pump._loop
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.forward = forward
        self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pw, _F_SETPIPE_SZ, PIPE_SIZE)
        self.cap: int = fcntl.fcntl(self.pw, _F_GETPIPE_SZ)
        self.in_pipe = 0
        self.pending = memoryview(rest) if rest else None
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.resume: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.pending is not None:
            self._want_write()
        else:
            self._want_read()

    def _want_read(self) -> None:
        if not self.reading:
            self.loop.add_reader(self.src_fd, self._on_readable)
            self.reading = True

    def _stop_read(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False

    def _want_write(self) -> None:
        if not self.writing:
            self.loop.add_writer(self.dst_fd, self._on_writable)
            self.writing = True

    def _stop_write(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False

    def _flush(self) -> bool:
        """Pipe -> dst; False if dst would block with bytes still in the pipe."""
        while self.in_pipe:
            try:
                m = os.splice(self.pr, self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            if m <= 0:
                return False
            self.in_pipe -= m
            self.pump.moved(self.forward, m)
        return True

    def _on_readable(self) -> None:
        try:
            self._pump_in()
        except OSError as exc:
            self.pump.fail(exc)

    def _pump_in(self) -> None:
        throttle = self.pump.throttle
        budget = MAX_BATCH
        while budget > 0:
            want = self.cap - self.in_pipe
            now = 0.0
            if throttle is not None:
                now = self.pump.now()
                granted = throttle.take(want, now, THROTTLE_QUANTUM)
                if granted <= 0:
                    self._stop_read()
                    delay = throttle.wait_time(min(want, THROTTLE_QUANTUM), now)
                    self.resume = self.loop.call_later(delay, self._resume)
                    return
                want = granted
            try:
                n = os.splice(self.src_fd, self.pw, want, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                n = -1
            if throttle is not None:
                throttle.refund(want - max(n, 0), now)
            if n == 0:
                self.eof = True
                self._stop_read()
            elif n > 0:
                self.in_pipe += n
                budget -= n
            elif self.in_pipe == 0:
                return  # socket drained: wait for the next readiness callback
            if self.in_pipe and not self._flush():
                self._stop_read()
                self._want_write()
                return
            if self.eof:
                self._finish()
                return

    def _resume(self) -> None:
        self.resume = None
        if not self.done and not self.writing:
            self._want_read()

    def _on_writable(self) -> None:
        try:
            if self.pending is not None:
                while self.pending:
                    try:
                        n = self.dst.send(self.pending)
                    except BlockingIOError:
                        return
                    self.pump.moved(self.forward, n)
                    self.pending = self.pending[n:]
                self.pending = None
            if not self._flush():
                return
        except OSError as exc:
            self.pump.fail(exc)
            return
        self._stop_write()
        if self.eof:
            self._finish()
        else:
            self._want_read()

    def _finish(self) -> None:
        self.done = True
        self._stop_read()
        self._stop_write()
        _shutdown_wr(self.dst)
        self.pump.direction_done()

    def close(self) -> None:
        self._stop_read()
        self._stop_write()
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None
        for fd in (self.pr, self.pw):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pr = self.pw = -1


class SplicePump(PairPump):
    kind: PumpKind = "splice"

    def _start(self) -> None:
        self._dirs: list[_SpliceDirection] = []
        # One at a time, so the pipes of the first are closed by _stop if the second fails (EMFILE).
        self._dirs.append(_SpliceDirection(self, self.a, self.b, self.a_rest, True))
        self._dirs.append(_SpliceDirection(self, self.b, self.a, self.b_rest, False))
        for d in self._dirs:
            d.start()

    def direction_done(self) -> None:
        if all(d.done for d in self._dirs):
            self.finish("closed")

    async def _stop(self) -> None:
        for d in getattr(self, "_dirs", []):
            d.close()


# --------------------------------------------------------------------------- asyncio


class AsyncioPump(PairPump):
    kind: PumpKind = "asyncio"

    def _start(self) -> None:
        self._tasks = [
            self._loop.create_task(self._copy(self.a, self.b, self.a_rest, True)),
            self._loop.create_task(self._copy(self.b, self.a, self.b_rest, False)),
        ]
        for t in self._tasks:
            t.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(exc)
        elif all(t.done() for t in self._tasks):
            self.finish("closed")

    async def _readable(self, sock: socket.socket) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = sock.fileno()
        self._loop.add_reader(fd, fut.set_result, None)
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)

    async def _copy(self, src: socket.socket, dst: socket.socket, rest: bytes, forward: bool) -> None:
        loop = self._loop
        if rest:
            await loop.sock_sendall(dst, rest)
            self.moved(forward, len(rest))
        buf = memoryview(bytearray(ASYNCIO_CHUNK))
        throttle = self.throttle
        while True:
            want = ASYNCIO_CHUNK
            now = 0.0
            if throttle is not None:
                now = loop.time()
                granted = throttle.take(want, now, THROTTLE_QUANTUM)
                if granted <= 0:
                    await asyncio.sleep(throttle.wait_time(THROTTLE_QUANTUM, now))
                    continue
                want = granted
            try:
                n = src.recv_into(buf[:want])
            except BlockingIOError:
                if throttle is not None:
                    throttle.refund(want, now)
                await self._readable(src)
                continue
            if throttle is not None:
                throttle.refund(want - n, now)
            if n == 0:
                break
            await loop.sock_sendall(dst, buf[:n])
            self.moved(forward, n)
        _shutdown_wr(dst)

    async def _stop(self) -> None:
        tasks = getattr(self, "_tasks", [])
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def default_kind() -> PumpKind:
    """The faster pump where it works (bench/relay_bench.py measures both)."""
    return "splice" if splice_available() else "asyncio"


def make_pump(
    kind: PumpKind | Literal["auto"],
    a: socket.socket,
    b: socket.socket,
    *,
    a_rest: bytes = b"",
    b_rest: bytes = b"",
    idle_timeout: float = 30.0,
    throttle: Throttle | None = None,
    meter: Meter | None = None,
) -> PairPump:
    """Build the requested pump; "splice" where it does not work is an error, not a silent swap."""
    chosen = default_kind() if kind == "auto" else kind
    cls: type[PairPump]
    if chosen == "splice":
        if not splice_available():
            raise RuntimeError("os.splice is not available here; use the asyncio pump")
        cls = SplicePump
    elif chosen == "asyncio":
        cls = AsyncioPump
    else:
        raise ValueError(f"unknown pump kind {kind!r}")
    return cls(a, b, a_rest=a_rest, b_rest=b_rest, idle_timeout=idle_timeout, throttle=throttle, meter=meter)
