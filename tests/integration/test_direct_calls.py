"""Direct calls between actors (actors/direct_calls.py) over a real Unix socket: answers and failures come
back as through Ray, and every way of not reaching the actor is `Unreachable` (the caller's cue to use Ray)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from actors import direct_calls
from actors.direct_calls import DirectCallServer, Unreachable
from agent import runtime_paths
from agent.strategies.base import Result


class Odd(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickle cannot rebuild it from .args
        super().__init__(f"{a}/{b}")


class Components:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.release = asyncio.Event()

    async def call(self, kind: str, method: str, *args: Any) -> Any:
        self.calls.append((kind, method, args))
        if method == "fail":
            raise ValueError(f"{kind} says no")
        if method == "odd":
            raise Odd(1, 2)
        if method == "hang":
            await self.release.wait()
        if method == "unpicklable":
            return lambda: None
        return Result(True, reason=f"{kind}.{method}{args}", elapsed_ms=1.5)


@pytest.fixture
def short_dir() -> Any:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dc-") as d:
        yield Path(d)


async def test_an_answer_comes_back_as_the_method_returned_it(short_dir: Path) -> None:
    comps = Components()
    server = DirectCallServer(short_dir / "calls" / "udp_punch.sock", comps.call)
    await server.start()
    try:
        got = await direct_calls.call(server.path, "udp_punch", "dial", ("sid", {"peer_pk": b"\x01" * 32}))
        assert got == Result(True, reason="udp_punch.dial('sid', {'peer_pk': " + repr(b"\x01" * 32) + "})",
                             elapsed_ms=1.5)
        assert comps.calls == [("udp_punch", "dial", ("sid", {"peer_pk": b"\x01" * 32}))]
        # only this user may reach it
        assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(server.path).st_mode) & 0o077 == 0
    finally:
        await server.close()
    assert not server.path.exists()


async def test_the_methods_exceptions_are_raised_at_the_caller(short_dir: Path) -> None:
    server = DirectCallServer(short_dir / "a.sock", Components().call)
    await server.start()
    try:
        with pytest.raises(ValueError, match="lan says no"):
            await direct_calls.call(server.path, "lan", "fail", ())
        with pytest.raises(RuntimeError, match="Odd"):  # one pickle cannot carry: named, not lost
            await direct_calls.call(server.path, "lan", "odd", ())
        with pytest.raises(RuntimeError, match=r"lan\.unpicklable"):
            await direct_calls.call(server.path, "lan", "unpicklable", ())
        assert (await direct_calls.call(server.path, "lan", "status", ())).ok  # and it keeps serving
    finally:
        await server.close()


async def test_nobody_listening_is_unreachable(short_dir: Path) -> None:
    with pytest.raises(Unreachable):
        await direct_calls.call(short_dir / "none.sock", "lan", "status", ())
    stale = short_dir / "stale.sock"  # a killed actor's socket file: nobody accepts on it
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(Unreachable):
        await direct_calls.call(stale, "lan", "status", ())
    with pytest.raises(Unreachable):  # arguments pickle cannot carry never leave
        await direct_calls.call(stale, "lan", "status", (lambda: None,))


async def test_an_actor_gone_mid_call_is_unreachable_and_a_new_one_takes_over_its_socket(short_dir: Path) -> None:
    comps = Components()
    path = short_dir / "udp_punch.sock"
    server = DirectCallServer(path, comps.call)
    await server.start()
    pending = asyncio.ensure_future(direct_calls.call(path, "udp_punch", "hang", ()))
    while not comps.calls:
        await asyncio.sleep(0.01)
    await server.close()  # the actor dies with the call in flight
    with pytest.raises(Unreachable, match="no answer"):
        await pending
    again = DirectCallServer(path, Components().call)
    await again.start()  # the restarted actor binds the same path
    try:
        assert (await direct_calls.call(path, "udp_punch", "status", ())).ok
    finally:
        await again.close()


async def test_junk_on_the_socket_is_counted_and_dropped(short_dir: Path) -> None:
    server = DirectCallServer(short_dir / "j.sock", Components().call)
    await server.start()
    try:
        junks = (b"", b"\x00\x00", b"\xff\xff\xff\xff" + b"x" * 10, b"\x00\x00\x00\x05hello",
                 direct_calls._frame(5), direct_calls._frame(("lan",)))  # pickles, but not a call
        for junk in junks:
            reader, writer = await asyncio.open_unix_connection(str(server.path))
            writer.write(junk)
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
        assert server.errors == len(junks) and server.served == 0
        assert (await direct_calls.call(server.path, "lan", "status", ())).ok
    finally:
        await server.close()


@pytest.mark.parametrize("actor", ["coordinator", "a-plug-in-strategy-with-a-long-name"])
async def test_every_actor_gets_a_socket_under_the_deepest_state_dir_kept_in_place(
    short_dir: Path, actor: str
) -> None:
    """runtime_dir keeps a state dir in place while its sockets fit (else a short /tmp twin): that
    must hold for the direct-call sockets too, not only for sessions.sock (a state dir 85 characters
    long kept sessions.sock at 99 and put calls/coordinator.sock at 108, one past the limit)."""
    deepest = short_dir.resolve() / "y"
    while True:  # one character deeper at a time, until runtime_dir moves the sockets to /tmp
        deeper = deepest.parent / (deepest.name + "y")
        moved = runtime_paths.runtime_dir(deeper)
        if moved != deeper:
            moved.rmdir()  # the twin runtime_dir just made for it
            break
        deepest = deeper
    deepest.mkdir(parents=True, exist_ok=True)
    server = DirectCallServer(runtime_paths.call_socket(deepest, actor), Components().call)
    await server.start()
    try:
        got = await direct_calls.call(server.path, actor, "status", ())
        assert got.reason == f"{actor}.status()"
    finally:
        await server.close()
