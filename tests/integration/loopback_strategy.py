"""A trivial strategy, written as a plug-in would be: one file, one registry entry (`ENTRY`).

B's component listens on a loopback port (published in `PORTS` under its agent's ID, this process
only) and hands what it accepts to its session owner; A's step of the race dials that port with
the peer's pinned key, through A's component. `DIAL_DELAY` holds A's dial back, so a test can see
it lose the race and be cancelled.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Any

from agent.identity import load_or_create
from agent.strategies.base import CANCELLED, RaceSteps, Remote, Result, StrategyEnv
from agent.strategies.handover import handover
from agent.strategies.registry import StrategyEntry
from agent.strategies.tracking import Tracked

NAME = "loopback"
PORTS: dict[str, int] = {}
DIAL_DELAY = 0.0


@dataclass(frozen=True)
class LoopbackDial:
    session: str
    port: int
    meta: dict[str, Any]


class LoopbackStrategy(Tracked):
    def __init__(self, env: StrategyEnv) -> None:
        super().__init__()
        self.env = env
        self.my_id = load_or_create(env.state_dir).peer_id
        self.dials = 0
        self.stopped = 0
        """Dials stopped before they connected (the race was over)."""
        self.cancel_calls: list[str] = []
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        self._listener = sock
        PORTS[self.my_id] = sock.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def close(self) -> None:
        PORTS.pop(self.my_id, None)
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            conn, _addr = await loop.sock_accept(self._listener)
            n += 1
            conn.setblocking(False)
            await handover(self.env.sessions_socket, conn, "respond", f"{NAME}-{n}", NAME, {"peer_ip": "127.0.0.1"})

    def status(self) -> dict[str, Any]:
        return {"dials": self.dials, "stopped": self.stopped}

    def cancel(self, session: str) -> int:
        self.cancel_calls.append(session)
        return super().cancel(session)

    async def dial(self, req: LoopbackDial) -> Result:
        return await self._track(req.session, self._dial(req), CANCELLED)

    async def _dial(self, req: LoopbackDial) -> Result:
        self.dials += 1
        started = time.monotonic()
        try:
            await asyncio.sleep(DIAL_DELAY)
        except asyncio.CancelledError:
            self.stopped += 1
            raise
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", req.port))
        except OSError as exc:
            sock.close()
            return Result.failed(f"{NAME}: {exc}")
        result = await handover(self.env.sessions_socket, sock, "transport", req.session, NAME, req.meta)
        return Result(result.ok, result.reason, round((time.monotonic() - started) * 1000, 1))


class LoopbackRemote(Remote):
    async def dial(self, req: LoopbackDial) -> Result:
        return await self._result("dial", req)


async def race(steps: RaceSteps) -> None:
    port = PORTS.get(steps.peer)
    key = steps.pinned_key()
    if port is None or key is None:
        steps.skipped(NAME, "no loopback port" if port is None else "no key pinned for the peer yet")
        return
    steps.use_key(NAME, key, "pinned")
    steps.running(NAME)
    result = await LoopbackRemote(steps.ref(NAME)).dial(
        LoopbackDial(steps.session, port, {"peer_pk": key, "key_source": "pinned"})
    )
    if result.ok:
        steps.connected(NAME)
    else:
        steps.error(NAME, result.reason)


ENTRY = StrategyEntry(NAME, LoopbackStrategy, LoopbackRemote, race=race)
