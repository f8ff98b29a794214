"""RendezvousCore without sockets: every decision, rate limit and cap, with a fake `now`."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from agent import addr as addrmod
from agent import messages
from agent.addr import SockAddr
from agent.crypto import open_signed_id_pk
from agent.proto import rendezvous_pb2 as pb
from agent.registry import PeerRow, Registry
from agent.rendezvous_core import (
    Action,
    CloseTcp,
    Limits,
    Persist,
    RendezvousCore,
    SendTcp,
    SendUdp,
    valid_id,
)

KEY = SigningKey(bytes(range(32)))
PK_B = b"B" * 32
B_ID = "123456789"
B_UUID = b"uuid-of-B"
B_UDP = SockAddr.of("198.51.100.7", 40001)
A_TCP = SockAddr.of("203.0.113.5", 50001)
A_CONN = 1
B_CONN = 2


def sa(text: str) -> SockAddr:
    return addrmod.parse_sockaddr(text)


class Harness:
    """A core over an in-memory registry; Persist actions are applied the way the shell does."""

    def __init__(self, **kw: Any) -> None:
        self.registry = Registry(":memory:")
        counter = itertools.count(1)
        kw.setdefault("new_uuid", lambda: f"uuid-{next(counter)}")
        self.core = RendezvousCore(self.registry, KEY, **kw)
        self.now = 1000.0

    def restart(self, **kw: Any) -> None:
        """A new core over the same database (the in-memory peer table is gone)."""
        self.core = RendezvousCore(self.registry, KEY, **kw)

    def _apply(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            if isinstance(a, Persist):
                self.registry.put(a.row)
        return actions

    def udp(self, src: SockAddr = B_UDP, via: int = 0, raw: bytes | None = None, **member: Any) -> list[Action]:
        data = raw if raw is not None else messages.build(**member)
        actions = self._apply(self.core.handle_udp(data, src, via, self.now))
        for a in actions:
            if isinstance(a, SendUdp) and a.addr == src:
                assert len(a.payload) <= len(data), "amplification"
        return actions

    def tcp(
        self, conn: int, src: SockAddr, role: str = "main", raw: bytes | None = None, **member: Any
    ) -> list[Action]:
        data = raw if raw is not None else messages.build(**member)
        return self._apply(self.core.handle_tcp(conn, src, role, data, self.now))  # type: ignore[arg-type]

    def register(
        self, peer_id: str = B_ID, uuid: bytes = B_UUID, pk: bytes = PK_B, src: SockAddr = B_UDP, via: int = 0
    ) -> int:
        """RegisterPk; returns the result code."""
        acts = self.udp(src, via, register_pk=pb.RegisterPk(id=peer_id, uuid=uuid, pk=pk))
        (reply,) = [a for a in acts if isinstance(a, SendUdp)]
        kind, msg = messages.parse(reply.payload)
        assert kind == "register_pk_response"
        return int(msg.result)

    def heartbeat(self, peer_id: str = B_ID, src: SockAddr = B_UDP, nat: int = 0, via: int = 0) -> bool:
        """RegisterPeer; returns request_pk."""
        acts = self.udp(src, via, register_peer=pb.RegisterPeer(id=peer_id, nat_type=nat))  # type: ignore[arg-type]
        (reply,) = acts
        assert isinstance(reply, SendUdp) and reply.addr == src and reply.via == via
        kind, msg = messages.parse(reply.payload)
        assert kind == "register_peer_response"
        return bool(msg.request_pk)

    def drops(self) -> dict[str, int]:
        return self.core.drops.snapshot()


def only(actions: list[Action], kind: type) -> Any:
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def parsed(payload: bytes) -> tuple[str, Any]:
    return messages.parse(payload, max_len=1 << 16)


R = pb.RegisterPkResponse


# --------------------------------------------------------------------------- registration


def test_register_peer_unknown_asks_for_pk() -> None:
    h = Harness()
    assert h.heartbeat() is True
    assert h.core.stats(h.now)["peers_in_memory"] == 0  # no state for unknown IDs


def test_register_pk_binds_and_persists_then_heartbeat_keeps_online() -> None:
    h = Harness()
    acts = h.udp(register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID, pk=PK_B))
    assert isinstance(acts[0], Persist) and acts[0].row == PeerRow(B_ID, B_UUID, PK_B, "198.51.100.7")
    assert messages.parse(acts[1].payload) == ("register_pk_response", pb.RegisterPkResponse())  # type: ignore[union-attr]
    assert h.registry.get(B_ID) is not None
    assert h.core.stats(h.now)["peers_online"] == 1
    h.now += 15
    assert h.heartbeat(nat=pb.ASYMMETRIC) is False
    assert h.core.peers[B_ID].nat_type == pb.ASYMMETRIC
    h.now += 29
    assert h.core.stats(h.now)["peers_online"] == 1
    h.now += 1  # 30 s after the last registration: offline
    assert h.core.stats(h.now)["peers_online"] == 0


def test_register_peer_from_new_ip_requests_pk_and_does_not_move() -> None:
    h = Harness()
    h.register()
    assert h.heartbeat(src=sa("192.0.2.1:40001")) is True
    assert h.core.peers[B_ID].addr == B_UDP
    assert h.heartbeat(src=sa("198.51.100.7:40999")) is False  # same IP, new port: follows the NAT
    assert h.core.peers[B_ID].addr == sa("198.51.100.7:40999")


def test_register_peer_invalid_id_dropped() -> None:
    h = Harness()
    assert h.udp(register_peer=pb.RegisterPeer(id="")) == []
    assert h.udp(register_peer=pb.RegisterPeer(id="bad id!")) == []
    assert h.drops()["invalid_id"] == 2


@pytest.mark.parametrize("peer_id", ["", "12345", "x" * 65, "has space", "ünïcode1", "semi;colon", "a/b/cdef"])
def test_register_pk_invalid_id_format(peer_id: str) -> None:
    h = Harness()
    assert h.register(peer_id=peer_id) == R.INVALID_ID_FORMAT
    assert h.registry.count() == 0


@pytest.mark.parametrize("peer_id", ["123456", "x" * 64, "Ab_-09", "1000000000"])
def test_valid_ids(peer_id: str) -> None:
    assert valid_id(peer_id)
    h = Harness()
    assert h.register(peer_id=peer_id) == R.OK


def test_register_pk_without_uuid_or_pk_is_ignored() -> None:
    h = Harness()
    assert h.udp(register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID)) == []
    assert h.udp(register_pk=pb.RegisterPk(id=B_ID, pk=PK_B)) == []
    assert h.udp(register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID * 100, pk=PK_B)) == []
    assert h.drops() == {"missing_uuid_or_pk": 2, "field_too_long": 1}


def test_uuid_mismatch_keeps_the_first_owner() -> None:
    h = Harness()
    assert h.register() == R.OK
    h.now += 10
    assert h.register(uuid=b"thief", pk=b"T" * 32, src=sa("192.0.2.66:1")) == R.UUID_MISMATCH
    assert h.register(uuid=b"thief", pk=PK_B, src=B_UDP) == R.UUID_MISMATCH
    assert h.core.peers[B_ID].addr == B_UDP
    assert h.registry.get(B_ID).uuid == B_UUID  # type: ignore[union-attr]
    assert h.core.events["register_pk_uuid_mismatch"] == 2


def test_same_uuid_may_change_key_or_ip_but_not_both() -> None:
    h = Harness()
    h.register()
    h.now += 10
    assert h.register(pk=b"N" * 32) == R.OK  # new key, same IP
    assert h.registry.get(B_ID).pk == b"N" * 32  # type: ignore[union-attr]
    h.now += 10
    new_ip = sa("192.0.2.10:1234")
    assert h.register(pk=b"N" * 32, src=new_ip) == R.OK  # same key, new IP
    assert h.registry.get(B_ID).last_ip == "192.0.2.10"  # type: ignore[union-attr]
    h.now += 10
    assert h.register(pk=b"Z" * 32, src=sa("192.0.2.99:1")) == R.UUID_MISMATCH  # both at once


def test_unchanged_register_pk_writes_nothing() -> None:
    h = Harness()
    h.register()
    h.now += 10
    acts = h.udp(register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID, pk=PK_B))
    assert not any(isinstance(a, Persist) for a in acts)


def test_per_id_rate_fourth_within_6s_too_frequent() -> None:
    h = Harness()
    assert [h.register() for _ in range(3)] == [R.OK] * 3
    h.now += 5.9
    assert h.register() == R.TOO_FREQUENT
    h.now += 5.9  # refused attempts do not extend the window: 11.8 s after the last accepted one
    assert h.register() == R.OK
    assert h.core.events["register_pk_id_too_frequent"] == 1


def test_per_ip_blocker_31st_register_pk_without_pause() -> None:
    h = Harness()
    results = []
    for i in range(31):
        h.now += 1.0
        results.append(h.register(peer_id=f"peer{i:04d}", uuid=b"u%d" % i))
    assert results[:30] == [R.OK] * 30
    assert results[30] == R.TOO_FREQUENT
    h.now += 59.0  # still blocked: the window counts from the last accepted one
    assert h.register(peer_id="peer9999", uuid=b"late") == R.TOO_FREQUENT
    h.now += 2.0  # > 60 s since the 30th
    assert h.register(peer_id="peer9999", uuid=b"late") == R.OK
    # another IP was never affected
    assert h.register(peer_id="other001", uuid=b"o", src=sa("192.0.2.200:5")) == R.OK


def test_per_ip_distinct_ids_per_day() -> None:
    h = Harness()
    for i in range(300):
        h.now += 61  # a pause each time, so only the distinct-ID limit applies
        assert h.register(peer_id=f"peer{i:04d}", uuid=b"u%d" % i) == R.OK
    h.now += 61
    assert h.register(peer_id="peer0300", uuid=b"new") == R.TOO_FREQUENT
    h.now += 61
    assert h.register(peer_id="peer0007", uuid=b"u7") == R.OK  # a known ID is still fine
    h.now += 86400
    assert h.register(peer_id="peer0300", uuid=b"new") == R.OK


def test_ip_limiter_table_is_bounded() -> None:
    h = Harness(limits=Limits(max_ip_states=10))
    for i in range(50):
        h.register(peer_id=f"peer{i:04d}", uuid=b"u%d" % i, src=sa(f"10.0.{i}.1:1"))
    assert len(h.core.ip_states) == 10
    assert list(h.core.ip_states)[-1] == "10.0.49.1"


def test_peer_table_is_bounded_and_reloads_from_db() -> None:
    h = Harness(limits=Limits(max_peers=5))
    for i in range(20):
        h.register(peer_id=f"peer{i:04d}", uuid=b"u%d" % i, src=sa(f"10.1.{i}.1:1"))
    assert len(h.core.peers) == 5
    assert h.registry.count() == 20
    # an evicted peer is known (from the DB) but offline until it registers again
    acts = h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id="peer0000"))
    assert parsed(only(acts, SendTcp).payload)[1].failure == pb.PunchHoleResponse.OFFLINE
    assert h.register(peer_id="peer0000", uuid=b"u0", src=sa("10.1.0.1:1")) == R.OK
    assert h.register(peer_id="peer0000", uuid=b"evil", src=sa("10.1.0.1:1")) == R.UUID_MISMATCH


def test_restart_keeps_bindings() -> None:
    h = Harness()
    h.register()
    h.restart()
    assert h.heartbeat() is True  # not in memory: ask for the key
    acts = h.udp(register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID, pk=PK_B))
    assert not any(isinstance(a, Persist) for a in acts)  # nothing changed on disk
    assert h.heartbeat() is False
    assert h.core.stats(h.now)["peers_online"] == 1  # RegisterPk refreshed the address at once
    assert h.register(uuid=b"thief") == R.UUID_MISMATCH


# --------------------------------------------------------------------------- UDP probes / junk


def test_udp_test_nat_needs_padding() -> None:
    h = Harness()
    src = sa("203.0.113.5:61234")
    assert h.udp(src, test_nat_request=pb.TestNatRequest()) == []
    assert h.drops()["reply_larger_than_request"] == 1
    acts = h.udp(src, test_nat_request=pb.TestNatRequest(padding=b"\0" * 8))
    kind, msg = parsed(only(acts, SendUdp).payload)
    assert (kind, msg.port) == ("test_nat_response", 61234)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xff\xff", "malformed"),
        (b"\x32\x05\x0a", "malformed"),  # truncated RegisterPeer
        (b"\x32" + b"\x00" * 3000, "oversized"),
        (messages.build(punch_hole_response=pb.PunchHoleResponse()), "wrong_kind"),
        (messages.build(configure_update=pb.ConfigUpdate(serial=99)), "wrong_kind"),
        (messages.build(punch_hole_request=pb.PunchHoleRequest(id=B_ID)), "wrong_kind"),
        (messages.build(software_update=pb.SoftwareUpdate(url="x")), "wrong_kind"),
    ],
)
def test_udp_bad_input_dropped_and_counted(data: bytes, reason: str) -> None:
    h = Harness()
    assert h.udp(raw=data) == []
    assert h.udp(sa("127.0.0.1:9"), raw=data) == []  # loopback has no special powers
    assert h.drops() == {reason: 2}


def test_drop_logging_is_rate_limited_per_source(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    with caplog.at_level("INFO", logger="punchthrough.rendezvous"):
        for i in range(100):
            h.udp(sa(f"192.0.2.1:{1000 + i}"), raw=b"\xff")
    assert h.drops()["malformed"] == 100
    assert len([r for r in caplog.records if "dropped" in r.message]) == 1


_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=70),
        "uuid": st.binary(max_size=40),
        "pk": st.binary(max_size=40),
        "serial": st.integers(-(2**31), 2**31 - 1),
        "padding": st.binary(max_size=12),
        "version": st.text(max_size=8),
        "nat_type": st.sampled_from([0, 1, 2]),
        "socket_addr": st.binary(max_size=20),
    },
)


@st.composite
def udp_messages(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["register_peer", "register_pk", "test_nat_request", "punch_hole_sent", "junk"]))
    if kind == "junk":
        return draw(st.binary(max_size=64))
    sub: Any = getattr(pb.RendezvousMessage(), kind)
    for name, value in draw(_fields).items():
        if name in sub.DESCRIPTOR.fields_by_name:
            setattr(sub, name, value)
    return messages.build(**{kind: sub})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(udp_messages(), st.integers(0, 3), st.floats(0, 10)), max_size=25))
def test_property_no_udp_reply_larger_than_its_request(traffic: list[tuple[bytes, int, float]]) -> None:
    h = Harness()
    for data, who, dt in traffic:
        h.now += dt
        src = SockAddr.of(f"192.0.2.{who}", 1000 + who)
        for a in h.core.handle_udp(data, src, 0, h.now):
            if isinstance(a, SendUdp):
                assert a.addr == src
                assert len(a.payload) <= len(data)
            else:
                assert isinstance(a, Persist)


# --------------------------------------------------------------------------- TCP basics


@pytest.mark.parametrize("role", ["main", "nat"])
def test_tcp_test_nat_reports_source_port(role: str) -> None:
    h = Harness()
    acts = h.tcp(7, sa("203.0.113.5:45678"), role, test_nat_request=pb.TestNatRequest(serial=3))
    kind, msg = parsed(only(acts, SendTcp).payload)
    assert (kind, msg.port, msg.HasField("cu")) == ("test_nat_response", 45678, False)


@pytest.mark.parametrize("role", ["main", "nat"])
def test_online_bitmap_msb_first(role: str) -> None:
    h = Harness()
    online = ["peer0000", "peer0002", "peer0008"]
    for i, pid in enumerate(online):
        h.register(peer_id=pid, uuid=b"u%d" % i, src=sa(f"10.2.{i}.1:1"))
    asked = [f"peer{i:04d}" for i in range(10)]
    acts = h.tcp(7, A_TCP, role, online_request=pb.OnlineRequest(id="asker1", peers=asked))
    kind, msg = parsed(only(acts, SendTcp).payload)
    assert kind == "online_response"
    assert msg.states == bytes([0b1010_0000, 0b1000_0000])
    h.now += 30
    assert parsed(h.tcp(7, A_TCP, role, online_request=pb.OnlineRequest(peers=asked))[0].payload)[1].states == b"\0\0"  # type: ignore[union-attr]


def test_register_pk_over_tcp_not_supported() -> None:
    h = Harness()
    acts = h.tcp(7, A_TCP, register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID, pk=PK_B))
    assert parsed(only(acts, SendTcp).payload)[1].result == R.NOT_SUPPORT
    assert h.registry.count() == 0


def test_nat_port_serves_only_nat_and_online() -> None:
    h = Harness()
    h.register()
    assert h.tcp(7, A_TCP, "nat", punch_hole_request=pb.PunchHoleRequest(id=B_ID)) == []
    assert h.drops() == {"wrong_kind": 1}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "malformed"),
        (b"", "empty"),
        (messages.build(punch_hole_response=pb.PunchHoleResponse()), "wrong_kind"),
        (messages.build(register_peer=pb.RegisterPeer(id=B_ID)), "wrong_kind"),
        (messages.build(configure_update=pb.ConfigUpdate(serial=5)), "wrong_kind"),
    ],
)
def test_tcp_bad_input_dropped(data: bytes, reason: str) -> None:
    h = Harness()
    assert h.tcp(7, A_TCP, raw=data) == []
    assert h.drops() == {reason: 1}


# --------------------------------------------------------------------------- punch requests


def online_b(h: Harness, nat: int = pb.ASYMMETRIC) -> None:
    h.register()
    h.heartbeat(nat=nat)


def test_punch_unknown_id_is_empty_response() -> None:
    h = Harness()
    for target in ["987654321", "bad id"]:
        acts = h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=target))
        payload = only(acts, SendTcp).payload
        assert payload == messages.build(punch_hole_response=pb.PunchHoleResponse())
        assert parsed(payload)[1].socket_addr == b""
    assert h.core.pending == {}


def test_punch_offline() -> None:
    h = Harness()
    h.register()
    h.now += 30
    acts = h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))
    assert parsed(only(acts, SendTcp).payload)[1].failure == pb.PunchHoleResponse.OFFLINE


def test_licence_key_checked_when_given() -> None:
    h = Harness()
    online_b(h)
    acts = h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID, licence_key="wrong"))
    assert parsed(only(acts, SendTcp).payload)[1].failure == pb.PunchHoleResponse.LICENSE_MISMATCH
    for key in ["", h.core.public_key_b64]:
        acts = h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID, licence_key=key))
        assert isinstance(only(acts, SendUdp), SendUdp)


def test_same_ip_goes_lan_fetch_local_addr_then_is_local_response() -> None:
    h = Harness(relays=["relay.example.com:21117"])
    h.register(via=1)
    a = sa("198.51.100.7:50002")  # same public IP as B
    v6 = addrmod.encode(sa("[2001:db8::1]:4000"), 0)
    acts = h.tcp(A_CONN, a, punch_hole_request=pb.PunchHoleRequest(id=B_ID, socket_addr_v6=v6))
    push = only(acts, SendUdp)
    assert (push.addr, push.via) == (B_UDP, 1)
    kind, fla = parsed(push.payload)
    assert kind == "fetch_local_addr"
    assert addrmod.decode(fla.socket_addr) == a
    assert fla.relay_server == "relay.example.com:21117"
    assert fla.socket_addr_v6 == v6
    assert h.core.stats(h.now)["pending_requests"] == 1

    local = addrmod.encode(sa("192.168.1.20:50003"), 77)
    la = pb.LocalAddr(socket_addr=fla.socket_addr, local_addr=local, id=B_ID, version="1.4.2", socket_addr_v6=v6)
    acts = h.tcp(B_CONN, sa("198.51.100.7:50003"), local_addr=la)
    assert CloseTcp(B_CONN) in acts
    to_a = only(acts, SendTcp)
    assert to_a.conn == A_CONN
    kind, resp = parsed(to_a.payload)
    assert kind == "punch_hole_response"
    assert resp.is_local and resp.socket_addr == local
    assert resp.relay_server == "relay.example.com:21117"
    assert resp.socket_addr_v6 == v6
    assert open_signed_id_pk(bytes(KEY.verify_key), resp.pk) == (B_ID, PK_B)
    assert h.core.pending == {}


def test_different_ip_punch_hole_then_punch_hole_sent() -> None:
    h = Harness(relays=["r1:21117"])
    online_b(h)
    v6 = addrmod.encode(sa("[2001:db8::a]:5000"), 0)
    req = pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC, udp_port=0, socket_addr_v6=v6, version="1.4.2")
    push = only(h.tcp(A_CONN, A_TCP, punch_hole_request=req), SendUdp)
    kind, ph = parsed(push.payload)
    assert kind == "punch_hole"
    assert addrmod.decode(ph.socket_addr) == A_TCP
    assert (ph.relay_server, ph.nat_type, ph.udp_port, ph.force_relay) == ("r1:21117", pb.ASYMMETRIC, 0, False)
    assert ph.socket_addr_v6 == v6

    b_tcp = sa("198.51.100.7:40555")
    b_v6 = addrmod.encode(sa("[2001:db8::b]:6000"), 0)
    phs = pb.PunchHoleSent(
        socket_addr=ph.socket_addr,
        id=B_ID,
        relay_server="r1:21117",
        nat_type=pb.ASYMMETRIC,
        version="1.4.2",
        socket_addr_v6=b_v6,
    )
    acts = h.tcp(B_CONN, b_tcp, punch_hole_sent=phs)
    assert acts[-1] == CloseTcp(B_CONN)
    to_a = only(acts, SendTcp)
    kind, resp = parsed(to_a.payload)
    assert (to_a.conn, kind) == (A_CONN, "punch_hole_response")
    assert addrmod.decode(resp.socket_addr) == b_tcp
    assert resp.WhichOneof("union") == "nat_type" and resp.nat_type == pb.ASYMMETRIC
    assert not resp.is_udp
    assert resp.socket_addr_v6 == b_v6
    assert open_signed_id_pk(bytes(KEY.verify_key), resp.pk) == (B_ID, PK_B)


def test_punch_hole_sent_without_version_is_not_signed() -> None:
    h = Harness()
    online_b(h)
    push = only(h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp)
    sock = parsed(push.payload)[1].socket_addr
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=pb.PunchHoleSent(socket_addr=sock, id=B_ID))
    assert parsed(only(acts, SendTcp).payload)[1].pk == b""


def test_bad_v6_address_is_not_copied() -> None:
    h = Harness()
    online_b(h)
    req = pb.PunchHoleRequest(id=B_ID, socket_addr_v6=b"\x01" * 400)
    assert parsed(only(h.tcp(A_CONN, A_TCP, punch_hole_request=req), SendUdp).payload)[1].socket_addr_v6 == b""


def test_udp_punch_path_is_udp_response_with_b_mapping() -> None:
    h = Harness()
    online_b(h)
    req = pb.PunchHoleRequest(id=B_ID, udp_port=61000, nat_type=pb.ASYMMETRIC)
    push = only(h.tcp(A_CONN, A_TCP, punch_hole_request=req), SendUdp)
    ph = parsed(push.payload)[1]
    assert ph.udp_port == 61000
    b_punch = sa("198.51.100.7:33333")  # B's new UDP socket, as mapped by its NAT
    phs = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, nat_type=pb.ASYMMETRIC, version="1.4.2")
    acts = h.udp(b_punch, punch_hole_sent=phs)
    to_a = only(acts, SendTcp)  # no UDP reply to the datagram itself
    assert not any(isinstance(a, SendUdp) for a in acts)
    resp = parsed(to_a.payload)[1]
    assert resp.is_udp and addrmod.decode(resp.socket_addr) == b_punch
    assert open_signed_id_pk(bytes(KEY.verify_key), resp.pk) == (B_ID, PK_B)
    # B repeats its datagram; the request is answered already
    assert h.udp(b_punch, punch_hole_sent=phs) == []
    assert h.drops()["no_pending_request"] == 1


def test_udp_hole_sent_for_a_tcp_only_request_is_refused() -> None:
    h = Harness()
    online_b(h)
    ph = parsed(only(h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp).payload)[1]
    assert h.udp(punch_hole_sent=pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID)) == []
    assert h.drops() == {"udp_hole_sent_without_udp_request": 1}
    assert len(h.core.pending) == 1  # still waiting for the TCP answer


@pytest.mark.parametrize("how", ["request", "server"])
def test_forced_relay_request_relay_then_relay_response(how: str) -> None:
    h = Harness(relays=["relay.example.com:21117"], always_relay=how == "server")
    online_b(h)
    a = sa("198.51.100.7:50009") if how == "server" else A_TCP  # always-relay beats the LAN path
    req = pb.PunchHoleRequest(id=B_ID, force_relay=how == "request", conn_type=pb.PORT_FORWARD)
    push = only(h.tcp(A_CONN, a, punch_hole_request=req), SendUdp)
    kind, rr = parsed(push.payload)
    assert kind == "request_relay"
    assert (rr.id, rr.uuid, rr.relay_server, rr.secure, rr.conn_type) == (
        B_ID,
        "uuid-1",
        "relay.example.com:21117",
        True,
        pb.PORT_FORWARD,
    )
    assert addrmod.decode(rr.socket_addr) == a

    answer = pb.RelayResponse(socket_addr=rr.socket_addr, id=B_ID, version="1.4.2")
    acts = h.tcp(B_CONN, B_UDP, relay_response=answer)
    assert acts[-1] == CloseTcp(B_CONN)
    kind, out = parsed(only(acts, SendTcp).payload)
    assert kind == "relay_response"
    assert out.socket_addr == b""
    assert (out.uuid, out.relay_server) == ("uuid-1", "relay.example.com:21117")
    assert out.WhichOneof("union") == "pk"
    assert open_signed_id_pk(bytes(KEY.verify_key), out.pk) == (B_ID, PK_B)


def test_relay_response_keeps_b_choices_and_refusal() -> None:
    h = Harness(relays=["r1:1"])
    online_b(h)
    ph = parsed(only(h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp).payload)[1]
    # B decided on relay itself (B-initiated): its uuid and relay win; no version: id stays
    rr = pb.RelayResponse(
        socket_addr=ph.socket_addr, id=B_ID, uuid="b-uuid", relay_server="b-relay:2", refuse_reason="no"
    )
    out = parsed(only(h.tcp(B_CONN, B_UDP, relay_response=rr), SendTcp).payload)[1]
    assert (out.uuid, out.relay_server, out.refuse_reason, out.id) == ("b-uuid", "b-relay:2", "no", B_ID)


def test_both_symmetric_goes_relay_one_symmetric_punches() -> None:
    h = Harness()
    online_b(h, nat=pb.SYMMETRIC)
    acts = h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC))
    assert parsed(only(acts, SendUdp).payload)[0] == "punch_hole"
    acts = h.tcp(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID, nat_type=pb.SYMMETRIC))
    assert parsed(only(acts, SendUdp).payload)[0] == "request_relay"


def test_both_symmetric_with_an_ipv6_offer_still_punches() -> None:
    """No IPv4 punch can work, but IPv6 needs no NAT traversal: B must get the PunchHole."""
    h = Harness()
    online_b(h, nat=pb.SYMMETRIC)
    v6 = addrmod.encode(addrmod.parse_sockaddr("[2001:db8:1::2]:40000"), 0)
    req = pb.PunchHoleRequest(id=B_ID, nat_type=pb.SYMMETRIC, socket_addr_v6=v6)
    kind, ph = parsed(only(h.tcp(A_CONN, A_TCP, punch_hole_request=req), SendUdp).payload)
    assert kind == "punch_hole" and ph.socket_addr_v6 == v6


def test_relay_round_robin() -> None:
    h = Harness(relays=["r1:1", "r2:2"])
    online_b(h)
    seen = []
    for i in range(4):
        push = only(h.tcp(i, sa(f"203.0.113.5:{6000 + i}"), punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp)
        seen.append(parsed(push.payload)[1].relay_server)
    assert seen == ["r1:1", "r2:2", "r1:1", "r2:2"]


def test_request_relay_from_a_forwarded_to_b() -> None:
    h = Harness(relays=["r1:1"])
    online_b(h)
    rr = pb.RequestRelay(id=B_ID, uuid="a-uuid", relay_server="r9:9", secure=True, licence_key="x", token="t")
    push = only(h.tcp(A_CONN, A_TCP, request_relay=rr), SendUdp)
    assert push.addr == B_UDP
    kind, fwd = parsed(push.payload)
    assert (kind, fwd.id, fwd.uuid, fwd.relay_server, fwd.secure) == ("request_relay", B_ID, "a-uuid", "r9:9", True)
    assert addrmod.decode(fwd.socket_addr) == A_TCP
    assert fwd.token == "" and fwd.licence_key == ""  # nothing B does not need
    answer = pb.RelayResponse(socket_addr=fwd.socket_addr, id=B_ID, version="1")
    out = parsed(only(h.tcp(B_CONN, B_UDP, relay_response=answer), SendTcp).payload)[1]
    assert (out.uuid, out.relay_server) == ("a-uuid", "r9:9")


def test_request_relay_fills_uuid_and_relay_when_missing() -> None:
    h = Harness(relays=["r1:1"])
    online_b(h)
    fwd = parsed(only(h.tcp(A_CONN, A_TCP, request_relay=pb.RequestRelay(id=B_ID)), SendUdp).payload)[1]
    assert (fwd.uuid, fwd.relay_server) == ("uuid-1", "r1:1")


@pytest.mark.parametrize(
    ("setup", "reason"), [("unknown", "ID does not exist"), ("offline", "Remote desktop is offline")]
)
def test_request_relay_unknown_or_offline_refused(setup: str, reason: str) -> None:
    h = Harness()
    if setup == "offline":
        h.register()
        h.now += 31
    out = parsed(only(h.tcp(A_CONN, A_TCP, request_relay=pb.RequestRelay(id=B_ID, uuid="u")), SendTcp).payload)[1]
    assert out.refuse_reason == reason
    assert h.core.pending == {}


# --------------------------------------------------------------------------- pending table


def park(h: Harness, conn: int = A_CONN, a: SockAddr = A_TCP) -> bytes:
    push = only(h.tcp(conn, a, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp)
    return parsed(push.payload)[1].socket_addr


def test_answer_without_pending_dropped_and_b_closed() -> None:
    h = Harness()
    online_b(h)
    sock = addrmod.encode(A_TCP, 5)
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=pb.PunchHoleSent(socket_addr=sock, id=B_ID))
    assert acts == [CloseTcp(B_CONN)]
    assert h.drops() == {"no_pending_request": 1}


def test_answer_for_another_id_is_refused() -> None:
    h = Harness()
    online_b(h)
    sock = park(h)
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=pb.PunchHoleSent(socket_addr=sock, id="intruder1"))
    assert acts == [CloseTcp(B_CONN)]
    assert h.drops() == {"pending_id_mismatch": 1}
    assert len(h.core.pending) == 1


def test_pending_expires_and_is_cleared_on_close() -> None:
    h = Harness()
    online_b(h)
    sock = park(h)
    h.now += 29.9
    h.core.tick(h.now)
    assert len(h.core.pending) == 1
    h.now += 0.2
    h.core.tick(h.now)
    assert h.core.pending == {}
    assert h.core.events["pending_expired"] == 1
    h.heartbeat()
    park(h)
    h.core.tcp_closed(A_CONN)
    assert h.core.pending == {}
    h.core.tcp_closed(A_CONN)  # idempotent
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=pb.PunchHoleSent(socket_addr=sock, id=B_ID))
    assert acts == [CloseTcp(B_CONN)]


def test_expired_pending_not_answered_even_before_tick() -> None:
    h = Harness()
    online_b(h)
    sock = park(h)
    h.now += 30
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=pb.PunchHoleSent(socket_addr=sock, id=B_ID))
    assert acts == [CloseTcp(B_CONN)]


def test_repark_on_same_connection_replaces() -> None:
    h = Harness()
    online_b(h)
    park(h)
    park(h)
    assert len(h.core.pending) == 1


def test_pending_table_is_bounded() -> None:
    h = Harness(limits=Limits(max_pending=8, push_burst=1000))
    online_b(h)
    for i in range(20):
        park(h, conn=100 + i, a=sa(f"203.0.113.5:{7000 + i}"))
    assert len(h.core.pending) == 8
    assert h.core.events["pending_evicted"] == 12
    assert len(h.core._conn_pending) == 8


def test_pushes_to_one_peer_are_rate_limited() -> None:
    h = Harness(limits=Limits(push_burst=5, push_rate=1))
    online_b(h)
    sent = 0
    for i in range(10):
        acts = h.tcp(i, sa(f"203.0.113.5:{8000 + i}"), punch_hole_request=pb.PunchHoleRequest(id=B_ID))
        sent += sum(isinstance(a, SendUdp) for a in acts)
    assert sent == 5
    assert h.drops()["push_rate_limited"] == 5
    h.now += 2
    h.heartbeat()
    acts = h.tcp(50, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))
    assert any(isinstance(a, SendUdp) for a in acts)


def test_local_addr_with_bad_address_dropped() -> None:
    h = Harness()
    online_b(h)
    sock = park(h)
    acts = h.tcp(B_CONN, B_UDP, local_addr=pb.LocalAddr(socket_addr=sock, local_addr=b"x" * 40, id=B_ID))
    assert acts == [CloseTcp(B_CONN)]
    assert h.drops() == {"bad_local_addr": 1}


def test_stats_shape() -> None:
    h = Harness()
    online_b(h)
    park(h)
    s = h.core.stats(h.now)
    assert s["messages"] == {"udp.register_pk": 1, "udp.register_peer": 1, "tcp.punch_hole_request": 1}
    assert (s["peers_online"], s["peers_in_memory"], s["pending_requests"]) == (1, 1, 1)
    assert s["events"]["punch_punch"] == 1
