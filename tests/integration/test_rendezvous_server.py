"""The rendezvous server on loopback, driven by raw clients that play A and B."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.proto import rendezvous_pb2 as pb
from agent.servers.rendezvous_server import RendezvousConfig, RendezvousServer, start_rendezvous
from agent.wire import addr as addrmod
from agent.wire import messages
from agent.wire.addr import SockAddr
from agent.wire.frames import FrameDecoder, encode_frame
from agent.wire.keys import open_signed_id_pk
from tests.agent_fixtures import has_ipv6
from tests.signed import Member, register_udp

T = TypeVar("T")
TIMEOUT = 5.0
B = Member.new(b"B-of-the-rendezvous-tests")
B.uuid = b"machine-uid-of-B"
B_ID = B.id
B_UUID = B.uuid
B_PK = B.pk
A = Member.new(b"A-of-the-rendezvous-tests")


class ServerThread:
    """A server on its own event loop thread, so tests can use plain blocking sockets."""

    def __init__(self, cfg: RendezvousConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rendezvous-test", daemon=True)
        self.thread.start()
        try:
            self.server: RendezvousServer = self.call(start_rendezvous(cfg))
        except BaseException:
            self._stop_loop()
            raise

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT * 2)

    def stats(self) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            return self.server.stats()

        return self.call(get())

    @property
    def udp(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.udp_port)

    @property
    def tcp(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.tcp_port)

    @property
    def nat(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.nat_port)

    def close(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


def make_cfg(tmp_path: Path, **kw: Any) -> RendezvousConfig:
    kw.setdefault("binds", ["127.0.0.1", "::1"] if has_ipv6() else ["127.0.0.1"])
    return RendezvousConfig(port=0, db_path=tmp_path / "rv.sqlite3", key_file=tmp_path / "id_ed25519", **kw)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_cfg(tmp_path, relays=["127.0.0.1:21117"]))
    yield srv
    srv.close()


# --------------------------------------------------------------------------- raw clients


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(TIMEOUT)
    return s


def udp_ask(s: socket.socket, to: tuple[str, int], **member: Any) -> tuple[str, Any]:
    s.sendto(messages.build(**member), to)
    return messages.parse(s.recv(4096))


def udp_recv(s: socket.socket) -> tuple[str, Any]:
    return messages.parse(s.recv(4096))


class TcpClient:
    def __init__(self, to: tuple[str, int], bind: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(to, timeout=TIMEOUT, source_address=(bind, 0))
        self.decoder = FrameDecoder()
        self.frames: list[bytes] = []

    @property
    def local(self) -> SockAddr:
        host, port = self.sock.getsockname()[:2]
        return SockAddr.of(host, port)

    def send(self, **member: Any) -> None:
        self.sock.sendall(encode_frame(messages.build(**member)))

    def ask(self, who: Member = A, **member: Any) -> None:
        """A request signed by `who` (which must be registered)."""
        ((kind, sub),) = member.items()
        self.sock.sendall(encode_frame(who.request(kind, sub)))

    def recv(self) -> tuple[str, Any]:
        while not self.frames:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by server")
            self.frames.extend(self.decoder.feed(chunk))
        return messages.parse(self.frames.pop(0), max_len=1 << 16)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def register(srv: ServerThread, s: socket.socket, who: Member = B) -> int:
    """A signed registration (challenge, then signature) from `s`."""
    return register_udp(s, srv.udp, who)


def register_a(srv: ServerThread) -> socket.socket:
    """A registers too (its requests are signed for an ID bound to its key); keep its socket open."""
    s = udp_socket()
    assert register(srv, s, A) == 0
    return s


def verify_key(srv: ServerThread) -> bytes:
    return base64.b64decode(srv.server.public_key_b64)


# --------------------------------------------------------------------------- registration


def test_register_and_heartbeat(server: ServerThread) -> None:
    b = udp_socket()
    assert udp_ask(b, server.udp, register_peer=pb.RegisterPeer(id=B_ID)) == (
        "register_peer_response",
        pb.RegisterPeerResponse(request_pk=True),
    )
    assert register(server, b) == pb.RegisterPkResponse.OK
    kind, msg = udp_ask(b, server.udp, register_peer=pb.RegisterPeer(id=B_ID, nat_type=pb.ASYMMETRIC))
    assert (kind, msg.request_pk) == ("register_peer_response", False)
    st = server.stats()
    assert (st["peers_registered"], st["peers_online"]) == (1, 1)
    assert st["messages"]["udp.register_pk"] == 2  # the challenge, then the signed registration
    b.close()


def test_unsigned_registration_needs_the_compat_flag(tmp_path: Path) -> None:
    for allow, result in ((False, pb.RegisterPkResponse.NOT_SUPPORT), (True, pb.RegisterPkResponse.OK)):
        srv = ServerThread(make_cfg(tmp_path / str(allow), allow_unsigned=allow))
        try:
            c = udp_socket()
            kind, msg = udp_ask(c, srv.udp, register_pk=pb.RegisterPk(id="123456789", uuid=b"u", pk=B_PK))
            assert (kind, msg.result) == ("register_pk_response", result)
            c.close()
        finally:
            srv.close()


def test_restart_keeps_binding(tmp_path: Path) -> None:
    srv = ServerThread(make_cfg(tmp_path))
    key = srv.server.public_key_b64
    b = udp_socket()
    assert register(srv, b) == pb.RegisterPkResponse.OK
    srv.close()

    srv = ServerThread(make_cfg(tmp_path))
    try:
        assert srv.server.public_key_b64 == key  # same key file
        assert udp_ask(b, srv.udp, register_peer=pb.RegisterPeer(id=B_ID))[1].request_pk is True
        # the DB-only peer is known but offline until it registers again
        a_udp = register_a(srv)
        a = TcpClient(srv.tcp)
        a.ask(punch_hole_request=pb.PunchHoleRequest(id=B_ID))
        assert a.recv()[1].failure == pb.PunchHoleResponse.OFFLINE
        a.close()
        a_udp.close()
        assert register(srv, b) == pb.RegisterPkResponse.OK
        assert udp_ask(b, srv.udp, register_peer=pb.RegisterPeer(id=B_ID))[1].request_pk is False
        assert srv.stats()["peers_registered"] == 2  # B, and A (which signs its requests)
    finally:
        srv.close()
        b.close()


def test_too_frequent_from_one_ip(server: ServerThread) -> None:
    b = udp_socket()
    results = [register(server, b) for _ in range(4)]
    assert results == [0, 0, 0, pb.RegisterPkResponse.TOO_FREQUENT]
    b.close()


# --------------------------------------------------------------------------- punch flows


def test_punch_unknown_id_and_offline(server: ServerThread) -> None:
    a_udp = register_a(server)
    a = TcpClient(server.tcp)
    a.ask(punch_hole_request=pb.PunchHoleRequest(id="987654321"))
    kind, resp = a.recv()
    assert kind == "punch_hole_response" and resp == pb.PunchHoleResponse()  # ID_NOT_EXIST is empty
    a.ask(punch_hole_request=pb.PunchHoleRequest(id=B_ID, licence_key="not-the-key"))
    assert a.recv()[1].failure == pb.PunchHoleResponse.LICENSE_MISMATCH
    a.send(punch_hole_request=pb.PunchHoleRequest(id="987654321"))  # unsigned: refused, with the reason
    assert "only signed requests" in a.recv()[1].other_failure
    a.close()
    a_udp.close()


def test_lan_path_fetch_local_addr(server: ServerThread) -> None:
    b = udp_socket()
    assert register(server, b) == 0
    a_udp = register_a(server)
    a = TcpClient(server.tcp)  # same IP as B: the LAN path
    a.ask(punch_hole_request=pb.PunchHoleRequest(id=B_ID, licence_key=server.server.public_key_b64))
    kind, fla = udp_recv(b)
    assert kind == "fetch_local_addr"
    assert addrmod.decode(fla.socket_addr) == a.local
    assert fla.relay_server == "127.0.0.1:21117"
    assert (fla.requester_id, fla.requester_pk) == (A.id, A.pk)

    bt = TcpClient(server.tcp)
    local = addrmod.encode(bt.local, 12345)
    bt.send(
        local_addr=pb.LocalAddr(
            socket_addr=fla.socket_addr, local_addr=local, id=B_ID, version="1.4.2", answer_token=fla.answer_token
        )
    )
    kind, resp = a.recv()
    assert kind == "punch_hole_response"
    assert resp.is_local and addrmod.decode(resp.socket_addr) == bt.local
    assert open_signed_id_pk(verify_key(server), resp.pk) == (B_ID, B_PK)
    assert bt.closed_by_peer()  # B's one-shot connection is closed by the server
    for c in (a, bt):
        c.close()
    b.close()
    a_udp.close()


def test_punch_hole_path_with_signature(server: ServerThread) -> None:
    b = udp_socket()
    assert register(server, b) == 0
    a_udp = register_a(server)
    a = TcpClient(server.tcp, bind="127.0.0.2")  # a different IP than B's 127.0.0.1
    a.ask(punch_hole_request=pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC, version="1.4.2"))
    kind, ph = udp_recv(b)
    assert kind == "punch_hole"
    assert addrmod.decode(ph.socket_addr) == a.local
    assert ph.nat_type == pb.ASYMMETRIC

    bt = TcpClient(server.tcp)
    sent = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, nat_type=pb.ASYMMETRIC, answer_token=ph.answer_token)
    bt.send(punch_hole_sent=sent)
    kind, resp = a.recv()
    assert kind == "punch_hole_response"
    assert addrmod.decode(resp.socket_addr) == bt.local  # B's address as the server saw it
    assert resp.nat_type == pb.ASYMMETRIC and not resp.is_udp
    assert resp.relay_server == "127.0.0.1:21117"
    assert open_signed_id_pk(verify_key(server), resp.pk) == (B_ID, B_PK)
    with pytest.raises(ValueError):
        open_signed_id_pk(bytes(32), resp.pk)
    assert bt.closed_by_peer()
    for c in (a, bt):
        c.close()
    b.close()
    a_udp.close()


def test_udp_punch_path(server: ServerThread) -> None:
    b = udp_socket()
    assert register(server, b) == 0
    a_udp = register_a(server)
    a = TcpClient(server.tcp, bind="127.0.0.2")
    a.ask(punch_hole_request=pb.PunchHoleRequest(id=B_ID, udp_port=40000, version="1"))
    kind, ph = udp_recv(b)
    assert (kind, ph.udp_port) == ("punch_hole", 40000)
    b_punch = udp_socket()  # B's fresh UDP punch socket announces itself
    sent = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, version="1", answer_token=ph.answer_token)
    b_punch.sendto(messages.build(punch_hole_sent=sent), server.udp)
    kind, resp = a.recv()
    host, port = b_punch.getsockname()
    assert resp.is_udp and addrmod.decode(resp.socket_addr) == SockAddr.of(host, port)
    assert open_signed_id_pk(verify_key(server), resp.pk) == (B_ID, B_PK)
    a.close()
    b.close()
    b_punch.close()
    a_udp.close()


def test_forced_relay(server: ServerThread) -> None:
    b = udp_socket()
    assert register(server, b) == 0
    a_udp = register_a(server)
    a = TcpClient(server.tcp, bind="127.0.0.2")
    a.ask(punch_hole_request=pb.PunchHoleRequest(id=B_ID, force_relay=True, nat_type=pb.SYMMETRIC))
    kind, rr = udp_recv(b)
    assert kind == "request_relay"
    assert re.fullmatch(r"[0-9a-f-]{36}", rr.uuid)
    assert rr.relay_server == "127.0.0.1:21117"
    assert addrmod.decode(rr.socket_addr) == a.local

    bt = TcpClient(server.tcp)
    bt.send(
        relay_response=pb.RelayResponse(
            socket_addr=rr.socket_addr, id=B_ID, version="1.4.2", answer_token=rr.answer_token
        )
    )
    kind, out = a.recv()
    assert kind == "relay_response"
    assert (out.uuid, out.relay_server, out.socket_addr, out.ticket) == (rr.uuid, "127.0.0.1:21117", b"", rr.ticket)
    assert open_signed_id_pk(verify_key(server), out.pk) == (B_ID, B_PK)
    assert bt.closed_by_peer()
    for c in (a, bt):
        c.close()
    b.close()
    a_udp.close()


def test_request_relay_from_a(server: ServerThread) -> None:
    b = udp_socket()
    assert register(server, b) == 0
    a_udp = register_a(server)
    a = TcpClient(server.tcp, bind="127.0.0.2")
    a.ask(request_relay=pb.RequestRelay(id=B_ID, uuid="u-1", relay_server="10.9.9.9:6379", secure=True))
    kind, rr = udp_recv(b)
    assert (kind, rr.secure, rr.relay_server) == ("request_relay", True, "127.0.0.1:21117")  # the server's own
    assert rr.uuid != "u-1" and rr.ticket
    assert addrmod.decode(rr.socket_addr) == a.local
    a.close()
    b.close()
    a_udp.close()


def test_compat_rustdesk_clients_on_both_sides(tmp_path: Path) -> None:
    """With --allow-unsigned, RustDesk's unsigned clients register and relay as with hbbs."""
    srv = ServerThread(make_cfg(tmp_path, relays=["127.0.0.1:21117"], allow_unsigned=True))
    try:
        b = udp_socket()
        kind, msg = udp_ask(b, srv.udp, register_pk=pb.RegisterPk(id="123456789", uuid=b"u", pk=B_PK))
        assert msg.result == 0
        a = TcpClient(srv.tcp, bind="127.0.0.2")
        a.send(request_relay=pb.RequestRelay(id="123456789", uuid="u-1", relay_server="10.9.9.9:1", secure=True))
        kind, rr = udp_recv(b)
        assert (kind, rr.uuid, rr.relay_server) == ("request_relay", "u-1", "127.0.0.1:21117")
        bt = TcpClient(srv.tcp)
        bt.send(relay_response=pb.RelayResponse(socket_addr=rr.socket_addr, id="123456789", version="1"))
        kind, out = a.recv()
        assert (kind, out.uuid) == ("relay_response", "u-1")
        for c in (a, bt):
            c.close()
        b.close()
    finally:
        srv.close()


# --------------------------------------------------------------------------- probes


def test_nat_test_on_both_tcp_ports(server: ServerThread) -> None:
    for to in (server.tcp, server.nat):
        c = TcpClient(to)
        c.send(test_nat_request=pb.TestNatRequest(serial=1))
        kind, msg = c.recv()
        assert (kind, msg.port) == ("test_nat_response", c.local.port)
        c.close()


def test_nat_test_from_one_local_port_sees_one_mapping(server: ServerThread) -> None:
    """What RustDesk does: both probes from the same local port; on loopback, same port twice."""
    seen = []
    port = 0
    for to in (server.tcp, server.nat):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        s.settimeout(TIMEOUT)
        s.connect(to)
        s.sendall(encode_frame(messages.build(test_nat_request=pb.TestNatRequest())))
        seen.append(messages.parse(FrameDecoder().feed(s.recv(100))[0])[1].port)
        s.close()
    assert seen == [port, port]


def test_udp_test_nat_padding(server: ServerThread) -> None:
    c = udp_socket()
    c.sendto(messages.build(test_nat_request=pb.TestNatRequest()), server.udp)
    padded = messages.build(test_nat_request=pb.TestNatRequest(padding=b"\0" * 8))
    c.sendto(padded, server.udp)
    data = c.recv(100)  # the only answer is the padded one's
    assert len(data) <= len(padded)
    kind, msg = messages.parse(data)
    assert (kind, msg.port) == ("test_nat_response", c.getsockname()[1])
    assert server.stats()["drops"]["reply_larger_than_request"] == 1
    c.close()


def test_online_request_on_nat_port(server: ServerThread) -> None:
    b = udp_socket()
    assert register(server, b) == 0
    c = TcpClient(server.nat)
    c.send(online_request=pb.OnlineRequest(id="asker1", peers=["nobody01", B_ID]))
    assert c.recv() == ("online_response", pb.OnlineResponse(states=bytes([0b0100_0000])))
    c.close()
    b.close()


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_registration_and_nat_test(server: ServerThread) -> None:
    b = udp_socket("::1")
    v6peer = Member.new(b"v6peer")
    assert register_udp(b, ("::1", server.server.udp_port), v6peer) == 0
    c = TcpClient(("::1", server.server.nat_port), bind="::1")
    c.send(test_nat_request=pb.TestNatRequest())
    assert c.recv()[1].port == c.local.port
    a_udp = register_a(server)
    a = TcpClient(server.tcp)  # an IPv4 A reaches the IPv6 B: push goes out of the v6 socket
    a.ask(punch_hole_request=pb.PunchHoleRequest(id=v6peer.id))
    assert udp_recv(b)[0] == "punch_hole"
    for x in (a, c):
        x.close()
    b.close()
    a_udp.close()


def test_idle_tcp_connection_closed(tmp_path: Path) -> None:
    srv = ServerThread(make_cfg(tmp_path, idle_timeout=0.2))
    try:
        c = TcpClient(srv.tcp)
        assert c.closed_by_peer()
        c.close()
        assert srv.stats()["events"]["tcp_idle_closed"] >= 1
    finally:
        srv.close()


def test_too_many_connections_refused(tmp_path: Path) -> None:
    srv = ServerThread(make_cfg(tmp_path, max_tcp_connections=2))
    try:
        keep = [TcpClient(srv.tcp), TcpClient(srv.tcp)]
        for c in keep:  # make sure both are accepted before the third
            c.send(test_nat_request=pb.TestNatRequest())
            c.recv()
        extra = TcpClient(srv.tcp)
        assert extra.closed_by_peer()
        assert srv.stats()["drops"]["too_many_connections"] == 1
        for c in [*keep, extra]:
            c.close()
    finally:
        srv.close()


def test_idle_connections_make_room_for_real_clients(tmp_path: Path) -> None:
    srv = ServerThread(make_cfg(tmp_path, max_tcp_connections=2))
    try:
        idle = [TcpClient(srv.tcp), TcpClient(srv.tcp)]  # connect, never send a frame
        for _ in range(50):
            if srv.stats()["tcp_connections"] == 2:
                break
            threading.Event().wait(0.02)
        real = TcpClient(srv.tcp)
        real.send(test_nat_request=pb.TestNatRequest())
        kind, msg = real.recv()
        assert kind == "test_nat_response" and msg.port == real.local.port
        assert idle[0].closed_by_peer()  # the oldest idle one made room
        assert srv.stats()["drops"]["evicted_idle_connection"] == 1
        for c in [*idle, real]:
            c.close()
    finally:
        srv.close()


# --------------------------------------------------------------------------- the CLI entry point


def _spawn(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(tmp_path), "rendezvous", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_rendezvous_stops_cleanly_on_signal(tmp_path: Path, sig: int) -> None:
    proc = _spawn(tmp_path, "--bind", "127.0.0.1", "--port", "0")
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"udp/tcp (\d+)", line)
        assert m, line
        c = udp_socket()
        assert register_to(c, ("127.0.0.1", int(m.group(1)))) == 0
        c.close()
        proc.send_signal(sig)
        assert proc.wait(TIMEOUT * 2) == 0
        assert (tmp_path / "rendezvous.sqlite3").exists() and (tmp_path / "id_ed25519").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def register_to(s: socket.socket, to: tuple[str, int]) -> int:
    return register_udp(s, to, B)


def test_run_rendezvous_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = _spawn(tmp_path, "--bind", "127.0.0.1", "--port", str(port))
        _, err = proc.communicate(timeout=TIMEOUT * 2)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "cannot bind UDP 127.0.0.1" in err
