"""Test clients that speak the signed rendezvous protocol as an agent does (agent/wire/signing.py).

A `Member` is a key with the ID derived from it; raw test clients register it with a
challenge and a signature, sign their requests for it, echo push tokens, and carry
relay tickets, as the real agent does, so tests can play any party by hand.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.requests import Signer
from agent.servers.rendezvous_core import Action, RendezvousCore, SendUdp
from agent.wire import messages, signing
from agent.wire.addr import SockAddr
from agent.wire.peer_ids import derive_id


@dataclass
class Member:
    """An identity as an agent has one: a key, the ID derived from it, a uuid."""

    key: SigningKey
    salt: int = 0
    uuid: bytes = field(default_factory=lambda: os.urandom(16))

    @classmethod
    def new(cls, seed: bytes | None = None, salt: int = 0) -> Member:
        key = SigningKey(seed.ljust(32, b"\0")[:32]) if seed is not None else SigningKey.generate()
        return cls(key, salt)

    @property
    def id(self) -> str:
        return derive_id(self.pk, self.salt)

    @property
    def pk(self) -> bytes:
        return bytes(self.key.verify_key)

    @property
    def signer(self) -> Signer:
        return Signer(self.id, self.key, self.salt)

    def register_pk(self, nonce: bytes, challenge: bytes = b"", peer_id: str | None = None) -> bytes:
        """RegisterPk as the registrar sends it: padded when asking for a challenge, signed with one."""
        rk = pb.RegisterPk(
            id=self.id if peer_id is None else peer_id,
            uuid=self.uuid,
            pk=self.pk,
            id_salt=self.salt,
            nonce=nonce,
            challenge=challenge,
        )
        if challenge:
            return signing.seal(self.key, signing.REGISTER, b"", messages.build(register_pk=rk))
        rk.padding = bytes(160)
        return messages.build(register_pk=rk)

    def request(self, member: str, sub: Any) -> bytes:
        """A PunchHoleRequest or RequestRelay signed for this member."""
        return self.signer.sign(member, sub)


def parse_response(data: bytes) -> Any:
    kind, msg = messages.parse(data, max_len=1 << 16)
    assert kind == "register_pk_response", kind
    return msg


def register_via(send: Callable[[bytes], bytes], member: Member, peer_id: str | None = None) -> int:
    """Run the challenge exchange over `send` (one datagram out, its answer back); the final result."""
    nonce = os.urandom(16)
    first = parse_response(send(member.register_pk(nonce, peer_id=peer_id)))
    if first.result != pb.RegisterPkResponse.CHALLENGE:
        return int(first.result)
    second = parse_response(send(member.register_pk(nonce, bytes(first.challenge), peer_id=peer_id)))
    return int(second.result)


def register_core(
    core: RendezvousCore,
    member: Member,
    src: SockAddr,
    now: float,
    via: int = 0,
    apply: Callable[[list[Action]], list[Action]] = lambda a: a,
    peer_id: str | None = None,
) -> int:
    """Register `member` with a core directly (no sockets); `apply` carries out Persist actions."""

    def send(data: bytes) -> bytes:
        acts = apply(core.handle_udp(data, src, via, now))
        (reply,) = [a for a in acts if isinstance(a, SendUdp)]
        assert len(reply.payload) <= len(data), "amplification"
        return reply.payload

    return register_via(send, member, peer_id)


def register_udp(sock: socket.socket, server: tuple[str, int], member: Member, timeout: float = 5.0) -> int:
    """Register over a blocking UDP socket (the answer to each datagram is awaited)."""
    sock.settimeout(timeout)

    def send(data: bytes) -> bytes:
        sock.sendto(data, server)
        deadline = time.monotonic() + timeout
        while True:
            reply, src = sock.recvfrom(65536)
            if src[1] == server[1] and messages.parse(reply)[0] == "register_pk_response":
                return reply
            if time.monotonic() > deadline:
                raise TimeoutError("no RegisterPkResponse")

    return register_via(send, member)


def ticket_for(key: SigningKey, uuid: str, relay: str = "", issued: float | None = None) -> bytes:
    """A rendezvous server's pairing ticket (what the relay checks)."""
    return signing.make_ticket(key, uuid, relay, int((time.time() if issued is None else issued) * 1000))


async def aregister_via(send: Callable[[bytes], Awaitable[bytes]], member: Member) -> int:
    """`register_via` for an asyncio client: `send` is a coroutine that returns the answer's bytes."""
    nonce = os.urandom(16)
    first = parse_response(await send(member.register_pk(nonce)))
    if first.result != pb.RegisterPkResponse.CHALLENGE:
        return int(first.result)
    second = parse_response(await send(member.register_pk(nonce, bytes(first.challenge))))
    return int(second.result)
