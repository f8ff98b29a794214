"""Issue 2's acceptance in one story: two raw clients (no agent code beyond the wire codec and the
signatures) register, punch-request, and get relayed through the real rendezvous and relay servers
on loopback, the relay pairing them on the rendezvous server's ticket."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_server import RelayConfig, RelayServer, start_relay
from agent.wire import messages
from agent.wire.frames import encode_frame
from agent.wire.keys import open_signed_id_pk
from tests.integration.test_rendezvous_server import (
    B_ID,
    B_PK,
    ServerThread,
    TcpClient,
    make_cfg,
    register,
    register_a,
    udp_recv,
    udp_socket,
    verify_key,
)


def send_all_then_eof(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[ServerThread, RelayServer]]:
    rv = ServerThread(make_cfg(tmp_path))
    relay = rv.call(start_relay(RelayConfig(binds=["127.0.0.1"], port=0, server_keys=[verify_key(rv)])))
    yield rv, relay
    rv.call(relay.close())
    rv.close()


def _join_relay(port: int, uuid: str, ticket: bytes, relay_name: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    req = pb.RequestRelay(uuid=uuid, id=B_ID, ticket=ticket, relay_server=relay_name)
    s.sendall(encode_frame(messages.build(request_relay=req)))
    return s


def test_register_punch_request_and_relay(servers: tuple[ServerThread, RelayServer]) -> None:
    rv, relay = servers
    # B registers over UDP.
    b_udp = udp_socket()
    assert register(rv, b_udp) == 0
    a_udp = register_a(rv)
    # A (from another loopback address, so not "same LAN") asks for B and wants the relay.
    a = TcpClient(rv.tcp, bind="127.0.0.2")
    a.ask(punch_hole_request=pb.PunchHoleRequest(id=B_ID, nat_type=pb.SYMMETRIC, force_relay=True))
    kind, push = udp_recv(b_udp)
    assert kind == "request_relay" and push.uuid and push.ticket
    # B answers over TCP; the server forwards to A with B's key signed.
    b_tcp = TcpClient(rv.tcp)
    b_tcp.send(
        relay_response=pb.RelayResponse(
            socket_addr=push.socket_addr, id=B_ID, version="t", uuid=push.uuid, answer_token=push.answer_token
        )
    )
    kind, answer = a.recv()
    assert kind == "relay_response" and answer.uuid == push.uuid and answer.ticket == push.ticket
    assert open_signed_id_pk(verify_key(rv), answer.pk) == (B_ID, B_PK)
    assert answer.relay_server == ""  # this server names no relay: RustDesk's default (its host, port + 1)
    # Both meet at the relay with the uuid and the ticket, and bytes flow both ways, intact.
    a_rel = _join_relay(relay.port, answer.uuid, answer.ticket, answer.relay_server)
    b_rel = _join_relay(relay.port, push.uuid, push.ticket, push.relay_server)
    up, down = os.urandom(5_000_000), os.urandom(3_000_000)
    got: dict[str, bytes] = {}

    def pump(name: str, sock: socket.socket, data: bytes, expect: int) -> None:
        sender = threading.Thread(target=send_all_then_eof, args=(sock, data))
        sender.start()
        buf = bytearray()
        while chunk := sock.recv(1 << 16):
            buf += chunk
        sender.join()
        got[name] = bytes(buf)
        assert len(buf) == expect

    threads = [
        threading.Thread(target=pump, args=("a", a_rel, up, len(down))),
        threading.Thread(target=pump, args=("b", b_rel, down, len(up))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert hashlib.sha256(got["b"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["a"]).digest() == hashlib.sha256(down).digest()
    for s in (a_rel, b_rel, b_udp, a_udp):
        s.close()
    a.close()
    b_tcp.close()
