"""`up`'s first look at the rendezvous server, before any actor starts: seconds, not a Ray start.

One round trip exactly as the registrar begins one: a padded RegisterPk, which the server answers
with a CHALLENGE signed for our nonce. That signature proves the server's key, so a wrong
`--server-key` (or a server that is not the one pinned) is refused here, by name, before anything
runs. It stops there and registers nothing (the agent's registrar does that a moment later).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.common.netutil import describe_error
from agent.identity import Identity
from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.registrar_core import RegistrarCore, ServerKeyRefused
from agent.wire import messages
from agent.wire.addr import SockAddr, to_v4_if_mapped
from agent.wire.frames import FrameDecoder, FrameError, encode_frame
from agent.wire.messages import MessageError
from agent.wire.peer_ids import fingerprint
from agent.wire.ports import RENDEZVOUS_PORT

WAIT = 6.0
"""Seconds without any answer before `up` says the server does not answer (the registrar's own
schedule resends at 0, 3 and 9 s; two sends fit)."""
UDP_AFTER_TCP = 2.0
"""Seconds from the first UDP request after which UDP counts as blocked if the server has answered
over TCP meanwhile (a server's UDP answer takes a round trip, not seconds). A lost datagram
misjudged so costs little: the agent registers over TCP and goes back to UDP at its next probe."""


@dataclass(frozen=True)
class ServerCheck:
    """What the first round trip showed: `problem` is "" when the server answered with a key we trust."""

    problem: str
    key: bytes | None = None
    """The key the server proved it holds (the trusted one, or the one first contact would pin)."""
    sent: int = 0
    udp_blocked: str = ""
    """Why UDP got nothing while the server answered over TCP: this agent can open sessions (their
    requests go over TCP) but cannot register, so peers cannot reach it. "" when UDP works."""
    unanswered: str = ""
    """Why the UDP round trip got nothing at all (then TCP is worth a try)."""

    @classmethod
    def silent(cls, server: str, why: str, sent: int) -> ServerCheck:
        return cls(no_answer(server, why), sent=sent, unanswered=why)


def check_server(server: str, address: tuple[str, int], ident: Identity, trusted: bytes | None) -> ServerCheck:
    """The UDP challenge round trip and, beside it, whether the server answers over TCP at all: a
    network that drops UDP is known in UDP_AFTER_TCP seconds, not WAIT (`up` took 13-15 s there)."""
    tcp: dict[str, str] = {}
    asking = threading.Thread(target=lambda: tcp.update(error=tcp_answers(address)), daemon=True)
    asking.start()
    check = check_udp(server, address, ident, trusted, tcp_answered=lambda: tcp.get("error") == "")
    if not check.unanswered:
        return check
    asking.join()
    tcp_error = tcp["error"]
    if tcp_error:
        return ServerCheck.silent(server, f"UDP: {check.unanswered}; TCP: {tcp_error}", check.sent)
    return ServerCheck("", None, check.sent, udp_blocked=check.unanswered)


def tcp_answers(address: tuple[str, int], timeout: float = 3.0) -> str:
    """ "" when a TestNatRequest over TCP gets its answer (a rendezvous server listens); else why not."""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(encode_frame(messages.build(test_nat_request=pb.TestNatRequest(serial=0))))
            decoder = FrameDecoder(4096)
            while chunk := sock.recv(4096):
                for payload in decoder.feed(chunk):
                    if payload and messages.parse(payload)[0] == "test_nat_response":
                        return ""
            return "closed without answering"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, FrameError, MessageError) as exc:
        return describe_error(exc)


def check_udp(
    server: str,
    address: tuple[str, int],
    ident: Identity,
    trusted: bytes | None,
    tcp_answered: Callable[[], bool] | None = None,
) -> ServerCheck:
    """Ask `address` (resolved from `server`) for a registration challenge and check who signed it;
    give up after UDP_AFTER_TCP seconds once `tcp_answered()` says the server answered over TCP."""
    try:
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
    except OSError as exc:
        return ServerCheck(f"cannot resolve rendezvous server {server}: {exc.strerror or exc}")
    family, _t, _p, _n, sockaddr = infos[0]
    target = to_v4_if_mapped(SockAddr.of(str(sockaddr[0]), int(sockaddr[1])))
    core = RegistrarCore(target, ident.peer_id, ident.uuid, ident.signing_key, salt=ident.salt, server_key=trusted)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        try:
            sock.connect(sockaddr)  # so an ICMP "port unreachable" comes back as ECONNREFUSED
        except OSError as exc:
            return ServerCheck(f"cannot reach rendezvous server {server}: {exc.strerror or exc}")
        started = time.monotonic()
        waited = WAIT
        while (now := time.monotonic()) - started < WAIT:
            if tcp_answered is not None and now - started >= UDP_AFTER_TCP and tcp_answered():
                waited = UDP_AFTER_TCP
                break
            try:
                for datagram in core.datagrams_to_send(now - started):
                    sock.send(datagram)
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                return ServerCheck.silent(server, "nothing listens there (ICMP port unreachable)", core.sent_pk)
            except OSError as exc:
                return ServerCheck.silent(server, exc.strerror or str(exc), core.sent_pk)
            core.receive_datagram(data, target, time.monotonic() - started)
            for event in core.next_events():
                if isinstance(event, ServerKeyRefused):
                    return ServerCheck(
                        f"rendezvous server {server} signs with key {fingerprint(event.presented)}, "
                        f"not the trusted {fingerprint(event.expected)}",
                        event.presented,
                        core.sent_pk,
                    )
            if core.last_result == "CHALLENGE":
                return ServerCheck("", core.server_key, core.sent_pk)
            if core.last_result:  # a signed refusal: the server speaks for itself
                return ServerCheck(f"rendezvous server {server} refused: {core.last_result}", core.server_key)
    drops = core.drops.snapshot()
    if drops.get("unsigned_register_pk_response") or drops.get("bad_register_pk_response_signature"):
        return ServerCheck(
            f"{server} answers without a valid signature: not a punchthrough rendezvous server "
            "(a RustDesk hbbs cannot vouch for peers' keys), or something between rewrites its answers",
            sent=core.sent_pk,
        )
    return ServerCheck.silent(
        server, f"no reply to {core.sent_pk} request{'s' if core.sent_pk != 1 else ''} in {waited:g} s", core.sent_pk
    )


def no_answer(server: str, why: str) -> str:
    """The one line `up` prints when the server does not answer, with what to check."""
    port = server.rsplit(":", 1)[-1] if ":" in server else str(RENDEZVOUS_PORT)
    return (
        f"rendezvous server {server} does not answer ({why}): check that it runs, that the address is right "
        f"and that UDP port {port} reaches it"
    )
