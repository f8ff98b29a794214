"""The session owner: runs the encrypted handshake on transports the strategies hand over,
then pumps each session's bytes between the transport and the local stream.

It is the only place that touches session bytes; the coordinator tells it what
to expect over its control socket, and strategies pass connected sockets to it by
fd passing. Every session ends in a recorded outcome (done, failed with a reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from agent import ctlproto
from agent.handshake import HandshakeError, Initiator, Policy, Responder
from agent.netutil import connect_tcp, describe_error
from agent.session import PumpStats, SessionError, StreamCodec, pump, run_handshake
from agent.wire import encode_frame

log = logging.getLogger(__name__)

OPEN_OK = b"\x00"
OPEN_FAILED = b"\x01"
"""B's first sealed frame after the handshake: did the forward target accept the connection?"""

MAX_SESSIONS_KEPT = 256
"""Finished sessions kept for `punchthrough-ops sessions` (the oldest are forgotten first)."""


@dataclass
class SessionRecord:
    id: str
    role: str
    peer: str = ""
    target: str = ""
    path: str = ""
    state: str = "waiting"
    error: str = ""
    admitted_by: str = ""
    stats: PumpStats = field(default_factory=PumpStats)
    created: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "peer": self.peer,
            "target": self.target,
            "path": self.path,
            "state": self.state,
            "error": self.error,
            "admitted_by": self.admitted_by,
            "bytes_out": self.stats.bytes_out,
            "bytes_in": self.stats.bytes_in,
            "age": round(time.monotonic() - self.created, 3),
        }


class SessionOwner:
    def __init__(
        self,
        socket_path: Path,
        my_id: str,
        signing_key: SigningKey,
        policy_factory: Callable[[], Policy | None],
        on_admitted: Callable[[str, bytes, str], None] | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.socket_path = socket_path
        self.my_id = my_id
        self.signing_key = signing_key
        self.policy_factory = policy_factory
        self.on_admitted = on_admitted
        self.handshake_timeout = handshake_timeout
        self.sessions: dict[str, SessionRecord] = {}
        self._transports: dict[str, asyncio.Future[socket.socket]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server = ctlproto.ControlServer(socket_path, self._handle)

    async def start(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        await self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for fut in self._transports.values():
            if fut.done() and not fut.cancelled():
                fut.result().close()
            fut.cancel()

    def status(self) -> dict[str, Any]:
        active = sum(s.state in ("handshake", "open") for s in self.sessions.values())
        return {"active": active, "total": len(self.sessions), "sessions": self.session_list()}

    def session_list(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.sessions.values()]

    # ---- control requests -----------------------------------------------------------------

    async def _handle(self, req: dict[str, Any], fds: list[int]) -> Any:
        op = req.get("op")
        socks = [socket.socket(fileno=fd) for fd in fds]
        for s in socks:
            s.setblocking(False)
        try:
            if op == "list":
                return {"ok": True, "sessions": self.session_list()}
            if op == "transport" and len(socks) == 1:
                return self._on_transport(str(req.get("session", "")), socks.pop())
            if op == "initiate" and len(socks) == 1:
                return await self._initiate(req, socks.pop())
            if op == "respond" and len(socks) == 1:
                return self._respond(req, socks.pop())
            return {"ok": False, "error": f"bad request {op!r} with {len(fds)} fds"}
        finally:
            for s in socks:
                s.close()

    def _record(self, sid: str, role: str) -> SessionRecord:
        rec = self.sessions.get(sid)
        if rec is None:
            rec = self.sessions[sid] = SessionRecord(sid, role)
            while len(self.sessions) > MAX_SESSIONS_KEPT:
                oldest = next((k for k, s in self.sessions.items() if s.state in ("done", "failed")), None)
                if oldest is None:
                    break
                del self.sessions[oldest]
        return rec

    def _transport_future(self, sid: str) -> asyncio.Future[socket.socket]:
        fut = self._transports.get(sid)
        if fut is None:
            fut = self._transports[sid] = asyncio.get_running_loop().create_future()
        return fut

    def _on_transport(self, sid: str, sock: socket.socket) -> dict[str, Any]:
        """A strategy delivers a connected transport for an initiating session."""
        fut = self._transport_future(sid)
        if fut.done() or len(self._transports) > 1024:
            return {"ok": False, "error": "session already has a transport"}
        fut.set_result(sock)
        return {"ok": True}

    async def _initiate(self, req: dict[str, Any], local: socket.socket) -> dict[str, Any]:
        """A's side: wait for the transport, run the handshake, then pump in the background."""
        sid = str(req["session"])
        rec = self._record(sid, "initiator")
        rec.peer, rec.target, rec.path = str(req["peer"]), str(req.get("target", "")), str(req.get("path", ""))
        fut = self._transport_future(sid)
        try:
            transport = await asyncio.wait_for(fut, float(req.get("wait", 10.0)))
        except TimeoutError:
            rec.state, rec.error = "failed", "no transport arrived"
            return {"ok": False, "error": rec.error}
        finally:
            self._transports.pop(sid, None)
        rec.state = "handshake"
        try:
            machine = Initiator(
                self.my_id,
                self.signing_key,
                rec.peer,
                bytes(req["peer_pk"]),
                password=req.get("password"),
                target=rec.target,
                key_source=str(req.get("key_source", "expected")),
            )
            codec = await run_handshake(transport, machine, self.handshake_timeout)
            early = await self._await_open_result(transport, codec, rec)
        except (HandshakeError, SessionError, ValueError) as exc:
            rec.state, rec.error = "failed", str(exc)
            transport.close()
            return {"ok": False, "error": rec.error}
        rec.state = "open"
        self._spawn(self._pump(rec, transport, codec, local.dup(), early))
        return {"ok": True, "session": sid}

    async def _await_open_result(
        self, transport: socket.socket, codec: StreamCodec, rec: SessionRecord
    ) -> list[bytes | None]:
        """B's stream status; returns stream pieces that arrived in the same read."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.handshake_timeout + 10):
            pending = codec.decode(b"")
            while not pending:
                chunk = await loop.sock_recv(transport, 65536)
                if not chunk:
                    raise SessionError(f"peer {rec.peer} closed the session before opening the stream")
                pending = codec.decode(chunk)
        first = pending.pop(0)
        if first is None or first[:1] not in (OPEN_OK, OPEN_FAILED):
            raise SessionError(f"peer {rec.peer} sent no stream status")
        if first[:1] == OPEN_FAILED:
            raise SessionError(f"peer {rec.peer}: {first[1:201].decode('utf-8', 'replace')}")
        return pending

    def _respond(self, req: dict[str, Any], transport: socket.socket) -> dict[str, Any]:
        """B's side: a strategy delivers a transport from a peer that wants in."""
        sid = str(req["session"])
        rec = self._record(sid, "responder")
        rec.path = str(req.get("path", ""))
        rec.peer = str(req.get("peer", ""))
        self._spawn(self._serve_responder(rec, transport.dup()))
        return {"ok": True}

    async def _serve_responder(self, rec: SessionRecord, transport: socket.socket) -> None:
        policy = self.policy_factory()
        if policy is None:
            rec.state, rec.error = "failed", "this agent admits nobody (no --allow and no password)"
            transport.close()
            return
        rec.state = "handshake"
        machine = Responder(self.my_id, self.signing_key, policy)
        loop = asyncio.get_running_loop()
        try:
            codec = await run_handshake(transport, machine, self.handshake_timeout)
        except HandshakeError as exc:
            rec.state, rec.error = "failed", exc.reason
            for reply in exc.reply:
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(transport, encode_frame(reply))
            transport.close()
            log.info("session %s refused: %s", rec.id, exc.reason)
            return
        except SessionError as exc:
            rec.state, rec.error = "failed", str(exc)
            transport.close()
            return
        rec.peer = machine.peer_id or ""
        rec.target = machine.target or ""
        rec.admitted_by = machine.admitted_by or ""
        if self.on_admitted and machine.peer_pk and machine.admitted_by == "first contact":
            self.on_admitted(rec.peer, machine.peer_pk, rec.admitted_by)
        try:
            local = await connect_tcp(rec.target, timeout=5.0)
        except (OSError, TimeoutError, ValueError) as exc:
            rec.state, rec.error = "failed", f"target {rec.target}: {describe_error(exc)}"
            with contextlib.suppress(OSError, SessionError):
                frames = [*codec.encode(OPEN_FAILED + rec.error.encode()), codec.encode_eof()]
                await loop.sock_sendall(transport, b"".join(frames))
            transport.close()
            return
        try:
            await loop.sock_sendall(transport, codec.encode(OPEN_OK)[0])
        except OSError as exc:
            rec.state, rec.error = "failed", f"peer went away: {describe_error(exc)}"
            transport.close()
            local.close()
            return
        rec.state = "open"
        await self._pump(rec, transport, codec, local)

    async def _pump(
        self,
        rec: SessionRecord,
        transport: socket.socket,
        codec: StreamCodec,
        local: socket.socket,
        early: list[bytes | None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            for piece in early or []:
                if piece is None:
                    local.shutdown(socket.SHUT_WR)
                else:
                    await loop.sock_sendall(local, piece)
                    rec.stats.bytes_in += len(piece)
            await pump(transport, codec, local, rec.stats)
            rec.state = "done"
        except SessionError as exc:
            rec.state, rec.error = "failed", str(exc)
        except OSError as exc:
            rec.state, rec.error = "failed", describe_error(exc)
        finally:
            transport.close()
            with contextlib.suppress(OSError):
                local.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
