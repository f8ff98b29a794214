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
from pathlib import Path
from typing import Any

from agent.common.netutil import connect_tcp, describe_error
from agent.proto import rendezvous_pb2 as pb
from agent.strategies.handover import handover
from agent.strategies.tcp_direct import CANCELLED
from agent.strategies.tracking import Tracked
from agent.wire import messages
from agent.wire.frames import encode_frame

DEFAULT_RELAY_PORT = 21117


class RelayStrategy(Tracked):
    def __init__(self, sessions_socket: Path, relay_key: str = "", timeout: float = 5.0) -> None:
        super().__init__()
        self.sessions_socket = sessions_socket
        self.relay_key = relay_key
        self.timeout = timeout
        self.attempts = 0
        self.failures = 0

    async def dial(self, session: str, *args: Any) -> dict[str, Any]:
        return await self._track(session, self._dial(session, *args), CANCELLED)

    async def _dial(
        self,
        session: str,
        relay: str,
        uuid: str,
        ticket: bytes,
        relay_name: str,
        peer_id: str,
        role: str,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Connect to `relay`, join `uuid` with the server's `ticket` (issued for the relay the server
        called `relay_name`), hand the socket to the session owner. Never raises.

        `role` says which side of the handshake the session owner must run on it:
        "initiator" (we asked for the peer) or "responder" (the peer asked for us);
        `meta` goes along to the session owner (the peer's key).
        """
        self.attempts += 1
        started = time.monotonic()
        try:
            sock = await connect_tcp(relay, DEFAULT_RELAY_PORT, self.timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            self.failures += 1
            return {"ok": False, "reason": f"relay {relay}: {describe_error(exc)}"}
        try:
            request = pb.RequestRelay(
                id=peer_id,
                uuid=uuid,
                licence_key=self.relay_key,
                conn_type=pb.PORT_FORWARD,
                ticket=ticket,
                relay_server=relay_name,
            )
            await asyncio.get_running_loop().sock_sendall(sock, encode_frame(messages.build(request_relay=request)))
        except OSError as exc:
            sock.close()
            self.failures += 1
            return {"ok": False, "reason": f"relay {relay}: {describe_error(exc)}"}
        op = "transport" if role == "initiator" else "respond"
        result = await handover(self.sessions_socket, sock, op, session, "relay", meta)
        if not result["ok"]:
            self.failures += 1
            return result
        return {"ok": True, "elapsed_ms": round((time.monotonic() - started) * 1000, 1)}

    def status(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "failures": self.failures}
