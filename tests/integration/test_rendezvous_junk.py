"""Hostile input on every port: the server drops it, counts it, and keeps serving."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proto import rendezvous_pb2 as pb
from agent.wire import messages
from agent.wire.frames import encode_header
from tests.integration.test_rendezvous_server import (
    B_ID,
    TIMEOUT,
    B,
    ServerThread,
    TcpClient,
    make_cfg,
    udp_socket,
)

SYNC = messages.build(test_nat_request=pb.TestNatRequest(padding=b"sync" * 4))
"""A request that always gets an answer; see `exchange`."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(make_cfg(tmp_path_factory.mktemp("junk"), binds=["127.0.0.1"]))
    yield srv
    srv.close()


def assert_still_serving(srv: ServerThread) -> None:
    """A real client still gets real answers on every port."""
    b = udp_socket()
    b.sendto(messages.build(register_peer=pb.RegisterPeer(id="alive0001")), srv.udp)
    assert messages.parse(b.recv(100))[0] == "register_peer_response"
    b.close()
    for to in (srv.tcp, srv.nat):
        c = TcpClient(to)
        c.send(test_nat_request=pb.TestNatRequest())
        assert c.recv()[1].port == c.local.port
        c.close()


def exchange(s: socket.socket, to: tuple[str, int], data: bytes) -> list[bytes]:
    """Send `data` from `s` and return every reply to it, without waiting for a timeout.

    After `data`, a second socket sends SYNC. The server handles datagrams in order and
    loopback delivers synchronously, so once SYNC's answer is in, any reply to `data`
    is already queued on `s`.
    """
    with udp_socket() as sync:
        s.sendto(data, to)
        sync.sendto(SYNC, to)
        assert messages.parse(sync.recv(100))[0] == "test_nat_response"
    replies = []
    s.setblocking(False)
    while True:
        try:
            replies.append(s.recv(65536))
        except BlockingIOError:
            return replies


# --------------------------------------------------------------------------- UDP


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000))
def test_random_datagrams(server: ServerThread, data: bytes) -> None:
    s = udp_socket()
    try:
        for reply in exchange(s, server.udp, data):
            assert len(reply) <= len(data)
    finally:
        s.close()


_ANSWERED = ["register_peer", "register_pk", "test_nat_request", "punch_hole_sent"]
_OTHERS = [
    "punch_hole_request",
    "punch_hole_response",
    "request_relay",
    "relay_response",
    "local_addr",
    "configure_update",
    "software_update",
    "online_request",
    "key_exchange",
    "hc",
]


@st.composite
def plausible_messages(draw: st.DrawFn) -> bytes:
    """Well-formed envelopes with random field values, mostly of the kinds the UDP port answers."""
    kind = draw(st.sampled_from(_ANSWERED) | st.sampled_from(_ANSWERED) | st.sampled_from(_OTHERS))
    sub: Any = getattr(pb.RendezvousMessage(), kind)
    for f in sub.DESCRIPTOR.fields:
        if f.is_repeated or f.message_type is not None or not draw(st.integers(0, 3)):
            continue
        value: Any
        if f.type == f.TYPE_STRING:
            value = draw(st.sampled_from([B_ID, "a_b-c1", "", "x" * 70, "abc"]) | st.text(max_size=20))
        elif f.type == f.TYPE_BYTES:
            value = draw(st.binary(min_size=1, max_size=24) | st.just(b""))
        elif f.type == f.TYPE_BOOL:
            value = draw(st.booleans())
        elif f.type == f.TYPE_ENUM:
            value = draw(st.sampled_from([v.number for v in f.enum_type.values]))
        else:
            value = draw(st.integers(0, 70000))
        setattr(sub, f.name, value)
    return messages.build(**{kind: sub})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=plausible_messages())
def test_every_udp_reply_to_an_unregistered_source_is_no_larger_than_its_request(
    server: ServerThread, data: bytes
) -> None:
    s = udp_socket()  # a fresh, never registered source each time
    try:
        for reply in exchange(s, server.udp, data):
            assert len(reply) <= len(data), (data.hex(), reply.hex())
    finally:
        s.close()


def test_flood_of_junk_while_a_real_registration_succeeds(tmp_path: Path) -> None:
    srv = ServerThread(make_cfg(tmp_path, binds=["127.0.0.1"]))
    try:
        flood = udp_socket()
        junk = [bytes([i % 256]) * (1 + i % 200) for i in range(3000)]
        b = udp_socket()
        b.settimeout(0.5)
        nonce = os.urandom(16)
        for i, datagram in enumerate(junk):
            flood.sendto(datagram, srv.udp)
            if i == 1500:  # B's registration starts in the middle of the flood
                b.sendto(B.register_pk(nonce), srv.udp)
        answer = None
        challenge = b""
        for _ in range(10):  # a real client retries, as the registrar does every few seconds
            try:
                answer = messages.parse(b.recv(300))[1]
            except TimeoutError:
                b.sendto(B.register_pk(nonce, challenge), srv.udp)
                continue
            if answer.result != pb.RegisterPkResponse.CHALLENGE:
                break
            challenge = answer.challenge
            b.sendto(B.register_pk(nonce, challenge), srv.udp)
        assert answer is not None and answer.result == pb.RegisterPkResponse.OK
        stats = srv.stats()
        assert sum(stats["drops"].values()) > 0
        assert stats["peers_online"] == 1
        assert_still_serving(srv)
        flood.close()
        b.close()
    finally:
        srv.close()


# --------------------------------------------------------------------------- TCP


def _tcp_send_and_close(to: tuple[str, int], data: bytes) -> None:
    with socket.create_connection(to, timeout=TIMEOUT) as c:
        try:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):  # read whatever the server says until it closes or we time out
                pass
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=2000), port=st.sampled_from(["tcp", "nat"]))
def test_random_bytes_on_tcp_ports(server: ServerThread, data: bytes, port: str) -> None:
    _tcp_send_and_close(getattr(server, port), data)


def test_tcp_junk_counted_and_server_serves(server: ServerThread) -> None:
    before = server.stats()["drops"]
    for to in (server.tcp, server.nat):
        _tcp_send_and_close(to, encode_header(10) + b"12345")  # truncated frame
        _tcp_send_and_close(to, encode_header(1 << 29))  # oversized header, no body
        _tcp_send_and_close(to, bytes([3 | 0xFC, 0xFF, 0xFF, 0xFF]))  # 4-byte header, 1 GiB
        _tcp_send_and_close(to, encode_header(3) + b"\xff\xff\xff")  # garbage payload
        _tcp_send_and_close(to, encode_header(2) + b"\x5a\x00")  # a PunchHoleResponse sent to a server
        _tcp_send_and_close(to, encode_header(70000) + b"x")  # bigger than the 64 KiB cap
    after = server.stats()["drops"]

    def grew(reason: str) -> int:
        return after.get(reason, 0) - before.get(reason, 0)

    assert grew("truncated_frame") == 2
    assert grew("frame_too_large") == 6
    assert grew("malformed") == 2
    assert grew("wrong_kind") == 2
    assert_still_serving(server)


def test_oversized_frame_refused_before_body(server: ServerThread) -> None:
    """The server hangs up right after the header; it never waits for (or buffers) the body."""
    c = TcpClient(server.tcp)
    c.sock.sendall(encode_header(65 * 1024))
    assert c.closed_by_peer()
    c.close()


def test_server_survives_everything_above(server: ServerThread) -> None:
    assert_still_serving(server)
    stats = server.stats()
    assert "internal_error" not in stats["drops"]
    assert stats["tcp_connections"] <= 1
