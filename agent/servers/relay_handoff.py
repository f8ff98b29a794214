"""Hand relay connections to the replica that owns their uuid, by fd passing.

Replicas on one host share the relay port with SO_REUSEPORT, and the kernel spreads
connections by their address 4-tuple, so the two halves of a pair usually land in
different processes. Each replica therefore reads the first frame itself and, when
`owner_index(uuid, N)` names another replica, passes the socket to it over an
abstract Unix SOCK_SEQPACKET socket (SCM_RIGHTS) together with the uuid. Both halves
end in the same process, which pairs them and pumps the bytes. The owner is a pure
function of the uuid, so replicas need no shared state; a handoff costs one sendmsg
and one recvmsg. Only processes of our own user may hand us sockets (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable

from agent.servers import relay_core as core

log = logging.getLogger("punchthrough.relay.handoff")

Admit = Callable[[socket.socket, str, str], None]

_CRED = struct.Struct("3i")


class Handoff:
    """Router for a RelayServer that is replica `index` of the co-located group `names`."""

    def __init__(self, names: list[str], index: int, *, owner_wait: float = 2.0) -> None:
        if not names or not 0 <= index < len(names) or len(set(names)) != len(names):
            raise ValueError("need distinct names and an index into them")
        self.names = names
        self.index = index
        self.owner_wait = owner_wait
        self.sent = 0
        self.received = 0
        self.rejected = 0
        self._admit: Admit | None = None
        self._srv: socket.socket | None = None
        self._peers: set[socket.socket] = set()
        self._out: dict[int, socket.socket] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def address(name: str) -> str:
        return "\0" + name

    # ------------------------------------------------------------------ receiving
    async def start(self, admit: Admit) -> None:
        """Listen for sockets handed to us; `admit(sock, uuid, peer)` takes each one."""
        self._loop = asyncio.get_running_loop()
        self._admit = admit
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        srv.bind(self.address(self.names[self.index]))
        srv.listen(64)
        srv.setblocking(False)
        self._srv = srv
        self._loop.add_reader(srv.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        assert self._srv is not None and self._loop is not None
        while True:
            try:
                conn, _ = self._srv.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("handoff accept failed: %s", exc.strerror)
                return
            _pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if uid != os.geteuid():
                log.warning("handoff: refused a connection from uid %d", uid)
                self.rejected += 1
                conn.close()
                continue
            conn.setblocking(False)
            self._peers.add(conn)
            self._loop.add_reader(conn.fileno(), self._on_message, conn)

    def _close_peer(self, conn: socket.socket) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(conn.fileno())
        self._peers.discard(conn)
        conn.close()

    def _on_message(self, conn: socket.socket) -> None:
        for _ in range(64):
            try:
                msg, fds, flags, _ = socket.recv_fds(conn, core.HANDOFF_MAX + 1, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_peer(conn)
                return
            if not msg and not fds:
                self._close_peer(conn)
                return
            self._take(msg, fds, flags)

    def _take(self, msg: bytes, fds: list[int], flags: int) -> None:
        try:
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != 1:
                raise ValueError("expected exactly one descriptor")
            uuid, peer = core.decode_handoff(msg)
            sock = socket.socket(fileno=fds[0])
        except (ValueError, OSError) as exc:
            self.rejected += 1
            log.warning("handoff: bad message (%s)", exc)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            self.rejected += 1
            sock.close()
            return
        self.received += 1
        assert self._admit is not None
        self._admit(sock, uuid, peer)

    # ------------------------------------------------------------------ routing
    def owner(self, uuid: str) -> int:
        return core.owner_index(uuid, len(self.names))

    def is_local(self, uuid: str) -> bool:
        return self.owner(uuid) == self.index

    async def _connect(self, idx: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.owner_wait
        while True:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.setblocking(False)
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.05)):
                    await loop.sock_connect(c, self.address(self.names[idx]))
                return c
            except (OSError, TimeoutError):
                c.close()
                # The owner may be restarting (Ray brings it back in ~0.4 s): retry briefly.
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    async def _writable(self, c: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_writer(c.fileno(), fut.set_result, None)
        try:
            await fut
        finally:
            loop.remove_writer(c.fileno())

    async def forward(self, uuid: str, sock: socket.socket, peer: str) -> bool:
        idx = self.owner(uuid)
        msg = core.encode_handoff(uuid, peer)
        lock = self._locks.setdefault(idx, asyncio.Lock())
        async with lock:
            for _attempt in range(2):
                c = self._out.get(idx)
                try:
                    if c is None:
                        c = self._out[idx] = await self._connect(idx)
                    async with asyncio.timeout(self.owner_wait):
                        while True:
                            try:
                                socket.send_fds(c, [msg], [sock.fileno()])
                                break
                            except BlockingIOError:
                                await self._writable(c)
                    self.sent += 1
                    return True
                except (OSError, TimeoutError) as exc:
                    log.debug("handoff to replica %d failed: %s", idx, exc)
                    stale = self._out.pop(idx, None)
                    if stale is not None:
                        stale.close()
        return False

    async def close(self) -> None:
        loop = self._loop
        if self._srv is not None:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self._srv.fileno())
            self._srv.close()
            self._srv = None
        for conn in list(self._peers):
            self._close_peer(conn)
        for c in self._out.values():
            c.close()
        self._out.clear()

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received, "rejected": self.rejected}
