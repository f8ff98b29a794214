"""`connect -L` served inside the agent: the session owner accepts each connection itself.

Why: a connection accepted by the `connect` client cost three processes' work before its first
byte moved: the client called the coordinator (1.9 ms median on a busy 2-core host), which called
the session owner (2.4 ms more), which opened the stream on the link (3.4 ms, the round trip to
B included). `ssh -L` accepts in the process that holds the connection. So does this: the client
binds the port (its errors stay the client's), hands the listening socket to the agent once, and
the owner accepts; a connection to a peer with a running link is a stream at once, with no call
between processes. One without a usable link goes to the coordinator as the client's own would
have (a race for a link, with the client's --path and password).

The client holds the other end of a socket pair (`notices`): the owner writes one line per failed
connection there (the client prints it, as it did when it opened them), and stops forwarding when
the client goes away (end of file), so the port closes with the client. The key a stream may use
is decided per connection (a pin that changed applies to the next connection), as the coordinator
decides it for `pipe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.wire.peer_ids import fingerprint

log = logging.getLogger(__name__)

OpenOnLink = Callable[[dict[str, Any], socket.socket], Awaitable[dict[str, Any]]]
"""The owner's stream on a running link (its "stream" request): {"no_link": True} if none may take it."""
OpenRaced = Callable[[dict[str, Any], int], Awaitable[Any]]
"""The coordinator's "open" request with this connection's fd: a race for a new link."""
NOTICE_MAX = 1000


@dataclass
class Forward:
    id: str
    peer: str
    target: str
    want_spec: str
    """The fingerprint the user named (`ID=SHA256:...`), else "" (the pin, read per connection)."""
    paths: list[str]
    open_request: dict[str, Any]
    listener: socket.socket
    notices: socket.socket
    listen: str = ""
    accepted: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "peer": self.peer,
            "target": self.target,
            "listen": self.listen,
            "accepted": self.accepted,
            "failed": self.failed,
        }


class Forwards:
    """The owner's forwards, one task each (plus one per connection while it opens)."""

    def __init__(
        self,
        on_link: OpenOnLink,
        open_raced: OpenRaced | None,
        pinned: Callable[[str], bytes | None] | None,
        spawn: Callable[[Awaitable[None]], Any],
    ) -> None:
        self.on_link = on_link
        self.open_raced = open_raced
        self.pinned = pinned
        self.spawn = spawn
        self.running: dict[str, Forward] = {}

    def start(self, req: dict[str, Any], listener: socket.socket, notices: socket.socket) -> dict[str, Any]:
        """Serve `listener` for the request's peer and target until `notices` ends."""
        peer, target = str(req.get("peer", "")), str(req.get("target", ""))
        paths, open_request = req.get("paths"), req.get("open")
        if not peer or not target or not isinstance(paths, list) or not isinstance(open_request, dict):
            listener.close()
            notices.close()
            return {"ok": False, "error": "a forward needs peer, target, paths and the open request"}
        fwd = Forward(
            uuidlib.uuid4().hex[:12],
            peer,
            target,
            str(req.get("want_spec", "")),
            [str(p) for p in paths],
            open_request,
            listener,
            notices,
        )
        host, port = listener.getsockname()[:2]
        fwd.listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        listener.setblocking(False)
        notices.setblocking(False)
        self.running[fwd.id] = fwd
        self.spawn(self._run(fwd))
        log.info("forwarding %s to %s on peer %s (accepted here)", fwd.listen, target, peer)
        return {"ok": True, "forward": fwd.id}

    async def _run(self, fwd: Forward) -> None:
        loop = asyncio.get_running_loop()
        serving = asyncio.ensure_future(self._accept_loop(fwd))
        try:
            while await loop.sock_recv(fwd.notices, 4096):
                pass  # the client says nothing; its end of file (or death) ends the forward
        except OSError:
            pass
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            self.running.pop(fwd.id, None)
            fwd.listener.close()
            fwd.notices.close()
            log.info("forward %s to %s ended (the client went away)", fwd.id, fwd.target)

    async def _accept_loop(self, fwd: Forward) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(fwd.listener)
            except OSError as exc:
                self._notice(fwd, f"cannot accept on {fwd.listen}: {exc.strerror or exc}")
                await asyncio.sleep(0.5)  # EMFILE and the like: do not spin
                continue
            fwd.accepted += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.spawn(self._one(fwd, conn))

    async def _one(self, fwd: Forward, conn: socket.socket) -> None:
        try:
            want = fwd.want_spec
            if not want and self.pinned is not None and (key := self.pinned(fwd.peer)) is not None:
                want = fingerprint(key)
            request = {
                "session": uuidlib.uuid4().hex[:12],
                "peer": fwd.peer,
                "target": fwd.target,
                "want_key": want,
                "paths": fwd.paths,
            }
            reply: Any = await self.on_link(request, conn)
            if isinstance(reply, dict) and reply.get("no_link"):
                if self.open_raced is None:
                    reply = {"ok": False, "error": "no link to the peer, and no coordinator to race for one"}
                else:
                    reply = await self.open_raced(fwd.open_request, conn.fileno())
            if not isinstance(reply, dict) or not reply.get("ok"):
                fwd.failed += 1
                why = reply.get("error", "the agent refused") if isinstance(reply, dict) else "no answer"
                self._notice(fwd, str(why))
        except Exception as exc:  # one connection's failure must not end the forward
            fwd.failed += 1
            self._notice(fwd, f"stream to {fwd.peer} failed: {exc or type(exc).__name__}")
        finally:
            conn.close()  # the link (or the race) holds its own copy

    @staticmethod
    def _notice(fwd: Forward, line: str) -> None:
        text = " ".join(line.split())[:NOTICE_MAX] + "\n"
        with contextlib.suppress(OSError):  # a full buffer drops the line: the client is not reading
            fwd.notices.send(text.encode())
