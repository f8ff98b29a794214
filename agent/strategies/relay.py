"""The relay strategy: reach the peer through a relay server by a shared uuid.

Both sides connect to the relay and send RequestRelay{uuid, ticket} as the first
frame (the ticket is the rendezvous server's, signed for the uuid and the relay as the
server named it, which travels along in relay_server); the relay pairs them and then
copies bytes. The connected socket goes to the
session owner (fd passing) which runs the encrypted handshake: the relay only
ever sees ciphertext.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.netutil import connect_tcp, describe_error
from agent.proto import rendezvous_pb2 as pb
from agent.strategies.base import CANCELLED, Remote, Result
from agent.strategies.handover import handover
from agent.strategies.tracking import Tracked
from agent.wire import messages
from agent.wire.frames import encode_frame
from agent.wire.ports import RELAY_PORT


@dataclass(frozen=True)
class RelayDial:
    """Join `uuid` at `relay` with the server's `ticket` (issued for the relay the server called
    `relay_name`). `role` says which side of the handshake the session owner runs on the transport:
    "initiator" (we asked for the peer) or "responder" (the peer asked for us)."""

    session: str
    relay: str
    uuid: str
    ticket: bytes
    relay_name: str
    peer_id: str
    role: str
    meta: dict[str, Any]


class RelayStrategy(Tracked):
    def __init__(self, sessions_socket: Path, relay_key: str = "", timeout: float = 5.0) -> None:
        super().__init__()
        self.sessions_socket = sessions_socket
        self.relay_key = relay_key
        self.timeout = timeout
        self.attempts = 0
        self.failures = 0

    async def dial(self, req: RelayDial) -> Result:
        return await self._track(req.session, self._dial(req), CANCELLED)

    async def _dial(self, req: RelayDial) -> Result:
        """Connect to the relay, join the uuid, hand the socket to the session owner. Never raises."""
        relay = req.relay
        self.attempts += 1
        started = time.monotonic()
        try:
            sock = await connect_tcp(relay, RELAY_PORT, self.timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            self.failures += 1
            return Result.failed(f"relay {relay}: {describe_error(exc)}")
        try:
            request = pb.RequestRelay(
                id=req.peer_id,
                uuid=req.uuid,
                licence_key=self.relay_key,
                conn_type=pb.PORT_FORWARD,
                ticket=req.ticket,
                relay_server=req.relay_name,
            )
            await asyncio.get_running_loop().sock_sendall(sock, encode_frame(messages.build(request_relay=request)))
        except OSError as exc:
            sock.close()
            self.failures += 1
            return Result.failed(f"relay {relay}: {describe_error(exc)}")
        op = "transport" if req.role == "initiator" else "respond"
        result = await handover(self.sessions_socket, sock, op, req.session, "relay", req.meta)
        if not result.ok:
            self.failures += 1
            return result
        return Result(True, elapsed_ms=round((time.monotonic() - started) * 1000, 1))

    def status(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "failures": self.failures}


class RelayRemote(Remote):
    async def dial(self, req: RelayDial) -> Result:
        return await self._result("dial", req)
