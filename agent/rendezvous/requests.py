"""One-shot TCP requests to the rendezvous server (RustDesk sections 6.3, 6.6, 6.8), asyncio.

A (the side that connects) asks for a peer with PunchHoleRequest or RequestRelay and
waits on the same connection, because the server parks the connection under A's
address and answers on it when B has replied. B answers pushes on fresh
connections (RelayResponse here). Each call opens its own connection: the server
matches answers by A's address, so two requests must never share one.

A's requests are signed for its ID (`Signer`, agent/wire/signing.py REQUEST), afresh for
every send (each carries its own time and nonce, so a resend is no replay). B's
answers echo the push's answer_token, which tells the server they come from B.

Failures become RendezvousError subclasses whose message is one line for people
("peer 123456789 is offline"), so the coordinator can record them as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from agent.common.netutil import addr_infos, connect_first, describe_error
from agent.proto import rendezvous_pb2 as pb
from agent.wire import messages, signing
from agent.wire.addr import SockAddr, join_host_port
from agent.wire.addr import encode as mangle
from agent.wire.frames import FrameDecoder, FrameError, encode_frame
from agent.wire.messages import MessageError

MAX_REPLY = 64 * 1024
"""Largest frame we accept from the server (real answers are a few hundred bytes)."""


class RendezvousError(Exception):
    """A request to the rendezvous server failed; str() is one line for people."""


class PeerUnavailable(RendezvousError):
    """The server answered that the peer cannot be reached (unknown, offline, key mismatch)."""

    def __init__(self, message: str, failure: int | None = None) -> None:
        super().__init__(message)
        self.failure = failure


class RelayRefused(RendezvousError):
    """B (or the server on its behalf) turned A away; `reason` is the refuse_reason text."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Signer:
    """Signs A's requests as `peer_id` with the key that ID is bound to at the server (derived from,
    with `salt`: a server that could not register us takes the key and the salt as the proof)."""

    peer_id: str
    key: SigningKey
    salt: int = 0

    def sign(self, member: str, sub: Any) -> bytes:
        """`sub` (a PunchHoleRequest or RequestRelay) named, timed, nonced and signed, as an envelope."""
        sub.requester_id = self.peer_id
        sub.requester_pk = bytes(self.key.verify_key)
        sub.requester_salt = self.salt
        sub.request_time_ms = int(time.time() * 1000)
        sub.request_nonce = secrets.token_bytes(16)
        return signing.seal(self.key, signing.REQUEST, b"", messages.build(**{member: sub}))


def _request(member: str, sub: Any, signer: Signer | None) -> bytes:
    return signer.sign(member, sub) if signer is not None else messages.build(**{member: sub})


def _where(server: tuple[str, int]) -> str:
    return join_host_port(*server)


async def open_tcp(
    server: tuple[str, int], timeout: float, bind: tuple[str, int] | None = None, reuse: bool = False
) -> socket.socket:
    """A connected non-blocking TCP socket to the server, optionally from a chosen local address.

    `reuse` sets SO_REUSEADDR and SO_REUSEPORT before binding, so the same local
    port can later be used again to punch or listen (section 10, item 4).
    """
    where = _where(server)
    try:
        async with asyncio.timeout(timeout):
            infos = await addr_infos(server[0], server[1], socket.SOCK_STREAM)
            if not infos:
                raise RendezvousError(f"rendezvous server {where}: no address")
            if bind is not None:
                want = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
                infos = [i for i in infos if i[0] == want] or infos
            return await connect_first(infos, bind, reuse)
    except TimeoutError:
        raise RendezvousError(f"rendezvous server {where}: connect timed out after {timeout:g} s") from None
    except OSError as exc:
        raise RendezvousError(f"rendezvous server {where}: {describe_error(exc)}") from None


class _Conn:
    """Framed request/answer on one TCP connection."""

    def __init__(self, sock: socket.socket, server: tuple[str, int]) -> None:
        self.sock = sock
        self.where = _where(server)
        self.decoder = FrameDecoder(MAX_REPLY)
        self.pending: list[bytes] = []

    async def send(self, payload: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, encode_frame(payload))
        except OSError as exc:
            raise RendezvousError(f"rendezvous server {self.where}: send failed: {describe_error(exc)}") from None

    async def receive(self, kinds: Sequence[str]) -> tuple[str, Any]:
        """Next message of one of `kinds`; empty frames (heartbeats) and other kinds are skipped."""
        loop = asyncio.get_running_loop()
        while True:
            while self.pending:
                payload = self.pending.pop(0)
                if not payload:
                    continue
                try:
                    kind, sub = messages.parse(payload, max_len=MAX_REPLY)
                except MessageError as exc:
                    raise RendezvousError(f"rendezvous server {self.where}: unreadable answer ({exc})") from None
                if kind in kinds:
                    return kind, sub
            try:
                chunk = await loop.sock_recv(self.sock, 65536)
            except OSError as exc:
                raise RendezvousError(f"rendezvous server {self.where}: {describe_error(exc)}") from None
            if not chunk:
                raise RendezvousError(f"rendezvous server {self.where} closed the connection without answering")
            try:
                self.pending.extend(self.decoder.feed(chunk))
            except FrameError as exc:
                raise RendezvousError(f"rendezvous server {self.where}: {exc}") from None

    def local_address(self) -> SockAddr:
        name = self.sock.getsockname()
        return SockAddr.of(name[0], name[1])

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- A: punch hole


@dataclass(frozen=True)
class PunchResult:
    """The server's answer to A's PunchHoleRequest, and what A needs to punch from the same port."""

    response: pb.PunchHoleResponse | pb.RelayResponse
    """PunchHoleResponse (B answered with PunchHoleSent or LocalAddr) or RelayResponse (relay chosen)."""
    local_address: SockAddr
    """Local address of the request's connection (closed on return, free to reuse)."""
    elapsed: float
    """Seconds from connect to answer (RustDesk's punch_time)."""


def failure_text(peer_id: str, resp: pb.PunchHoleResponse) -> str:
    """RustDesk's texts for a PunchHoleResponse without an address, naming the peer."""
    if resp.other_failure:
        return f"peer {peer_id}: {resp.other_failure}"
    F = pb.PunchHoleResponse
    return {
        F.ID_NOT_EXIST: f"peer {peer_id} does not exist",
        F.OFFLINE: f"peer {peer_id} is offline",
        F.LICENSE_MISMATCH: "key mismatch: the rendezvous server's key is not the one configured",
        F.LICENSE_OVERUSE: "key overuse",
    }.get(resp.failure, f"peer {peer_id}: failure {resp.failure}")


def refuse_text(peer_id: str, reason: str) -> str:
    """The server's refuse reasons (RustDesk's wording) as the same texts as punch failures."""
    known = {"ID does not exist": "does not exist", "Remote desktop is offline": "is offline"}
    if reason in known:
        return f"peer {peer_id} {known[reason]}"
    return f"peer {peer_id} refused: {reason}"


async def punch_hole_exchange(
    server: tuple[str, int],
    peer_id: str,
    nat_type: int,
    licence_key: str = "",
    udp_port: int = 0,
    force_relay: bool = False,
    timeout: float = 10.0,
    *,
    conn_type: int = 0,
    version: str = "",
    socket_addr_v6: bytes = b"",
    bind: tuple[str, int] | None = None,
    resend_after: Sequence[float] = (3.0, 6.0),
    signer: Signer | None = None,
    nat_behavior: bytes = b"",
    direct_only: bool = False,
) -> PunchResult:
    """PunchHoleRequest on a fresh connection; the answer plus the local address it came from.

    The request is sent again on the same connection after each `resend_after`
    delay (RustDesk: 3 tries) since the server's UDP push to B may be lost. The
    socket is bound with SO_REUSEADDR/SO_REUSEPORT so A can punch from its port.
    Raises PeerUnavailable for the server's failures and RendezvousError otherwise. A request with
    `udp_port` may get is_local without an address: both are on one LAN, and the TCP request finds it.
    """
    req = pb.PunchHoleRequest(
        id=peer_id,
        nat_type=nat_type,  # type: ignore[arg-type]
        licence_key=licence_key,
        conn_type=conn_type,  # type: ignore[arg-type]
        version=version,
        udp_port=udp_port,
        force_relay=force_relay,
        socket_addr_v6=socket_addr_v6,
        direct_only=direct_only,
    )
    req.nat_behavior.ParseFromString(nat_behavior)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    started = time.monotonic()
    sock = await open_tcp(server, timeout, bind=bind, reuse=True)
    conn = _Conn(sock, server)
    try:
        local = conn.local_address()
        await conn.send(_request("punch_hole_request", req, signer))
        waits = [*resend_after, float("inf")]
        for i, wait in enumerate(waits):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(min(wait, left)):
                    kind, answer = await conn.receive(("punch_hole_response", "relay_response"))
            except TimeoutError:
                if i + 1 < len(waits) and deadline - loop.time() > 0:
                    await conn.send(_request("punch_hole_request", req, signer))
                continue
            if kind == "relay_response":
                if answer.refuse_reason:
                    raise RelayRefused(refuse_text(peer_id, answer.refuse_reason), answer.refuse_reason)
            elif not answer.socket_addr and not (udp_port and answer.is_local and not answer.other_failure):
                # (is_local with no address answers a UDP request: "one LAN, no UDP punch needed")
                if answer.other_failure:
                    raise RendezvousError(failure_text(peer_id, answer))
                raise PeerUnavailable(failure_text(peer_id, answer), answer.failure)
            return PunchResult(answer, local, time.monotonic() - started)
    finally:
        conn.close()
    raise RendezvousError(f"no answer about peer {peer_id} from {_where(server)} within {timeout:g} s")


async def punch_hole_request(
    server: tuple[str, int],
    peer_id: str,
    nat_type: int,
    licence_key: str = "",
    udp_port: int = 0,
    force_relay: bool = False,
    timeout: float = 10.0,
    **options: Any,
) -> pb.PunchHoleResponse | pb.RelayResponse:
    """`punch_hole_exchange` without the local address: just the server's answer."""
    result = await punch_hole_exchange(
        server, peer_id, nat_type, licence_key, udp_port, force_relay, timeout, **options
    )
    return result.response


# --------------------------------------------------------------------------- A: relay


async def request_relay(
    server: tuple[str, int],
    peer_id: str,
    uuid: str = "",
    relay_server: str = "",
    secure: bool = True,
    timeout: float = 10.0,
    *,
    conn_type: int = 0,
    signer: Signer | None = None,
) -> pb.RelayResponse:
    """RequestRelay on a fresh connection; B's RelayResponse (with the server-signed pk, and the
    relay, uuid and ticket the server chose: it ignores `uuid` and `relay_server` of a signed request).

    Raises RelayRefused when B or the server refuse (unknown or offline peer), and
    RendezvousError on timeout or a broken connection.
    """
    req = pb.RequestRelay(
        id=peer_id,
        uuid=uuid,
        relay_server=relay_server,
        secure=secure,
        conn_type=conn_type,  # type: ignore[arg-type]
    )
    sock = await open_tcp(server, timeout)
    conn = _Conn(sock, server)
    try:
        await conn.send(_request("request_relay", req, signer))
        try:
            async with asyncio.timeout(timeout):
                _kind, answer = await conn.receive(("relay_response",))
        except TimeoutError:
            raise RendezvousError(
                f"no relay answer from peer {peer_id} via {_where(server)} within {timeout:g} s"
            ) from None
    finally:
        conn.close()
    if answer.refuse_reason:
        raise RelayRefused(refuse_text(peer_id, answer.refuse_reason), answer.refuse_reason)
    resp: pb.RelayResponse = answer
    return resp


# --------------------------------------------------------------------------- B: answers


@dataclass(frozen=True)
class Reply:
    """What each of B's answers carries whatever it says: `socket_addr` and `answer_token` copied from
    the push it answers (they name A's parked request and prove the answer is B's), B's ID, the relay,
    B's version, and B's IPv6 address when it offers one."""

    socket_addr: bytes
    peer_id: str
    relay_server: str
    version: str
    answer_token: bytes = b""
    socket_addr_v6: bytes = b""

    @classmethod
    def to(cls, push: Any, peer_id: str, relay_server: str, version: str, socket_addr_v6: bytes = b"") -> Reply:
        return cls(bytes(push.socket_addr), peer_id, relay_server, version, bytes(push.answer_token), socket_addr_v6)

    def fields(self) -> dict[str, Any]:
        return {
            "socket_addr": self.socket_addr,
            "id": self.peer_id,
            "relay_server": self.relay_server,
            "version": self.version,
            "answer_token": self.answer_token,
            "socket_addr_v6": self.socket_addr_v6,
        }


async def send_relay_response(
    server: tuple[str, int], reply: Reply, uuid: str, *, refuse_reason: str = "", timeout: float = 3.0
) -> None:
    """B's answer to a RequestRelay push: RelayResponse on a fresh connection, then close;
    `refuse_reason` turns A away."""
    resp = pb.RelayResponse(uuid=uuid, refuse_reason=refuse_reason, **reply.fields())
    await _send_one(server, lambda _local: messages.build(relay_response=resp), timeout, None)


async def send_punch_hole_sent(
    server: tuple[str, int],
    reply: Reply,
    nat_type: int,
    *,
    bind: tuple[str, int] | None = None,
    timeout: float = 3.0,
    nat_behavior: bytes = b"",
) -> SockAddr:
    """B's answer to a PunchHole push: the server hands A the source address of this connection.

    Returns that local address: B listens on it (SO_REUSEADDR/SO_REUSEPORT) for A's
    connection, as RustDesk does (section 6.5, TCP path).
    """
    msg = pb.PunchHoleSent(nat_type=nat_type, **reply.fields())  # type: ignore[arg-type]
    msg.nat_behavior.ParseFromString(nat_behavior)
    return await _send_one(server, lambda _local: messages.build(punch_hole_sent=msg), timeout, bind)


async def send_local_addr(
    server: tuple[str, int],
    reply: Reply,
    *,
    local_addr: bytes | None = None,
    bind: tuple[str, int] | None = None,
    timeout: float = 3.0,
) -> SockAddr:
    """B's answer to a FetchLocalAddr push (same LAN): A is told to dial `local_addr`.

    Without `local_addr` the connection's own local address (its LAN address) is
    sent, as RustDesk does. Returns the local address (B listens on it).
    """

    def build(local: SockAddr) -> bytes:
        addr = local_addr if local_addr is not None else mangle(local, int(time.time() * 1_000_000))
        return messages.build(local_addr=pb.LocalAddr(local_addr=addr, **reply.fields()))

    return await _send_one(server, build, timeout, bind)


async def _send_one(
    server: tuple[str, int], build: Callable[[SockAddr], bytes], timeout: float, bind: tuple[str, int] | None
) -> SockAddr:
    """Send one message (built knowing the connection's local address) on a fresh reusable-port
    connection, close it, return its local address."""
    sock = await open_tcp(server, timeout, bind=bind, reuse=True)
    conn = _Conn(sock, server)
    try:
        local = conn.local_address()
        await asyncio.wait_for(conn.send(build(local)), timeout)
    except TimeoutError:
        raise RendezvousError(f"rendezvous server {conn.where}: send timed out after {timeout:g} s") from None
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        conn.close()
    return local
