"""UDP hole punching with KCP on the punched socket (seed 6.11, the Pro server's UDP path).

A reserves a UDP socket and learns its public mapping from the rendezvous server
(a padded TestNatRequest, so the answer is never larger than the request), then
asks for the peer with that port in PunchHoleRequest.udp_port. B answers from a
fresh UDP socket with PunchHoleSent as a datagram, so the server learns B's UDP
mapping and hands it to A (is_udp). Both punch on RustDesk's schedule; then KCP
runs on the socket. This actor keeps pumping KCP (the pump must live where the UDP
socket is) and hands the session owner one end of a socketpair carrying the stream,
plus the transport's notice socket: one line when KCP ends (why it failed, or
"closed"), or EOF without a line when this actor dies. So a KCP session that ends
with its pump says why at the client, instead of looking like a cut connection.

A datagram from the peer's IP on another port is taken too (peer-reflexive): a
symmetric NAT facing a full cone still meets, where RustDesk gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.netutil import addr_infos, describe_error
from agent.common.tasks import TaskSet
from agent.kcp.stream import KcpError, KcpTransport
from agent.proto import rendezvous_pb2 as pb
from agent.strategies import birthday
from agent.strategies.base import CANCELLED, Answer, Remote, Result
from agent.strategies.birthday_core import Budget, Limiter, probe_ports
from agent.strategies.handover import handover
from agent.strategies.punch_schedule import PunchResult, PunchSchedule, PunchTimeout, punch
from agent.strategies.tracking import Tracked
from agent.wire import addr as addrmod
from agent.wire import messages
from agent.wire.addr import SockAddr
from agent.wire.nat_behavior import PREDICTED_PORTS, NatBehavior, birthday_role, predicted_ports

PROBE_PADDING = 32
PROBE_GIVE_UP = 2.0
MAX_PREPARED = 64
MAX_TRANSPORTS = 256
BIRTHDAY_GRACE = 2.0
"""Seconds either side waits beyond the probing for the answer that meets (a WAN round trip or more)."""
BIRTHDAY_KCP_BUDGET = 3.0
CLOSE_LINGER = 2.0
"""A finished KCP transport keeps its socket this long (a late duplicate FIN still gets its RST)."""


@dataclass(frozen=True)
class UdpDial:
    """A's punch from the socket prepared for `session` to the peer's UDP mapping, then KCP."""

    session: str
    peer_addr: str
    budget: float
    meta: dict[str, Any]
    predict: tuple[int, ...] = ()
    """More ports of the peer's IP to punch: where its sequential NAT maps its punch socket next."""
    birthday: str = ""
    """"spray" or "probe": meet a random-port symmetric NAT by birthday probing (birthday_core)."""


class UdpPunchStrategy(Tracked):
    name = "udp_punch"

    def __init__(
        self,
        sessions_socket: Path,
        server: tuple[str, int],
        version: str = "punchthrough",
        birthday_budget: Budget | None = None,
        birthday_interval: float = 30.0,
    ) -> None:
        super().__init__()
        self.birthday_budget = birthday_budget or Budget()
        self.birthday_limiter = Limiter(per_peer_interval=birthday_interval)
        self.birthdays = {"tried": 0, "met": 0}
        self.sessions_socket = sessions_socket
        self.server = server
        self.version = version
        self._prepared: dict[str, socket.socket] = {}
        self._transports: set[KcpTransport] = set()
        self._tasks = TaskSet()
        self.attempts = 0
        self.failures = 0
        self.predicted = 0
        """Punches that also went to the ports a sequential NAT was predicted to give the peer."""

    def status(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "failures": self.failures,
            "predicted": self.predicted,
            "birthday": {
                **self.birthdays,
                "refused": self.birthday_limiter.refused,
                "budget": self.birthday_budget.describe(),
            },
            "kcp_sessions": len(self._transports),
            "kcp": [dataclasses.asdict(t.stats()) for t in list(self._transports)[:16]],
        }

    async def close(self) -> None:
        for sock in self._prepared.values():
            sock.close()
        for t in list(self._transports):
            with contextlib.suppress(Exception):
                await t.close(linger=0)
        await self._tasks.close()

    async def _server_addr(self) -> tuple[str, int]:
        infos = await addr_infos(self.server[0], self.server[1], socket.SOCK_DGRAM)
        return str(infos[0][1][0]), int(infos[0][1][1])

    # ---- A --------------------------------------------------------------------------------

    async def prepare(self, session: str) -> int:
        """A UDP socket for `session` and its public port as the server sees it (0 if unknown)."""
        server = await self._server_addr()
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        request = messages.build(test_nat_request=pb.TestNatRequest(padding=bytes(PROBE_PADDING)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROBE_GIVE_UP
        gap = 0.02
        port = 0
        while not port and loop.time() < deadline:
            with contextlib.suppress(OSError):
                sock.sendto(request, server)
            try:
                async with asyncio.timeout(min(gap, max(0.0, deadline - loop.time()))):
                    data, src = await loop.sock_recvfrom(sock, 2048)
            except (TimeoutError, OSError):
                gap = min(gap * 1.5, 0.2)
                continue
            if src[:2] != server:
                continue
            with contextlib.suppress(messages.MessageError):
                kind, msg = messages.parse(data)
                if kind == "test_nat_response" and 0 < msg.port <= 0xFFFF:
                    port = int(msg.port)
        if not port:
            sock.close()
            return 0
        while len(self._prepared) >= MAX_PREPARED:
            self._prepared.pop(next(iter(self._prepared))).close()
        self._prepared[session] = sock
        return port

    def release(self, session: str) -> None:
        sock = self._prepared.pop(session, None)
        if sock is not None:
            sock.close()

    async def dial(self, req: UdpDial) -> Result:
        return await self._track(req.session, self._dial(req), CANCELLED)

    async def answer(self, req: Answer) -> Result:
        return await self._track(req.session, self._answer(req), CANCELLED)

    def cancel(self, session: str) -> int:
        self.release(session)
        return super().cancel(session)

    async def _dial(self, req: UdpDial) -> Result:
        sock = self._prepared.pop(req.session, None)
        if sock is None:
            return Result.failed("udp_punch: no UDP socket prepared")
        if req.birthday in ("spray", "probe"):
            return await self._birthday(sock, req.session, req.peer_addr, req.birthday, req.meta, listen=False)
        return await self._run(
            sock, req.session, req.peer_addr, req.budget, req.meta, listen=False, predict=req.predict
        )

    # ---- B --------------------------------------------------------------------------------

    async def _answer(self, req: Answer) -> Result:
        """Tell the server our UDP mapping (PunchHoleSent as a datagram), then punch to A's UDP port."""
        push = req.push
        server = await self._server_addr()
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        sent = pb.PunchHoleSent(
            socket_addr=bytes(push.socket_addr),
            id=req.my_id,
            relay_server=req.relay,
            nat_type=req.nat_type,  # type: ignore[arg-type]
            version=self.version,
            answer_token=bytes(push.answer_token),
        )
        sent.nat_behavior.ParseFromString(req.nat_behavior)
        datagram = messages.build(punch_hole_sent=sent)
        ours = NatBehavior.from_wire(req.nat_behavior)
        theirs = NatBehavior.from_pb(push.nat_behavior)
        role = birthday_role(ours, theirs) if push.birthday else None
        if push.birthday and role is None:
            sock.close()
            return Result.failed("udp_punch: asked for birthday probing, but our NATs do not call for it")
        with contextlib.suppress(OSError):
            sock.sendto(datagram, server)
        # As RustDesk: two more copies 10-29 ms apart (UDP may lose one), but while we punch: waiting
        # for them first held every UDP punch back by 20-58 ms.
        self._tasks.spawn(_copies(sock, datagram, server))
        a = addrmod.decode(bytes(push.socket_addr))
        peer = f"[{a.ip}]:{push.udp_port}" if a.ip.version == 6 else f"{a.ip}:{push.udp_port}"
        if role is not None:
            return await self._birthday(sock, req.session, peer, role, req.meta, listen=True)
        predict = predicted_ports(push.udp_port, theirs, ours)
        return await self._run(sock, req.session, peer, req.budget, req.meta, listen=True, predict=tuple(predict))

    async def _birthday(
        self, sock: socket.socket, session: str, peer_addr: str, role: str, meta: dict[str, Any], listen: bool
    ) -> Result:
        """Meet a random-port symmetric NAT (agent/strategies/birthday.py), within the budget and the
        limiter's pace (a peer we admit, at most once per interval), then KCP as after a punch."""
        started = time.monotonic()
        peer = addrmod.parse_sockaddr(peer_addr)
        key = bytes(meta.get("binding_pk") or meta.get("peer_pk") or b"").hex() or str(peer.ip)
        refused = self.birthday_limiter.start(key, started) if self.birthday_limiter.per_peer_interval else "off"
        if refused:
            sock.close()
            return Result.failed(f"udp_punch: {refused}")
        self.attempts += 1
        self.birthdays["tried"] += 1
        budget = self.birthday_budget
        socks = [sock]
        try:
            seconds = budget.seconds + BIRTHDAY_GRACE
            if role == "spray":
                any_ip = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
                for _ in range(budget.sockets - 1):
                    extra = socket.socket(sock.family, socket.SOCK_DGRAM)
                    socks.append(extra)
                    extra.bind((any_ip, 0))
                index, result = await birthday.spray(
                    socks, peer.as_tuple(), listen=listen, seconds=seconds, refresh=budget.refresh
                )
            else:
                ports = probe_ports(budget.probes, random.SystemRandom())
                index, result = 0, await birthday.probe(
                    sock, str(peer.ip), ports, budget.rate, listen=listen, seconds=seconds
                )
            won = socks.pop(index)
        except (PunchTimeout, OSError) as exc:
            self.failures += 1
            why = str(exc) if isinstance(exc, PunchTimeout) else describe_error(exc)
            return Result.failed(f"udp_punch (birthday {role}) with {peer_addr}: {why}")
        finally:
            self.birthday_limiter.done()
            for other in socks:
                other.close()
        self.birthdays["met"] += 1
        return await self._transport(won, session, result, meta, listen, started, BIRTHDAY_KCP_BUDGET)

    # ---- both -----------------------------------------------------------------------------

    async def _run(
        self,
        sock: socket.socket,
        session: str,
        peer_addr: str,
        budget: float,
        meta: dict[str, Any],
        listen: bool,
        predict: tuple[int, ...] = (),
    ) -> Result:
        self.attempts += 1
        started = time.monotonic()
        peer = addrmod.parse_sockaddr(peer_addr)
        if predict:
            self.predicted += 1
        also = tuple(SockAddr(peer.ip, port).as_tuple() for port in predict[:PREDICTED_PORTS])
        try:
            result = await punch(
                sock,
                peer.as_tuple(),
                listen=listen,
                schedule=PunchSchedule(deadline=budget),
                peer_reflexive=True,
                also=also,
            )
        except (PunchTimeout, OSError) as exc:
            sock.close()
            self.failures += 1
            return Result.failed(f"udp_punch to {peer_addr}: {describe_error(exc)}")
        left = max(0.5, budget - (time.monotonic() - started))
        return await self._transport(sock, session, result, meta, listen, started, left)

    async def _transport(
        self,
        sock: socket.socket,
        session: str,
        result: PunchResult,
        meta: dict[str, Any],
        listen: bool,
        started: float,
        left: float,
    ) -> Result:
        """KCP on the punched socket, handed to the session owner; this actor keeps pumping it."""
        try:
            if listen:
                transport = await KcpTransport.accept(sock, left, first_datagram=result.first_datagram)
            else:
                transport = await KcpTransport.connect(sock, result.peer_addr, left)
        except (KcpError, OSError, TimeoutError) as exc:
            sock.close()
            self.failures += 1
            return Result.failed(f"udp_punch to {result.peer_addr[0]}:{result.peer_addr[1]}: {describe_error(exc)}")
        stream = transport.stream_socket()
        notice = transport.notice_socket()
        if len(self._transports) >= MAX_TRANSPORTS:
            stream.close()
            notice.close()
            await transport.close(linger=0)
            return Result.failed("udp_punch: too many KCP sessions")
        self._transports.add(transport)
        self._watch(transport)
        op = "respond" if listen else "transport"
        # our copies are closed by the handover; KCP ends when the session owner closes its copy
        handed = await handover(self.sessions_socket, stream, op, session, self.name, meta, extra=(notice,))
        if not handed.ok:
            self.failures += 1
            return handed
        return Result(True, elapsed_ms=round((time.monotonic() - started) * 1000, 1))

    def _watch(self, transport: KcpTransport) -> None:
        async def reap() -> None:
            """Once the connection is over, release its UDP socket and stream ends (a done transport
            keeps them until `close()`)."""
            with contextlib.suppress(Exception):
                await transport.wait_closed()
                await asyncio.sleep(CLOSE_LINGER)
                await transport.close(linger=0)
            self._transports.discard(transport)

        self._tasks.spawn(reap())


async def _copies(sock: socket.socket, datagram: bytes, server: tuple[str, int], copies: int = 2) -> None:
    """Send `datagram` again `copies` times, 10-29 ms apart; a socket closed meanwhile ends it quietly
    (a closed Python socket refuses the call, it never reaches a reused descriptor)."""
    for _ in range(copies):
        await asyncio.sleep(random.uniform(0.01, 0.029))
        try:
            sock.sendto(datagram, server)
        except OSError:
            return


class UdpPunchRemote(Remote):
    async def prepare(self, session: str) -> int:
        """A UDP socket for `session`; its public port as the server sees it (0: no UDP)."""
        return int(await self.ref.call("prepare", session))

    async def release(self, session: str) -> None:
        await self.ref.call("release", session)

    async def dial(self, req: UdpDial) -> Result:
        return await self._result("dial", req)

    async def answer(self, req: Answer) -> Result:
        return await self._result("answer", req)
