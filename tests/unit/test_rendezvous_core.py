"""RendezvousCore without sockets: every decision, rate limit and cap, with a fake `now`.

The default harness is the production mode (signed registrations and requests only);
`compat` harnesses add RustDesk's unsigned clients (`allow_unsigned`).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from agent.proto import rendezvous_pb2 as pb
from agent.servers.registry import PeerRow, Registry
from agent.servers.rendezvous_core import (
    RELAY_REFUSED,
    Action,
    CloseTcp,
    Limits,
    Persist,
    RendezvousCore,
    SendTcp,
    SendUdp,
    valid_id,
)
from agent.wire import addr as addrmod
from agent.wire import messages, signing
from agent.wire.addr import SockAddr
from agent.wire.keys import open_signed_id_pk
from tests.signed import Member, register_core, register_via

KEY = SigningKey(bytes(range(32)))
B = Member.new(b"B", salt=0)
B.uuid = b"uuid-of-B"
B_ID = B.id
PK_B = B.pk
B_UUID = B.uuid
B_UDP = SockAddr.of("198.51.100.7", 40001)
A = Member.new(b"A")
A_ID = A.id
A_UDP = SockAddr.of("203.0.113.5", 40000)
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
        kw.setdefault("wall_offset", time.time() - 1000.0)  # requests are signed with the real clock
        self.kw = kw
        self.core = RendezvousCore(self.registry, KEY, **kw)
        self.now = 1000.0
        self.a_registered = False

    def restart(self, **kw: Any) -> None:
        """A new core over the same database (the in-memory peer table is gone)."""
        self.core = RendezvousCore(self.registry, KEY, **{**self.kw, **kw})
        self.a_registered = False

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

    def ask(self, conn: int, src: SockAddr, who: Member = A, role: str = "main", **member: Any) -> list[Action]:
        """A request signed by `who` (registered first, at its own UDP address, if it is A)."""
        if who is A and not self.a_registered:
            assert self.register(A, A_UDP) == R.OK
            self.a_registered = True
        ((kind, sub),) = member.items()
        return self.tcp(conn, src, role, raw=who.request(kind, sub))

    def register(self, who: Member = B, src: SockAddr = B_UDP, via: int = 0, peer_id: str | None = None) -> int:
        """A signed RegisterPk (with its challenge); returns the result code."""
        return register_core(self.core, who, src, self.now, via, self._apply, peer_id)

    def register_unsigned(
        self, peer_id: str = B_ID, uuid: bytes = B_UUID, pk: bytes = PK_B, src: SockAddr = B_UDP, via: int = 0
    ) -> int:
        """RustDesk's RegisterPk (no nonce, no signature); returns the result code."""
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


def pushed(push: SendUdp, to: str = B_ID) -> tuple[str, Any]:
    """A push, checked to carry the server's signature for `to`."""
    signing.opened(bytes(KEY.verify_key), signing.PUSH, to.encode(), push.payload)
    return parsed(push.payload)


R = pb.RegisterPkResponse
NB = pb.NatBehavior


# --------------------------------------------------------------------------- registration (signed)


def test_register_peer_unknown_asks_for_pk() -> None:
    h = Harness()
    assert h.heartbeat() is True
    assert h.core.stats(h.now)["peers_in_memory"] == 0  # no state for unknown IDs


def test_register_pk_binds_and_persists_then_heartbeat_keeps_online() -> None:
    h = Harness()
    assert h.register() == R.OK
    assert h.registry.get(B_ID) == PeerRow(B_ID, B_UUID, PK_B, "198.51.100.7", h.registry.get(B_ID).created_at, True)  # type: ignore[union-attr]
    assert h.core.stats(h.now)["peers_online"] == 1
    h.now += 15
    assert h.heartbeat(nat=pb.ASYMMETRIC) is False
    assert h.core.peers[B_ID].nat_type == pb.ASYMMETRIC
    h.now += 29
    assert h.core.stats(h.now)["peers_online"] == 1
    h.now += 1  # 30 s after the last registration: offline
    assert h.core.stats(h.now)["peers_online"] == 0


def test_first_register_pk_gets_a_signed_challenge_and_binds_nothing() -> None:
    h = Harness()
    nonce = os.urandom(16)
    reply = only(h.udp(raw=B.register_pk(nonce)), SendUdp)
    body = signing.opened(bytes(KEY.verify_key), signing.SERVER, nonce, reply.payload)  # signed for our nonce
    resp = parsed(body)[1]
    assert (resp.result, len(resp.challenge), resp.server_key) == (R.CHALLENGE, 16, bytes(KEY.verify_key))
    assert h.registry.count() == 0 and h.core.peers == {}
    with pytest.raises(signing.SignatureError):
        signing.opened(bytes(KEY.verify_key), signing.SERVER, os.urandom(16), reply.payload)


def test_challenge_is_bound_to_the_address_and_expires() -> None:
    h = Harness()
    nonce = os.urandom(16)
    challenge = parsed(only(h.udp(raw=B.register_pk(nonce)), SendUdp).payload)[1].challenge
    # replayed from another address (or port): challenged again, nothing bound
    other = sa("192.0.2.9:40001")
    resp = parsed(only(h.udp(other, raw=B.register_pk(nonce, challenge)), SendUdp).payload)[1]
    assert resp.result == R.CHALLENGE and h.registry.count() == 0
    h.now += 25  # the epoch after the one it was issued in: still accepted (a challenge lives 30-60 s)
    assert parsed(only(h.udp(raw=B.register_pk(nonce, challenge)), SendUdp).payload)[1].result == R.OK
    h.now += 120
    resp = parsed(only(h.udp(raw=B.register_pk(nonce, challenge)), SendUdp).payload)[1]
    assert resp.result == R.CHALLENGE  # too old: a fresh one


def test_registration_must_be_signed_by_its_key() -> None:
    h = Harness()
    nonce = os.urandom(16)
    challenge = parsed(only(h.udp(raw=B.register_pk(nonce)), SendUdp).payload)[1].challenge
    forged = Member(SigningKey.generate())  # signs B's registration with another key
    rk = pb.RegisterPk(id=B_ID, uuid=B_UUID, pk=PK_B, nonce=nonce, challenge=challenge)
    data = signing.seal(forged.key, signing.REGISTER, b"", messages.build(register_pk=rk))
    assert parsed(only(h.udp(raw=data), SendUdp).payload)[1].result == R.BAD_SIGNATURE
    unsigned = messages.build(register_pk=rk)
    assert parsed(only(h.udp(raw=unsigned), SendUdp).payload)[1].result == R.BAD_SIGNATURE
    assert h.registry.count() == 0
    assert h.core.events["register_pk_bad_signature"] >= 1


def test_the_id_must_be_derived_from_the_key() -> None:
    """A squatter with a key of his own cannot register someone else's ID, nor a chosen one."""
    h = Harness()
    squatter = Member.new(b"squatter")
    assert h.register(squatter, sa("192.0.2.66:1"), peer_id=B_ID) == R.ID_NOT_DERIVED
    assert h.register(squatter, sa("192.0.2.66:1"), peer_id="1000000000") == R.ID_NOT_DERIVED
    assert h.registry.count() == 0
    assert h.register() == R.OK  # the owner is unaffected
    salted = Member.new(b"salted", salt=7)  # the next IDs of a key (after a collision) are its own too
    assert h.register(salted, sa("192.0.2.70:1")) == R.OK


def test_a_signed_binding_never_changes_key(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    assert h.register() == R.OK
    # a thief whose key happens to derive the same ID (2^33 work, or a collision): the binding holds
    monkeypatch.setattr("agent.servers.rendezvous_core.derive_id", lambda pk, salt: B_ID)
    thief = Member.new(b"thief")
    thief.uuid = B_UUID  # the uuid is no secret any more
    h.now += 10
    assert h.register(thief, sa("192.0.2.66:1"), peer_id=B_ID) == R.KEY_MISMATCH
    assert h.register(thief, B_UDP, peer_id=B_ID) == R.KEY_MISMATCH
    assert h.registry.get(B_ID).pk == PK_B  # type: ignore[union-attr]
    assert h.core.peers[B_ID].addr == B_UDP
    assert h.core.events["register_pk_key_mismatch"] == 2


def test_the_same_key_may_move_and_change_uuid() -> None:
    h = Harness()
    h.register()
    h.now += 10
    new_ip = sa("192.0.2.10:1234")
    assert h.register(src=new_ip) == R.OK
    assert h.registry.get(B_ID).last_ip == "192.0.2.10"  # type: ignore[union-attr]
    assert h.core.peers[B_ID].addr == new_ip
    h.now += 10
    moved = Member(B.key, uuid=b"reinstalled")
    assert h.register(moved, new_ip) == R.OK
    assert h.registry.get(B_ID).uuid == b"reinstalled"  # type: ignore[union-attr]


def test_unsigned_heartbeat_keeps_only_the_exact_address_alive() -> None:
    h = Harness()
    h.register()
    assert h.heartbeat(src=sa("192.0.2.1:40001")) is True
    assert h.heartbeat(src=sa("198.51.100.7:40999")) is True  # same IP, new port: must sign again
    assert h.core.peers[B_ID].addr == B_UDP
    assert h.heartbeat() is False


def test_unsigned_registration_refused_by_default() -> None:
    h = Harness()
    assert h.register_unsigned() == R.NOT_SUPPORT
    assert h.registry.count() == 0
    assert h.core.events["register_pk_unsigned_refused"] == 1


def test_register_peer_invalid_id_dropped() -> None:
    h = Harness()
    assert h.udp(register_peer=pb.RegisterPeer(id="")) == []
    assert h.udp(register_peer=pb.RegisterPeer(id="bad id!")) == []
    assert h.drops()["invalid_id"] == 2


@pytest.mark.parametrize("peer_id", ["12345", "x" * 65, "has space", "ünïcode1", "semi;colon", "a/b/cdef"])
def test_register_pk_invalid_id_format(peer_id: str) -> None:
    h = Harness()
    assert h.register(peer_id=peer_id) == R.INVALID_ID_FORMAT
    assert h.registry.count() == 0


@pytest.mark.parametrize("peer_id", ["123456", "x" * 64, "Ab_-09", "1000000000"])
def test_valid_ids(peer_id: str) -> None:
    assert valid_id(peer_id)
    h = Harness(allow_unsigned=True)
    assert h.register_unsigned(peer_id=peer_id) == R.OK


def test_register_pk_without_uuid_or_pk_is_ignored() -> None:
    h = Harness()
    assert h.udp(register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID)) == []
    assert h.udp(register_pk=pb.RegisterPk(id=B_ID, pk=PK_B)) == []
    assert h.udp(register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID * 100, pk=PK_B)) == []
    assert h.udp(register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID, pk=PK_B, nonce=b"short")) == []
    assert h.drops() == {"missing_uuid_or_pk": 2, "field_too_long": 1, "bad_registration_fields": 1}


def test_unchanged_register_pk_writes_nothing() -> None:
    h = Harness()
    h.register()
    h.now += 10
    count = h.registry.put_many
    writes: list[Any] = []
    h.registry.put_many = lambda rows: writes.append(list(rows)) or count([])  # type: ignore[method-assign,func-returns-value]
    assert h.register() == R.OK
    assert writes == []


def test_per_id_rate_fourth_within_6s_too_frequent() -> None:
    h = Harness()
    assert [h.register() for _ in range(3)] == [R.OK] * 3
    h.now += 5.9
    assert h.register() == R.TOO_FREQUENT
    h.now += 5.9  # refused attempts do not extend the window: 11.8 s after the last accepted one
    assert h.register() == R.OK
    assert h.core.events["register_pk_id_too_frequent"] == 1


def members(n: int, tag: str = "peer") -> list[Member]:
    return [Member.new(f"{tag}{i}".encode()) for i in range(n)]


def test_per_ip_blocker_31st_register_pk_without_pause() -> None:
    h = Harness()
    peers = members(32)
    results = []
    for m in peers[:31]:
        h.now += 1.0
        results.append(h.register(m))
    assert results[:30] == [R.OK] * 30
    assert results[30] == R.TOO_FREQUENT
    h.now += 59.0  # still blocked: the window counts from the last accepted one
    assert h.register(peers[31]) == R.TOO_FREQUENT
    h.now += 2.0  # > 60 s since the 30th
    assert h.register(peers[31]) == R.OK
    # another IP was never affected
    assert h.register(Member.new(b"other"), sa("192.0.2.200:5")) == R.OK


def test_challenges_do_not_count_against_the_ip_blocker() -> None:
    """Asking for a challenge binds nothing and costs the server no state: only signed attempts count."""
    h = Harness()
    for _ in range(100):
        h.udp(raw=B.register_pk(os.urandom(16)))
    assert h.register() == R.OK


def test_per_ip_distinct_ids_per_day() -> None:
    h = Harness()
    peers = members(301)
    for m in peers[:300]:
        h.now += 61  # a pause each time, so only the distinct-ID limit applies
        assert h.register(m) == R.OK
    h.now += 61
    assert h.register(peers[300]) == R.TOO_FREQUENT
    h.now += 61
    assert h.register(peers[7]) == R.OK  # a known ID is still fine
    h.now += 86400
    assert h.register(peers[300]) == R.OK


def test_ip_limiter_table_is_bounded() -> None:
    h = Harness(limits=Limits(max_ip_states=10))
    for i, m in enumerate(members(50)):
        h.register(m, sa(f"10.0.{i}.1:1"))
    assert len(h.core.ip_states) == 10
    assert list(h.core.ip_states)[-1] == "10.0.49.1"


def test_peer_table_is_bounded_and_reloads_from_db() -> None:
    h = Harness(limits=Limits(max_peers=5))
    peers = members(20)
    for i, m in enumerate(peers):
        h.register(m, sa(f"10.1.{i}.1:1"))
    assert len(h.core.peers) <= 6  # A's registration for the request below may be in there too
    assert h.registry.count() == 20
    # an evicted peer is known (from the DB) but offline until it registers again
    acts = h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=peers[0].id))
    assert parsed(only(acts, SendTcp).payload)[1].failure == pb.PunchHoleResponse.OFFLINE
    assert h.register(peers[0], sa("10.1.0.1:1")) == R.OK
    assert h.core.peers[peers[0].id].signed


def test_restart_keeps_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    h.register()
    h.restart()
    assert h.heartbeat() is True  # not in memory: ask for the key
    assert h.register() == R.OK
    assert h.heartbeat() is False
    assert h.core.stats(h.now)["peers_online"] == 1  # RegisterPk refreshed the address at once
    monkeypatch.setattr("agent.servers.rendezvous_core.derive_id", lambda pk, salt: B_ID)
    h.now += 10
    assert h.register(Member.new(b"thief"), peer_id=B_ID) == R.KEY_MISMATCH  # the binding came from disk


# --------------------------------------------------------------------------- RustDesk's unsigned clients


def test_compat_uuid_mismatch_keeps_the_first_owner() -> None:
    h = Harness(allow_unsigned=True)
    assert h.register_unsigned() == R.OK
    h.now += 10
    assert h.register_unsigned(uuid=b"thief", pk=b"T" * 32, src=sa("192.0.2.66:1")) == R.UUID_MISMATCH
    assert h.register_unsigned(uuid=b"thief", pk=PK_B, src=B_UDP) == R.UUID_MISMATCH
    assert h.core.peers[B_ID].addr == B_UDP
    assert h.registry.get(B_ID).uuid == B_UUID  # type: ignore[union-attr]
    assert h.core.events["register_pk_uuid_mismatch"] == 2


def test_compat_same_uuid_may_change_key_or_ip_but_not_both() -> None:
    h = Harness(allow_unsigned=True)
    h.register_unsigned()
    h.now += 10
    assert h.register_unsigned(pk=b"N" * 32) == R.OK  # new key, same IP
    assert h.registry.get(B_ID).pk == b"N" * 32  # type: ignore[union-attr]
    h.now += 10
    new_ip = sa("192.0.2.10:1234")
    assert h.register_unsigned(pk=b"N" * 32, src=new_ip) == R.OK  # same key, new IP
    assert h.registry.get(B_ID).last_ip == "192.0.2.10"  # type: ignore[union-attr]
    h.now += 10
    assert h.register_unsigned(pk=b"Z" * 32, src=sa("192.0.2.99:1")) == R.UUID_MISMATCH  # both at once
    h.now += 10
    assert h.heartbeat(src=sa("192.0.2.10:999")) is False  # upstream: same IP, new port follows the NAT


def test_compat_unsigned_never_displaces_or_changes_a_signed_binding() -> None:
    h = Harness(allow_unsigned=True)
    assert h.register() == R.OK
    h.now += 10
    # B's uuid is no secret: with it, an unsigned registration still cannot touch the signed binding
    assert h.register_unsigned(uuid=B_UUID, pk=b"T" * 32, src=B_UDP) == R.UUID_MISMATCH
    assert h.register_unsigned(uuid=B_UUID, pk=PK_B, src=sa("192.0.2.66:1")) == R.UUID_MISMATCH
    assert h.registry.get(B_ID).pk == PK_B and h.registry.get(B_ID).signed  # type: ignore[union-attr]
    assert h.core.peers[B_ID].addr == B_UDP


def test_compat_an_unsigned_binding_is_upgraded_by_its_own_uuid_only() -> None:
    h = Harness(allow_unsigned=True)
    assert h.register_unsigned() == R.OK  # B's ID, registered the RustDesk way first
    other = Member(B.key, uuid=b"someone-else")
    h.now += 10
    assert h.register(other) == R.UUID_MISMATCH
    h.now += 10
    assert h.register() == R.OK  # its own uuid, now signed
    assert h.registry.get(B_ID).signed  # type: ignore[union-attr]


def test_compat_restart_keeps_unsigned_bindings() -> None:
    h = Harness(allow_unsigned=True)
    h.register_unsigned()
    h.restart()
    assert h.heartbeat() is True
    assert h.register_unsigned() == R.OK
    assert h.heartbeat() is False
    assert h.register_unsigned(uuid=b"thief") == R.UUID_MISMATCH


# --------------------------------------------------------------------------- UDP probes / junk


def test_udp_test_nat_needs_padding() -> None:
    h = Harness()
    src = sa("203.0.113.5:61234")
    assert h.udp(src, test_nat_request=pb.TestNatRequest()) == []
    assert h.drops()["reply_larger_than_request"] == 1
    acts = h.udp(src, test_nat_request=pb.TestNatRequest(padding=b"\0" * 8))
    kind, msg = parsed(only(acts, SendUdp).payload)
    assert (kind, msg.port, msg.observed_ip) == ("test_nat_response", 61234, "")  # the IP does not fit


@pytest.mark.parametrize("source", ["203.0.113.5:61234", "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:61234"])
def test_udp_test_nat_says_the_source_ip_when_it_fits(source: str) -> None:
    """netcheck's padded request (64 bytes) has room for the longest IPv6 address text."""
    h = Harness()
    request = messages.build(test_nat_request=pb.TestNatRequest(padding=bytes(64)))
    kind, msg = parsed(only(h.udp(sa(source), raw=request), SendUdp).payload)
    assert (kind, msg.port, msg.observed_ip) == ("test_nat_response", 61234, str(sa(source).ip))


def test_an_unpadded_challenge_request_gets_nothing() -> None:
    """The signed CHALLENGE answer is ~130 bytes: a request smaller than that is not answered."""
    h = Harness()
    rk = pb.RegisterPk(id=B_ID, uuid=B_UUID, pk=PK_B, nonce=os.urandom(16))
    assert h.udp(register_pk=rk) == []
    assert h.drops()["reply_larger_than_request"] == 1


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
        "padding": st.binary(max_size=200),
        "version": st.text(max_size=8),
        "nat_type": st.sampled_from([0, 1, 2]),
        "socket_addr": st.binary(max_size=20),
        "nonce": st.binary(min_size=15, max_size=17),
        "challenge": st.binary(max_size=17),
        "answer_token": st.binary(max_size=17),
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
    h = Harness(allow_unsigned=True)
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
    assert msg.observed_ip == "203.0.113.5"


@pytest.mark.parametrize("role", ["main", "nat"])
def test_online_bitmap_msb_first(role: str) -> None:
    h = Harness()
    peers = members(10)
    for i in (0, 2, 8):
        h.register(peers[i], sa(f"10.2.{i}.1:1"))
    asked = [m.id for m in peers]
    acts = h.tcp(7, A_TCP, role, online_request=pb.OnlineRequest(id="asker1", peers=asked))
    kind, msg = parsed(only(acts, SendTcp).payload)
    assert kind == "online_response"
    assert msg.states == bytes([0b1010_0000, 0b1000_0000])
    h.now += 30
    assert parsed(h.tcp(7, A_TCP, role, online_request=pb.OnlineRequest(peers=asked))[0].payload)[1].states == b"\0\0"  # type: ignore[union-attr]


B_TCP = SockAddr.of("198.51.100.7", 50002)
B_REG_CONN = 9


def register_tcp(h: Harness, conn: int = B_REG_CONN, src: SockAddr = B_TCP, who: Member = B) -> int:
    """Register over a TCP connection, as an agent whose UDP is blocked does."""

    def send(data: bytes) -> bytes:
        return only(h._apply(h.core.handle_tcp(conn, src, "main", data, h.now)), SendTcp).payload

    return register_via(send, who)


def tcp_heartbeat(h: Harness, conn: int = B_REG_CONN, src: SockAddr = B_TCP) -> bool:
    reply = only(h.tcp(conn, src, register_peer=pb.RegisterPeer(id=B_ID)), SendTcp)
    assert reply.conn == conn
    return bool(parsed(reply.payload)[1].request_pk)


def test_registration_over_tcp_binds_the_id_and_pushes_go_down_that_connection() -> None:
    h = Harness()
    assert register_tcp(h) == R.OK
    assert h.registry.get(B_ID) is not None
    assert tcp_heartbeat(h) is False
    push = only(h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendTcp)
    assert push.conn == B_REG_CONN
    assert pushed(push)[0] == "punch_hole"


def test_a_tcp_registration_ends_with_its_connection() -> None:
    """Nobody could push to it any more: A hears 'offline' at once, not after reg_timeout."""
    h = Harness()
    assert register_tcp(h) == R.OK
    h.core.tcp_closed(B_REG_CONN)
    acts = h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))
    assert parsed(only(acts, SendTcp).payload)[1].failure == pb.PunchHoleResponse.OFFLINE
    assert h.core.events["tcp_registration_closed"] == 1


def test_a_heartbeat_keeps_a_tcp_registration_only_on_its_own_connection() -> None:
    """A stranger's connection (even from B's address) or B's UDP socket must sign to take pushes."""
    h = Harness()
    assert register_tcp(h) == R.OK
    assert tcp_heartbeat(h, conn=B_REG_CONN + 1) is True
    assert h.heartbeat(src=B_TCP) is True  # a datagram from the same address and port
    push = only(h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendTcp)
    assert push.conn == B_REG_CONN


def test_back_on_udp_the_tcp_route_is_forgotten() -> None:
    """Its UDP gets through again: pushes go by datagram, and closing the old connection changes nothing."""
    h = Harness()
    assert register_tcp(h) == R.OK
    assert h.register() == R.OK
    h.core.tcp_closed(B_REG_CONN)
    push = only(h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp)
    assert push.addr == B_UDP
    assert h.core.events["tcp_registration_closed"] == 0
    assert h.core._conn_peers == {}


def test_a_challenge_for_udp_does_not_register_over_tcp() -> None:
    """The challenge is bound to the transport too: the same address and port on UDP and TCP are two places."""
    h = Harness()
    nonce = os.urandom(16)
    first = only(h.udp(B_TCP, raw=B.register_pk(nonce)), SendUdp)
    challenge = bytes(parsed(first.payload)[1].challenge)
    second = only(h.tcp(B_REG_CONN, B_TCP, raw=B.register_pk(nonce, challenge)), SendTcp)
    assert parsed(second.payload)[1].result == R.CHALLENGE
    assert h.registry.count() == 0


def test_unsigned_registration_over_tcp_is_refused_by_default() -> None:
    h = Harness()
    acts = h.tcp(7, A_TCP, register_pk=pb.RegisterPk(id=B_ID, uuid=B_UUID, pk=PK_B))
    assert parsed(only(acts, SendTcp).payload)[1].result == R.NOT_SUPPORT
    assert h.registry.count() == 0


def test_nat_port_serves_only_nat_and_online() -> None:
    h = Harness()
    h.register()
    assert h.ask(7, A_TCP, role="nat", punch_hole_request=pb.PunchHoleRequest(id=B_ID)) == []
    assert h.drops() == {"wrong_kind": 1}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "malformed"),
        (b"", "empty"),
        (messages.build(punch_hole_response=pb.PunchHoleResponse()), "wrong_kind"),
        (messages.build(register_peer_response=pb.RegisterPeerResponse()), "wrong_kind"),
        (messages.build(configure_update=pb.ConfigUpdate(serial=5)), "wrong_kind"),
    ],
)
def test_tcp_bad_input_dropped(data: bytes, reason: str) -> None:
    h = Harness()
    assert h.tcp(7, A_TCP, raw=data) == []
    assert h.drops() == {reason: 1}


# --------------------------------------------------------------------------- who asks


def online_b(h: Harness, nat: int = pb.ASYMMETRIC) -> None:
    assert h.register() == R.OK
    h.heartbeat(nat=nat)


def refusal(acts: list[Action]) -> str:
    kind, msg = parsed(only(acts, SendTcp).payload)
    return str(msg.other_failure if kind == "punch_hole_response" else msg.refuse_reason)


@pytest.mark.parametrize("member", ["punch_hole_request", "request_relay"])
def test_unsigned_requests_are_refused(member: str) -> None:
    h = Harness()
    online_b(h)
    sub = pb.PunchHoleRequest(id=B_ID) if member == "punch_hole_request" else pb.RequestRelay(id=B_ID)
    acts = h.tcp(A_CONN, A_TCP, raw=messages.build(**{member: sub}))
    assert "only signed requests" in refusal(acts)
    assert h.core.pending == {} and not any(isinstance(a, SendUdp) for a in acts)


def test_a_request_names_a_key_bound_or_derived_requester() -> None:
    h = Harness()
    online_b(h)
    # unregistered (its UDP may be blocked): taken on the key its ID is derived from, named in the push
    stranger = Member.new(b"stranger")
    acts = h.ask(A_CONN, A_TCP, who=stranger, punch_hole_request=pb.PunchHoleRequest(id=B_ID))
    ph = pushed(only(acts, SendUdp))[1]
    assert (ph.requester_id, ph.requester_pk) == (stranger.id, stranger.pk)
    # ... but an ID not derived from the key it shows is nobody's
    sub = pb.PunchHoleRequest(id=B_ID, requester_id="1000000000", requester_pk=stranger.pk)
    sub.request_time_ms, sub.request_nonce = int(time.time() * 1000), os.urandom(16)
    claim = signing.seal(stranger.key, signing.REQUEST, b"", messages.build(punch_hole_request=sub))
    assert "not derived from the key" in refusal(h.tcp(3, A_TCP, raw=claim))
    # claiming A's (registered) ID with his own key: the signature is not by the key bound to A
    h.ask(9, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))  # registers A
    sub = pb.PunchHoleRequest(id=B_ID, requester_id=A_ID, requester_pk=stranger.pk)
    sub.request_time_ms, sub.request_nonce = int(time.time() * 1000), bytes(16)
    forged = signing.seal(stranger.key, signing.REQUEST, b"", messages.build(punch_hole_request=sub))
    assert "not signed by the key bound to" in refusal(h.tcp(A_CONN, A_TCP, raw=forged))
    assert h.core.events["request_bad_signature"] == 1


def test_an_id_bound_the_rustdesk_way_signs_no_requests() -> None:
    h = Harness(allow_unsigned=True)
    online_b(h)
    assert h.register_unsigned(peer_id="123456789", uuid=b"u", src=A_UDP) == R.OK
    sub = pb.PunchHoleRequest(id=B_ID, requester_id="123456789", requester_pk=A.pk)
    sub.request_time_ms, sub.request_nonce = int(time.time() * 1000), bytes(16)
    data = signing.seal(A.key, signing.REQUEST, b"", messages.build(punch_hole_request=sub))
    assert "not registered with a key" in refusal(h.tcp(A_CONN, A_TCP, raw=data))


def test_a_replayed_or_stale_request_is_refused() -> None:
    h = Harness(limits=Limits(push_burst=100))
    online_b(h)
    h.ask(9, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))  # registers A
    data = A.request("punch_hole_request", pb.PunchHoleRequest(id=B_ID))
    assert any(isinstance(a, SendUdp) for a in h.tcp(A_CONN, A_TCP, raw=data))
    assert "replayed" in refusal(h.tcp(3, sa("192.0.2.99:5"), raw=data))  # the same request from elsewhere
    sub = pb.PunchHoleRequest(id=B_ID, requester_id=A_ID, request_nonce=os.urandom(16))
    sub.request_time_ms = int((time.time() - 700) * 1000)
    stale = signing.seal(A.key, signing.REQUEST, b"", messages.build(punch_hole_request=sub))
    assert "off this server's clock" in refusal(h.tcp(4, A_TCP, raw=stale))


def test_the_nonce_memory_is_bounded_per_requester() -> None:
    h = Harness(limits=Limits(push_burst=1000, max_nonces_per_id=5, max_nonce_ids=2))
    online_b(h)
    for i in range(20):
        h.ask(10 + i, sa(f"203.0.113.5:{9000 + i}"), punch_hole_request=pb.PunchHoleRequest(id=B_ID))
    assert len(h.core._nonces[A_ID]) == 5
    for m in members(3, "asker"):
        assert h.register(m, sa("192.0.2.80:1")) == R.OK
        h.ask(99, A_TCP, who=m, punch_hole_request=pb.PunchHoleRequest(id=B_ID))
    assert len(h.core._nonces) == 2


def test_push_names_the_requester_with_its_key_and_is_signed_for_b() -> None:
    h = Harness()
    online_b(h)
    push = only(h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp)
    kind, ph = pushed(push)
    assert (kind, ph.requester_id, ph.requester_pk, len(ph.answer_token)) == ("punch_hole", A_ID, A.pk, 16)
    with pytest.raises(signing.SignatureError):
        signing.opened(bytes(KEY.verify_key), signing.PUSH, b"someone-else", push.payload)  # not for anyone else


# --------------------------------------------------------------------------- punch requests


def test_punch_unknown_id_is_empty_response() -> None:
    h = Harness()
    for target in ["987654321", "bad id"]:
        acts = h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=target))
        payload = only(acts, SendTcp).payload
        assert payload == messages.build(punch_hole_response=pb.PunchHoleResponse())
        assert parsed(payload)[1].socket_addr == b""
    assert h.core.pending == {}


def test_punch_offline() -> None:
    h = Harness()
    h.register()
    h.now += 30
    acts = h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))
    assert parsed(only(acts, SendTcp).payload)[1].failure == pb.PunchHoleResponse.OFFLINE


def test_licence_key_checked_when_given() -> None:
    h = Harness()
    online_b(h)
    acts = h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID, licence_key="wrong"))
    assert parsed(only(acts, SendTcp).payload)[1].failure == pb.PunchHoleResponse.LICENSE_MISMATCH
    for key in ["", h.core.public_key_b64]:
        acts = h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID, licence_key=key))
        assert isinstance(only(acts, SendUdp), SendUdp)


def test_same_ip_goes_lan_fetch_local_addr_then_is_local_response() -> None:
    h = Harness(relays=["relay.example.com:21117"])
    h.register(via=1)
    a = sa("198.51.100.7:50002")  # same public IP as B
    v6 = addrmod.encode(sa("[2001:db8::1]:4000"), 0)
    acts = h.ask(A_CONN, a, punch_hole_request=pb.PunchHoleRequest(id=B_ID, socket_addr_v6=v6))
    push = only(acts, SendUdp)
    assert (push.addr, push.via) == (B_UDP, 1)
    kind, fla = pushed(push)
    assert kind == "fetch_local_addr"
    assert addrmod.decode(fla.socket_addr) == a
    assert fla.relay_server == "relay.example.com:21117"
    assert fla.socket_addr_v6 == v6
    assert h.core.stats(h.now)["pending_requests"] == 1

    local = addrmod.encode(sa("192.168.1.20:50003"), 77)
    la = pb.LocalAddr(socket_addr=fla.socket_addr, local_addr=local, id=B_ID, version="1.4.2", socket_addr_v6=v6)
    assert h.tcp(B_CONN, sa("198.51.100.7:50003"), local_addr=la) == [CloseTcp(B_CONN)]  # no token: not B's
    assert h.drops()["answer_token_mismatch"] == 1
    la.answer_token = fla.answer_token
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


def test_same_ip_udp_punch_request_answered_at_once_without_a_push() -> None:
    """A's UDP punch request beside its TCP one: on one LAN no UDP punch is needed, and a second
    FetchLocalAddr only made B answer twice (and spent a push token)."""
    h = Harness(relays=["relay.example.com:21117"])
    h.register()
    a = sa("198.51.100.7:50002")  # same public IP as B
    acts = h.ask(A_CONN, a, punch_hole_request=pb.PunchHoleRequest(id=B_ID, udp_port=61000))
    assert not [act for act in acts if isinstance(act, SendUdp)]
    kind, resp = parsed(only(acts, SendTcp).payload)
    assert (kind, resp.is_local, resp.is_udp, resp.failure) == ("punch_hole_response", True, False, 0)
    assert h.core.pending == {}
    assert h.core.events["punch_udp_same_lan"] == 1
    tcp = h.ask(A_CONN, a, punch_hole_request=pb.PunchHoleRequest(id=B_ID))  # the TCP request still fetches
    assert pushed(only(tcp, SendUdp))[0] == "fetch_local_addr"
    forced = h.ask(A_CONN, a, punch_hole_request=pb.PunchHoleRequest(id=B_ID, udp_port=61000, force_relay=True))
    assert pushed(only(forced, SendUdp))[0] == "request_relay"


def test_different_ip_punch_hole_then_punch_hole_sent() -> None:
    h = Harness(relays=["r1:21117"])
    online_b(h)
    v6 = addrmod.encode(sa("[2001:db8::a]:5000"), 0)
    req = pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC, udp_port=0, socket_addr_v6=v6, version="1.4.2")
    push = only(h.ask(A_CONN, A_TCP, punch_hole_request=req), SendUdp)
    kind, ph = pushed(push)
    assert kind == "punch_hole"
    assert addrmod.decode(ph.socket_addr) == A_TCP
    assert (ph.relay_server, ph.nat_type, ph.udp_port, ph.force_relay) == ("r1:21117", pb.ASYMMETRIC, 0, False)
    assert ph.socket_addr_v6 == v6

    b_tcp = sa("198.51.100.7:40555")
    b_v6 = addrmod.encode(sa("[2001:db8::b]:6000"), 0)
    phs = pb.PunchHoleSent(
        socket_addr=ph.socket_addr,
        id=B_ID,
        relay_server="b-chosen:9",
        nat_type=pb.ASYMMETRIC,
        version="1.4.2",
        socket_addr_v6=b_v6,
        answer_token=ph.answer_token,
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
    assert resp.relay_server == "r1:21117"  # the server's relay, never B's
    assert open_signed_id_pk(bytes(KEY.verify_key), resp.pk) == (B_ID, PK_B)


def test_the_key_always_comes_from_the_registry_signed() -> None:
    """An answer without `version` (upstream sends B's key unsigned then) still gets the signed key."""
    h = Harness()
    online_b(h)
    ph = pushed(only(h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp))[1]
    phs = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, answer_token=ph.answer_token)
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=phs)
    assert open_signed_id_pk(bytes(KEY.verify_key), parsed(only(acts, SendTcp).payload)[1].pk) == (B_ID, PK_B)


def test_bad_v6_address_is_not_copied() -> None:
    h = Harness()
    online_b(h)
    req = pb.PunchHoleRequest(id=B_ID, socket_addr_v6=b"\x01" * 400)
    assert pushed(only(h.ask(A_CONN, A_TCP, punch_hole_request=req), SendUdp))[1].socket_addr_v6 == b""


def test_udp_punch_path_is_udp_response_with_b_mapping() -> None:
    h = Harness()
    online_b(h)
    req = pb.PunchHoleRequest(id=B_ID, udp_port=61000, nat_type=pb.ASYMMETRIC)
    push = only(h.ask(A_CONN, A_TCP, punch_hole_request=req), SendUdp)
    ph = pushed(push)[1]
    assert ph.udp_port == 61000
    b_punch = sa("198.51.100.7:33333")  # B's new UDP socket, as mapped by its NAT
    phs = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, nat_type=pb.ASYMMETRIC, version="1.4.2")
    assert h.udp(b_punch, punch_hole_sent=phs) == []  # without the push's token: not B
    phs.answer_token = ph.answer_token
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
    ph = pushed(only(h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp))[1]
    sent = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, answer_token=ph.answer_token)
    assert h.udp(punch_hole_sent=sent) == []
    assert h.drops() == {"udp_hole_sent_without_udp_request": 1}
    assert len(h.core.pending) == 1  # still waiting for the TCP answer


def ticket_ok(uuid: str, relay: str, ticket: bytes, now: float) -> bool:
    try:
        signing.check_ticket((bytes(KEY.verify_key),), ticket, uuid, relay, time.time())
    except signing.SignatureError:
        return False
    return True


@pytest.mark.parametrize("how", ["request", "server"])
def test_forced_relay_request_relay_then_relay_response(how: str) -> None:
    h = Harness(relays=["relay.example.com:21117"], always_relay=how == "server")
    online_b(h)
    a = sa("198.51.100.7:50009") if how == "server" else A_TCP  # always-relay beats the LAN path
    req = pb.PunchHoleRequest(id=B_ID, force_relay=how == "request", conn_type=pb.PORT_FORWARD)
    push = only(h.ask(A_CONN, a, punch_hole_request=req), SendUdp)
    kind, rr = pushed(push)
    assert kind == "request_relay"
    assert (rr.id, rr.uuid, rr.relay_server, rr.secure, rr.conn_type) == (
        B_ID,
        "uuid-1",
        "relay.example.com:21117",
        True,
        pb.PORT_FORWARD,
    )
    assert addrmod.decode(rr.socket_addr) == a
    assert ticket_ok("uuid-1", "relay.example.com:21117", rr.ticket, h.now)

    answer = pb.RelayResponse(socket_addr=rr.socket_addr, id=B_ID, version="1.4.2", answer_token=rr.answer_token)
    acts = h.tcp(B_CONN, B_UDP, relay_response=answer)
    assert acts[-1] == CloseTcp(B_CONN)
    kind, out = parsed(only(acts, SendTcp).payload)
    assert kind == "relay_response"
    assert out.socket_addr == b""
    assert (out.uuid, out.relay_server, out.ticket) == ("uuid-1", "relay.example.com:21117", rr.ticket)
    assert out.WhichOneof("union") == "pk"
    assert open_signed_id_pk(bytes(KEY.verify_key), out.pk) == (B_ID, PK_B)


def test_relay_response_to_a_punch_gets_the_servers_relay_and_key() -> None:
    h = Harness(relays=["r1:1"])
    online_b(h)
    ph = pushed(only(h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp))[1]
    # B decided on the relay itself (B-initiated): its uuid pairs, but the relay and the key are the server's
    rr = pb.RelayResponse(
        socket_addr=ph.socket_addr, id=B_ID, uuid="b-uuid", relay_server="b-relay:2", answer_token=ph.answer_token
    )
    rr.pk = b"T" * 32
    out = parsed(only(h.tcp(B_CONN, B_UDP, relay_response=rr), SendTcp).payload)[1]
    assert (out.uuid, out.relay_server, out.refuse_reason) == ("b-uuid", "r1:1", "")
    assert open_signed_id_pk(bytes(KEY.verify_key), out.pk) == (B_ID, PK_B)
    assert ticket_ok("b-uuid", "r1:1", out.ticket, h.now)


def test_a_refusal_from_b_reaches_a_at_once_and_alone() -> None:
    """B turns A away (not on its allow list): A hears B's reason, cleaned, and nothing else."""
    h = Harness(relays=["r1:1"])
    online_b(h)
    ph = pushed(only(h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp))[1]
    rr = pb.RelayResponse(
        socket_addr=ph.socket_addr, id=B_ID, refuse_reason="no\n" + "x" * 500, answer_token=ph.answer_token
    )
    out = parsed(only(h.tcp(B_CONN, B_UDP, relay_response=rr), SendTcp).payload)[1]
    assert out.refuse_reason.startswith("no?x") and len(out.refuse_reason) == 200
    assert (out.relay_server, out.ticket, out.pk) == ("", b"", b"")
    assert h.core.events["answer_refused"] == 1 and h.core.pending == {}


def test_both_symmetric_goes_relay_one_symmetric_punches() -> None:
    h = Harness()
    online_b(h, nat=pb.SYMMETRIC)
    acts = h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC))
    assert pushed(only(acts, SendUdp))[0] == "punch_hole"
    acts = h.ask(A_CONN, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID, nat_type=pb.SYMMETRIC))
    assert pushed(only(acts, SendUdp))[0] == "request_relay"


SYM_RANDOM = pb.NatBehavior(mapping=NB.ENDPOINT_DEPENDENT, allocation=NB.RANDOM, filtering=NB.PORT_DEPENDENT)
SYM_SEQ = pb.NatBehavior(mapping=NB.ENDPOINT_DEPENDENT, allocation=NB.SEQUENTIAL, step=1, filtering=NB.PORT_DEPENDENT)
CONE = pb.NatBehavior(mapping=NB.ENDPOINT_INDEPENDENT, allocation=NB.PRESERVING, filtering=NB.PORT_DEPENDENT)
FULL_CONE = pb.NatBehavior(mapping=NB.ENDPOINT_INDEPENDENT, allocation=NB.PRESERVING, filtering=NB.OPEN)


@pytest.mark.parametrize(
    ("a_nat", "a", "b_nat", "b", "push"),
    [
        # a port-restricted cone and a random symmetric NAT: no punch can meet, relay at once
        (pb.ASYMMETRIC, CONE, pb.SYMMETRIC, SYM_RANDOM, "request_relay"),
        (pb.SYMMETRIC, SYM_RANDOM, pb.ASYMMETRIC, CONE, "request_relay"),
        # a full cone lets the symmetric side in; sequential ports can be predicted; unmeasured: try
        (pb.ASYMMETRIC, FULL_CONE, pb.SYMMETRIC, SYM_RANDOM, "punch_hole"),
        (pb.SYMMETRIC, SYM_SEQ, pb.ASYMMETRIC, CONE, "punch_hole"),
        (pb.ASYMMETRIC, None, pb.SYMMETRIC, SYM_RANDOM, "punch_hole"),
        (pb.ASYMMETRIC, CONE, pb.SYMMETRIC, None, "punch_hole"),
        (pb.ASYMMETRIC, CONE, pb.ASYMMETRIC, CONE, "punch_hole"),
    ],
)
def test_measured_nat_behaviour_sends_hopeless_pairs_to_the_relay_at_once(
    a_nat: int, a: Any, b_nat: int, b: Any, push: str
) -> None:
    h = Harness()
    assert h.register() == R.OK
    rp = pb.RegisterPeer(id=B_ID, nat_type=b_nat)  # type: ignore[arg-type]
    if b is not None:
        rp.nat_behavior.CopyFrom(b)
    assert only(h.udp(B_UDP, register_peer=rp), SendUdp)
    req = pb.PunchHoleRequest(id=B_ID, nat_type=a_nat)  # type: ignore[arg-type]
    if a is not None:
        req.nat_behavior.CopyFrom(a)
    kind, msg = pushed(only(h.ask(A_CONN, A_TCP, punch_hole_request=req), SendUdp))
    assert kind == push
    if kind == "punch_hole":  # B learns A's behaviour (to plan its side; the server passes it on checked)
        assert msg.nat_behavior == (a if a is not None else pb.NatBehavior())
    assert h.core.events["punch_relay_by_behavior"] == (push == "request_relay")


def test_both_symmetric_with_an_ipv6_offer_still_punches() -> None:
    """No IPv4 punch can work, but IPv6 needs no NAT traversal: B must get the PunchHole."""
    h = Harness()
    online_b(h, nat=pb.SYMMETRIC)
    v6 = addrmod.encode(addrmod.parse_sockaddr("[2001:db8:1::2]:40000"), 0)
    req = pb.PunchHoleRequest(id=B_ID, nat_type=pb.SYMMETRIC, socket_addr_v6=v6)
    kind, ph = pushed(only(h.ask(A_CONN, A_TCP, punch_hole_request=req), SendUdp))
    assert kind == "punch_hole" and ph.socket_addr_v6 == v6


def test_relay_round_robin() -> None:
    h = Harness(relays=["r1:1", "r2:2"])
    online_b(h)
    seen = []
    for i in range(4):
        acts = h.ask(i, sa(f"203.0.113.5:{6000 + i}"), punch_hole_request=pb.PunchHoleRequest(id=B_ID))
        seen.append(pushed(only(acts, SendUdp))[1].relay_server)
    assert seen == ["r1:1", "r2:2", "r1:1", "r2:2"]


def test_request_relay_from_a_gets_the_servers_relay_and_uuid() -> None:
    """A names a relay and a uuid of its choosing (a Redis command, say): the server ignores both."""
    h = Harness(relays=["r1:1"])
    online_b(h)
    rr = pb.RequestRelay(id=B_ID, uuid="x\r\nPING\r\n", relay_server="10.0.0.1:6379", secure=True, licence_key="x")
    push = only(h.ask(A_CONN, A_TCP, request_relay=rr), SendUdp)
    assert push.addr == B_UDP
    kind, fwd = pushed(push)
    assert (kind, fwd.id, fwd.uuid, fwd.relay_server, fwd.secure) == ("request_relay", B_ID, "uuid-1", "r1:1", True)
    assert (fwd.requester_id, fwd.requester_pk) == (A_ID, A.pk)
    assert addrmod.decode(fwd.socket_addr) == A_TCP
    assert fwd.token == "" and fwd.licence_key == ""  # nothing B does not need
    assert ticket_ok("uuid-1", "r1:1", fwd.ticket, h.now)
    answer = pb.RelayResponse(socket_addr=fwd.socket_addr, id=B_ID, version="1", answer_token=fwd.answer_token)
    out = parsed(only(h.tcp(B_CONN, B_UDP, relay_response=answer), SendTcp).payload)[1]
    assert (out.uuid, out.relay_server, out.ticket) == ("uuid-1", "r1:1", fwd.ticket)


def test_no_relay_configured_names_none() -> None:
    h = Harness()
    online_b(h)
    fwd = pushed(only(h.ask(A_CONN, A_TCP, request_relay=pb.RequestRelay(id=B_ID)), SendUdp))[1]
    assert (fwd.uuid, fwd.relay_server) == ("uuid-1", "")
    assert ticket_ok("uuid-1", "", fwd.ticket, h.now)


@pytest.mark.parametrize(
    ("setup", "reason"), [("unknown", "ID does not exist"), ("offline", "Remote desktop is offline")]
)
def test_request_relay_unknown_or_offline_refused(setup: str, reason: str) -> None:
    h = Harness()
    if setup == "offline":
        h.register()
        h.now += 31
    out = parsed(only(h.ask(A_CONN, A_TCP, request_relay=pb.RequestRelay(id=B_ID, uuid="u")), SendTcp).payload)[1]
    assert out.refuse_reason == reason
    assert h.core.pending == {}


def test_compat_unsigned_clients_keep_their_uuid_and_answer_from_their_ip() -> None:
    """RustDesk on both sides (allowed by flag): A joins the relay with the uuid it chose, and B,
    which echoes no token, is believed only from the address its push went to."""
    h = Harness(relays=["r1:1"], allow_unsigned=True)
    assert h.register_unsigned(peer_id="123456789") == R.OK
    h.heartbeat(peer_id="123456789")
    rr = pb.RequestRelay(id="123456789", uuid="a-uuid", relay_server="r9:9")
    _, fwd = pushed(only(h.tcp(A_CONN, A_TCP, request_relay=rr), SendUdp), to="123456789")
    assert (fwd.uuid, fwd.relay_server, fwd.requester_id, fwd.answer_token) == ("a-uuid", "r1:1", "", b"")
    answer = pb.RelayResponse(socket_addr=fwd.socket_addr, id="123456789")
    assert h.tcp(B_CONN, sa("192.0.2.66:1"), relay_response=answer) == [CloseTcp(B_CONN)]
    assert h.drops()["answer_from_wrong_address"] == 1
    out = parsed(only(h.tcp(B_CONN, sa("198.51.100.7:2"), relay_response=answer), SendTcp).payload)[1]
    assert (out.uuid, out.relay_server) == ("a-uuid", "r1:1")


# --------------------------------------------------------------------------- pending table


def park(h: Harness, conn: int = A_CONN, a: SockAddr = A_TCP) -> Any:
    """A's request parked; returns B's push (its socket_addr names A's request, its token proves B)."""
    push = only(h.ask(conn, a, punch_hole_request=pb.PunchHoleRequest(id=B_ID)), SendUdp)
    return pushed(push)[1]


def sent(ph: Any, peer_id: str = B_ID, token: bytes | None = None) -> pb.PunchHoleSent:
    return pb.PunchHoleSent(
        socket_addr=ph.socket_addr, id=peer_id, answer_token=ph.answer_token if token is None else token
    )


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
    ph = park(h)
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=sent(ph, "intruder1"))
    assert acts == [CloseTcp(B_CONN)]
    assert h.drops() == {"pending_id_mismatch": 1}
    assert len(h.core.pending) == 1


def test_an_answer_without_the_push_token_is_not_bs() -> None:
    """A stranger who knows A's address answers for B: dropped, and B's real answer still counts."""
    h = Harness()
    online_b(h)
    ph = park(h)
    for token in (b"", os.urandom(16)):
        assert h.tcp(B_CONN, sa("192.0.2.66:1"), punch_hole_sent=sent(ph, token=token)) == [CloseTcp(B_CONN)]
    assert h.drops() == {"answer_token_mismatch": 2}
    assert any(isinstance(a, SendTcp) for a in h.tcp(B_CONN, B_UDP, punch_hole_sent=sent(ph)))


def test_pending_expires_and_is_cleared_on_close() -> None:
    h = Harness()
    online_b(h)
    ph = park(h)
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
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=sent(ph))
    assert acts == [CloseTcp(B_CONN)]


def test_expired_pending_not_answered_even_before_tick() -> None:
    h = Harness()
    online_b(h)
    ph = park(h)
    h.now += 30
    acts = h.tcp(B_CONN, B_UDP, punch_hole_sent=sent(ph))
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
    pushes = 0
    for i in range(10):
        acts = h.ask(i, sa(f"203.0.113.5:{8000 + i}"), punch_hole_request=pb.PunchHoleRequest(id=B_ID))
        pushes += sum(isinstance(a, SendUdp) for a in acts)
    assert pushes == 5
    assert h.drops()["push_rate_limited"] == 5
    h.now += 2
    h.heartbeat()
    acts = h.ask(50, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))
    assert any(isinstance(a, SendUdp) for a in acts)


def test_local_addr_with_bad_address_dropped() -> None:
    h = Harness()
    online_b(h)
    ph = park(h)
    la = pb.LocalAddr(socket_addr=ph.socket_addr, local_addr=b"x" * 40, id=B_ID, answer_token=ph.answer_token)
    acts = h.tcp(B_CONN, B_UDP, local_addr=la)
    assert acts == [CloseTcp(B_CONN)]
    assert h.drops() == {"bad_local_addr": 1}


def test_stats_shape() -> None:
    h = Harness()
    online_b(h)
    park(h)
    s = h.core.stats(h.now)
    assert s["messages"] == {"udp.register_pk": 4, "udp.register_peer": 1, "tcp.punch_hole_request": 1}
    assert (s["peers_online"], s["peers_in_memory"], s["pending_requests"]) == (2, 2, 1)
    assert s["events"]["punch_punch"] == 1


# --------------------------------------------------------------------------- a peer on the server's host


def test_a_peer_registered_over_loopback_is_handed_out_at_the_address_a_reached_us_at() -> None:
    """The README's setup: B runs the server embedded and registers with it over 127.0.0.1. A, from
    elsewhere, reached the server at 198.51.100.1: that is where B's punch sockets are, too."""
    h = Harness()
    b_lo = sa("127.0.0.1:40001")
    assert h.register(src=b_lo) == R.OK
    h.heartbeat(src=b_lo, nat=pb.ASYMMETRIC)
    h.ask(9, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))  # registers A
    here = sa("198.51.100.1:21116")
    for udp in (False, True):
        req = pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC, udp_port=61000 if udp else 0)
        acts = h.core.handle_tcp(A_CONN, A_TCP, "main", A.request("punch_hole_request", req), h.now, here)
        kind, ph = pushed(only(acts, SendUdp))
        assert kind == "punch_hole"  # not "same LAN": A is elsewhere
        sent = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, answer_token=ph.answer_token)
        b_answer = sa("127.0.0.1:40555")
        acts = h.udp(b_answer, punch_hole_sent=sent) if udp else h.tcp(B_CONN, b_answer, punch_hole_sent=sent)
        resp = parsed(only(acts, SendTcp).payload)[1]
        assert addrmod.decode(resp.socket_addr) == sa("198.51.100.1:40555")
        assert resp.is_udp == udp


@pytest.mark.parametrize(
    ("a", "here"),
    [
        ("127.0.0.1:50001", "127.0.0.1:21116"),  # A on the same host: loopback is right for it
        ("[2001:db8::5]:50001", "[2001:db8::1]:21116"),  # A over IPv6: B's v4 loopback sockets are not there
    ],
)
def test_no_alias_where_loopback_is_right_or_the_family_differs(a: str, here: str) -> None:
    h = Harness()
    assert h.register(src=sa("127.0.0.1:40001")) == R.OK
    h.heartbeat(src=sa("127.0.0.1:40001"), nat=pb.ASYMMETRIC)
    h.ask(9, A_TCP, punch_hole_request=pb.PunchHoleRequest(id=B_ID))  # registers A
    req = A.request("punch_hole_request", pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC))
    _, ph = pushed(only(h.core.handle_tcp(A_CONN, sa(a), "main", req, h.now, sa(here)), SendUdp))
    sent = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, answer_token=ph.answer_token)
    resp = parsed(only(h.tcp(B_CONN, sa("127.0.0.1:40555"), punch_hole_sent=sent), SendTcp).payload)[1]
    assert addrmod.decode(resp.socket_addr) == sa("127.0.0.1:40555")


# --------------------------------------------------------------------------- NAT-test port over UDP


def test_the_nat_test_port_answers_only_test_nat_over_udp() -> None:
    h = Harness()
    padded = messages.build(test_nat_request=pb.TestNatRequest(padding=bytes(64)))
    (reply,) = h.core.handle_udp(padded, B_UDP, 1, h.now, "nat")
    assert isinstance(reply, SendUdp) and (reply.via, reply.other_port) == (1, False)
    assert parsed(reply.payload)[1].port == B_UDP.port
    for member in (B.register_pk(os.urandom(16)), messages.build(register_peer=pb.RegisterPeer(id=B_ID))):
        assert h.core.handle_udp(member, B_UDP, 1, h.now, "nat") == []
    assert h.drops() == {"wrong_kind": 2}
    assert h.registry.count() == 0


def test_an_answer_from_the_other_port_goes_to_the_asker_and_is_never_larger() -> None:
    h = Harness()
    flip = messages.build(test_nat_request=pb.TestNatRequest(padding=bytes(64), answer_from_other_port=True))
    (reply,) = h.udp(B_UDP, 0, raw=flip)
    assert isinstance(reply, SendUdp) and (reply.addr, reply.via, reply.other_port) == (B_UDP, 0, True)
    assert len(reply.payload) <= len(flip)
    bare = messages.build(test_nat_request=pb.TestNatRequest(answer_from_other_port=True))
    assert h.udp(B_UDP, 0, raw=bare) == []  # an unpadded request would be outgrown by its answer
    assert h.drops() == {"reply_larger_than_request": 1}


# --------------------------------------------------------------------------- direct-only requests, birthday


def _b_behind(h: Harness, nat: int, behavior: Any) -> None:
    assert h.register() == R.OK
    rp = pb.RegisterPeer(id=B_ID, nat_type=nat)  # type: ignore[arg-type]
    rp.nat_behavior.CopyFrom(behavior)
    only(h.udp(B_UDP, register_peer=rp), SendUdp)


def test_a_direct_only_request_that_no_punch_can_meet_is_answered_not_relayed() -> None:
    """A link on the relay looking for a direct path must not make the server push B a relay it will
    never use: both symmetric, nothing to do but say so."""
    h = Harness()
    _b_behind(h, pb.SYMMETRIC, SYM_RANDOM)
    req = pb.PunchHoleRequest(id=B_ID, nat_type=pb.SYMMETRIC, udp_port=4000, direct_only=True, nat_behavior=SYM_RANDOM)
    acts = h.ask(A_CONN, A_TCP, punch_hole_request=req)
    assert refusal(acts) == "no direct path can meet between these two NATs"
    assert not [a for a in acts if isinstance(a, SendUdp)]
    assert h.core.events["punch_direct_only_hopeless"] == 1


def test_a_direct_only_request_between_a_cone_and_a_random_symmetric_nat_asks_for_birthday_probing() -> None:
    h = Harness()
    _b_behind(h, pb.SYMMETRIC, SYM_RANDOM)
    req = pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC, udp_port=4000, direct_only=True, nat_behavior=CONE)
    kind, push = pushed(only(h.ask(A_CONN, A_TCP, punch_hole_request=req), SendUdp))
    assert (kind, push.birthday, push.udp_port) == ("punch_hole", True, 4000)
    # B's UDP answer: A hears that B was asked for birthday probing
    sent = pb.PunchHoleSent(socket_addr=push.socket_addr, id=B_ID, answer_token=push.answer_token)
    acts = h.udp(sa("198.51.100.7:40999"), raw=messages.build(punch_hole_sent=sent))
    resp = parsed(only(acts, SendTcp).payload)[1]
    assert (resp.is_udp, resp.birthday) == (True, True)
    # without our UDP port (the TCP request of the same race) there is nothing to probe with
    tcp_req = pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC, direct_only=True, nat_behavior=CONE)
    assert refusal(h.ask(A_CONN + 1, sa("203.0.113.5:50002"), punch_hole_request=tcp_req)).startswith("no direct")
    # and a request that takes the relay is relayed at once, as before
    plain = pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC, udp_port=4000, nat_behavior=CONE)
    assert pushed(only(h.ask(A_CONN + 2, sa("203.0.113.5:50003"), punch_hole_request=plain), SendUdp))[0] == (
        "request_relay"
    )


# --------------------------------------------------------------------------- relay choice


def test_the_least_loaded_live_relay_gets_the_pair() -> None:
    core = Harness(relays=["r1:1", "r2:2", "r3:3"]).core
    assert [core.next_relay() for _ in range(3)] == ["r1:1", "r2:2", "r3:3"]  # nothing known: in turn
    core.relay_checked("r1:1", 10)
    core.relay_checked("r2:2", 0)
    core.relay_checked("r3:3", 1)
    assert [core.next_relay() for _ in range(4)] == ["r2:2", "r3:3", "r2:2", "r3:3"]  # each hand-out counts
    core.relay_checked("r2:2", None)  # one miss: still in
    assert core.relay_state["r2:2"].up
    core.relay_checked("r2:2", None)  # two: out
    assert not core.relay_state["r2:2"].up and core.events["relay_down"] == 1
    assert {core.next_relay() for _ in range(20)} == {"r1:1", "r3:3"}
    core.relay_checked("r2:2", 0)
    assert core.next_relay() == "r2:2" and core.events["relay_up"] == 1
    for r in ("r1:1", "r2:2", "r3:3"):  # every relay silent: better a try than no relay at all
        core.relay_checked(r, None)
        core.relay_checked(r, None)
    assert core.next_relay() in ("r1:1", "r2:2", "r3:3")
    assert core.stats(5.0)["relays"]["r2:2"]["up"] is False


def test_a_refused_health_check_takes_the_relay_out_at_once() -> None:
    """Nothing listens where the relay was (its process or node died): no second chance to wait for,
    while every pair handed to it until the next check would fail."""
    core = Harness(relays=["r1:1", "r2:2"]).core
    core.relay_checked("r1:1", 0)
    core.relay_checked("r2:2", 0)
    core.relay_checked("r2:2", RELAY_REFUSED)
    assert not core.relay_state["r2:2"].up and core.events["relay_down"] == 1
    assert {core.next_relay() for _ in range(5)} == {"r1:1"}
    core.relay_checked("r2:2", 3)  # back, with its load
    assert core.relay_state["r2:2"].up and core.relay_state["r2:2"].load == 3
