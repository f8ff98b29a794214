"""Handing a connected transport to the session owner: the one step every strategy ends with."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from agent.common import ctlproto
from agent.common.netutil import describe_error
from agent.strategies.base import Result

HANDOVER_PATIENCE = 5.0
"""Seconds to wait for a restarting session owner before giving the transport up."""


async def handover(
    sessions_socket: Path,
    sock: socket.socket,
    op: str,
    session: str,
    path: str,
    meta: dict[str, Any] | None = None,
    extra: tuple[socket.socket, ...] = (),
) -> Result:
    """Pass `sock` by fd (op "transport" for an initiator, "respond" for a responder); our copies are closed.

    `extra` sockets travel along (udp_punch sends its KCP notice socket, which tells the session
    owner why a KCP connection ended). Never raises: a failure is in the Result.
    """
    try:
        reply = await ctlproto.acall(
            sessions_socket,
            {**(meta or {}), "op": op, "session": session, "path": path},
            [sock.fileno(), *(s.fileno() for s in extra)],
            patience=HANDOVER_PATIENCE,
        )
    except (OSError, TimeoutError, ctlproto.ControlError) as exc:
        reply = {"ok": False, "error": f"session owner unavailable: {describe_error(exc)}"}
    finally:
        sock.close()
        for s in extra:
            s.close()
    if not reply.get("ok"):
        return Result.failed(str(reply.get("error", "session owner refused the transport")))
    return Result(True)
