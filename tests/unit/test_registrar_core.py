"""RegistrarCore with fake time: intervals, timeouts and back-off, request_pk, id changes, pushes, hostile input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.registrar_core import (
    BACKING_OFF,
    ID_TAKEN,
    REGISTER_PK_SIZE,
    REGISTERED,
    REGISTERING,
    SERVER_KEY_REFUSED,
    UNREACHABLE,
    IdTaken,
    Push,
    Registered,
    RegistrarCore,
    ServerKeyLearned,
    ServerKeyRefused,
    StateChanged,
)
from agent.wire import addr as addrmangle
from agent.wire import messages, signing
from agent.wire.addr import SockAddr

SERVER = SockAddr.of("192.0.2.1", 21116)
OTHER = SockAddr.of("192.0.2.66", 21116)
UUID = bytes(range(16))
KEY = SigningKey(bytes(range(32)))
PK = bytes(KEY.verify_key)
SERVER_KEY = SigningKey(b"s" * 32)
SERVER_PK = bytes(SERVER_KEY.verify_key)
R = pb.RegisterPkResponse


def make(**kw: Any) -> RegistrarCore:
    kw.setdefault("server_key", SERVER_PK)
    return RegistrarCore(SERVER, "123456789", UUID, KEY, **kw)


def sent(core: RegistrarCore, now: float) -> list[tuple[str, Any]]:
    return [messages.parse(d) for d in core.datagrams_to_send(now)]


def kinds(core: RegistrarCore, now: float) -> list[str]:
    return [k for k, _ in sent(core, now)]


def pk_reply(core: RegistrarCore, result: int = R.OK, key: SigningKey = SERVER_KEY, challenge: bytes = b"") -> bytes:
    """The server's answer to the core's RegisterPk in flight, signed for its nonce."""
    resp = R(result=result, challenge=challenge)  # type: ignore[arg-type]
    if challenge:
        resp.server_key = bytes(key.verify_key)
    return signing.seal(key, signing.SERVER, core._nonce, messages.build(register_pk_response=resp))


def signed(data: bytes, to: str = "123456789", key: SigningKey = SERVER_KEY) -> bytes:
    """A push as the server sends it: signed for its target."""
    return signing.seal(key, signing.PUSH, to.encode(), data)


def peer_reply(request_pk: bool = False) -> bytes:
    return messages.build(register_peer_response=pb.RegisterPeerResponse(request_pk=request_pk))


def registered_core(now: float = 0.0, **kw: Any) -> RegistrarCore:
    """A core that has registered its key and had its first RegisterPeer answered at `now`."""
    core = make(**kw)
    assert kinds(core, now) == ["register_pk"]
    core.receive_datagram(pk_reply(core), SERVER, now)
    assert kinds(core, now) == ["register_peer"]
    core.receive_datagram(peer_reply(), SERVER, now)
    core.next_events()
    return core


def send_times(core: RegistrarCore, until: float, step: float = 1.0) -> list[float]:
    """Tick the core every `step` seconds (the shell's 1 s tick) and record when it sent."""
    out, t = [], 0.0
    while t <= until:
        if core.datagrams_to_send(t):
            out.append(t)
        t = round(t + step, 6)
    return out


def test_first_send_is_register_pk_with_identity() -> None:
    core = make(salt=3)
    [data] = core.datagrams_to_send(0.0)
    kind, msg = messages.parse(data)
    assert kind == "register_pk"
    assert (msg.id, msg.uuid, msg.pk, msg.id_salt, len(msg.nonce), msg.challenge) == ("123456789", UUID, PK, 3, 16, b"")
    assert len(data) >= REGISTER_PK_SIZE  # padded: the signed challenge answer is never larger
    assert signing.split(data)[1] is None
    assert core.state == REGISTERING
    assert core.datagrams_to_send(0.5) == []


def test_challenge_is_signed_and_sent_back_at_once() -> None:
    core = make()
    [first] = core.datagrams_to_send(0.0)
    nonce = messages.parse(first)[1].nonce
    core.receive_datagram(pk_reply(core, R.CHALLENGE, challenge=b"c" * 16), SERVER, 0.1)
    assert not core.confirmed and core.state == REGISTERING
    [second] = core.datagrams_to_send(0.1)
    msg = messages.parse(second)[1]
    assert (msg.challenge, msg.nonce) == (b"c" * 16, nonce)  # the same attempt, now signed
    body = signing.opened(PK, signing.REGISTER, b"", second)
    assert messages.parse(body)[1].challenge == b"c" * 16
    core.receive_datagram(pk_reply(core), SERVER, 0.2)
    assert core.confirmed and Registered("123456789") in core.next_events()


def test_the_server_key_is_learned_on_first_contact_then_required() -> None:
    core = make(server_key=None)
    core.datagrams_to_send(0.0)
    core.receive_datagram(pk_reply(core, R.CHALLENGE, challenge=b"c" * 16), SERVER, 0.1)
    assert ServerKeyLearned(SERVER_PK) in core.next_events()
    assert core.server_key == SERVER_PK and core.status(0.1)["server_key_learned"]
    core.datagrams_to_send(0.1)
    core.receive_datagram(pk_reply(core, key=SigningKey.generate()), SERVER, 0.2)  # an OK by someone else
    assert not core.confirmed
    core.receive_datagram(pk_reply(core), SERVER, 0.3)
    assert core.confirmed


def test_a_server_with_another_key_is_refused_and_registration_stops() -> None:
    core = make()
    core.datagrams_to_send(0.0)
    impostor = SigningKey.generate()
    core.receive_datagram(pk_reply(core, R.CHALLENGE, key=impostor, challenge=b"c" * 16), SERVER, 0.1)
    assert ServerKeyRefused(SERVER_PK, bytes(impostor.verify_key)) in core.next_events()
    assert core.state == SERVER_KEY_REFUSED and not core.confirmed
    assert send_times(core, 100) == []
    core.receive_datagram(pk_reply(core), SERVER, 101)  # even a genuine answer now: still stopped
    assert core.state == SERVER_KEY_REFUSED


@pytest.mark.parametrize("how", ["unsigned", "other nonce", "other key"])
def test_forged_register_pk_answers_are_dropped(how: str) -> None:
    core = make()
    core.datagrams_to_send(0.0)
    if how == "unsigned":
        data = messages.build(register_pk_response=R(result=R.OK))
    elif how == "other nonce":
        data = signing.seal(SERVER_KEY, signing.SERVER, b"n" * 16, messages.build(register_pk_response=R()))
    else:
        data = pk_reply(core, key=SigningKey.generate())
    core.receive_datagram(data, SERVER, 0.1)
    assert not core.confirmed
    assert sum(core.status(0.1)["drops"].values()) == 1


@pytest.mark.parametrize("how", ["unsigned", "for another peer", "other key"])
def test_pushes_not_signed_by_the_server_for_us_are_dropped(how: str) -> None:
    core = registered_core()
    where = addrmangle.encode(addrmangle.parse_sockaddr("1.2.3.4:5"), 1)
    data = messages.build(punch_hole=pb.PunchHole(socket_addr=where))
    if how == "for another peer":
        data = signed(data, to="987654321")
    elif how == "other key":
        data = signed(data, key=SigningKey.generate())
    core.receive_datagram(data, SERVER, 1.0)
    assert [e for e in core.next_events() if isinstance(e, Push)] == []
    assert core.status(1.0)["drops"] == {"unsigned_push": 1}


def test_silent_server_gets_resends_with_growing_timeout_capped() -> None:
    core = make()
    assert send_times(core, 200) == [0, 3, 9, 21, 45, 75, 105, 135, 165, 195]
    assert core.current_timeout() == 30.0


def test_unreachable_after_two_unanswered_sends_then_recovers() -> None:
    core = make()
    core.datagrams_to_send(0)
    core.datagrams_to_send(3)
    assert core.state == REGISTERING
    core.datagrams_to_send(9)
    assert core.state == UNREACHABLE
    core.receive_datagram(pk_reply(core), SERVER, 10)
    assert core.state == REGISTERED
    assert core.status(10)["consecutive_timeouts"] == 0
    assert core.current_timeout() == 3.0


def test_ok_confirms_then_register_peer_every_interval() -> None:
    core = make(interval=4.0)
    core.datagrams_to_send(0)
    core.receive_datagram(pk_reply(core), SERVER, 0.1)
    events = core.next_events()
    assert Registered("123456789") in events
    assert StateChanged(REGISTERING, REGISTERED) in events
    assert core.state == REGISTERED
    # an immediate RegisterPeer refreshes our address at the server
    [(kind, msg)] = sent(core, 0.1)
    assert (kind, msg.id) == ("register_peer", "123456789")
    core.receive_datagram(peer_reply(), SERVER, 0.2)
    times = []
    t = 0.2
    for _ in range(20):
        t = round(t + 1, 6)
        out = sent(core, t)
        if out:
            times.append(t)
            assert out[0][0] == "register_peer"
            core.receive_datagram(peer_reply(), SERVER, t + 0.05)
    assert times == [4.2, 9.2, 14.2, 19.2]  # reply age >= 4 s, seen on 1 s ticks


def test_interval_is_a_parameter() -> None:
    core = registered_core(interval=15.0)
    assert send_times(core, 14.5) == []
    assert core.datagrams_to_send(15.0)


def test_register_peer_carries_nat_type_and_serial() -> None:
    core = registered_core()
    core.set_nat_type(pb.SYMMETRIC)  # a change is announced at once
    [(kind, msg)] = sent(core, 0.5)
    assert kind == "register_peer"
    assert msg.nat_type == pb.SYMMETRIC
    core.receive_datagram(signed(messages.build(configure_update=pb.ConfigUpdate(serial=7))), SERVER, 0.6)
    core.receive_datagram(peer_reply(), SERVER, 0.6)
    [(_, msg)] = sent(core, 5)
    assert msg.serial == 7


def test_unchanged_nat_type_sends_nothing_extra() -> None:
    core = registered_core()
    core.set_nat_type(0)
    assert core.datagrams_to_send(0.5) == []


def test_nat_type_before_confirmation_waits_for_the_key() -> None:
    core = make()
    core.datagrams_to_send(0)
    core.set_nat_type(pb.ASYMMETRIC)
    assert core.datagrams_to_send(0.5) == []


def test_request_pk_sends_register_pk_at_once() -> None:
    core = registered_core()
    assert kinds(core, 4) == ["register_peer"]
    core.receive_datagram(peer_reply(request_pk=True), SERVER, 4.1)
    assert core.state == REGISTERING
    assert not core.confirmed
    assert kinds(core, 4.1) == ["register_pk"]
    core.receive_datagram(pk_reply(core), SERVER, 4.2)
    assert Registered("123456789") in core.next_events()
    assert kinds(core, 4.2) == ["register_peer"]


def test_server_restart_is_recovered() -> None:
    """Server down for a while (timeouts, unreachable), back with empty memory (request_pk)."""
    core = registered_core()
    t = 0.0
    log: list[tuple[float, str]] = []
    server_up_at = 20.0
    while t < 40:
        t = round(t + 1, 6)
        for kind, _ in sent(core, t):
            log.append((t, kind))
            if t >= server_up_at:
                if kind == "register_peer":
                    core.receive_datagram(peer_reply(request_pk=True), SERVER, t)
                else:
                    core.receive_datagram(pk_reply(core), SERVER, t)
                for kind2, _ in sent(core, t):  # the shell flushes after every datagram
                    log.append((t, kind2))
                    if kind2 == "register_pk":
                        core.receive_datagram(pk_reply(core), SERVER, t)
                        for kind3, _ in sent(core, t):
                            log.append((t, kind3))
                            core.receive_datagram(peer_reply(), SERVER, t)
    assert UNREACHABLE in [e.new for e in core.next_events() if isinstance(e, StateChanged)]
    assert core.state == REGISTERED
    # silent phase: 4, 7, 13 (timeouts 3, 6), then 25 (timeout 12) is the first send the new server hears
    before = [x for x in log if x[0] < server_up_at]
    assert before == [(4, "register_peer"), (7, "register_peer"), (13, "register_peer")]
    assert log[3:6] == [(25, "register_peer"), (25, "register_pk"), (25, "register_peer")]


def test_too_frequent_holds_off_growing_and_resets_on_ok() -> None:
    core = make()
    core.datagrams_to_send(0)
    core.receive_datagram(pk_reply(core, R.TOO_FREQUENT), SERVER, 0)
    assert core.state == BACKING_OFF
    assert send_times(core, 5.9, 0.1) == []
    assert kinds(core, 6.0) == ["register_pk"]
    core.receive_datagram(pk_reply(core, R.TOO_FREQUENT), SERVER, 6.0)
    assert core.datagrams_to_send(17.9) == []
    assert core.datagrams_to_send(18.0)
    for t in (18.0, 42.0, 90.0, 150.0, 210.0):
        core.receive_datagram(pk_reply(core, R.TOO_FREQUENT), SERVER, t)
    assert core.datagrams_to_send(269.9) == []  # capped at 60 s
    assert core.datagrams_to_send(270.0)
    core.receive_datagram(pk_reply(core), SERVER, 270.0)
    assert core.state == REGISTERED
    core.receive_datagram(pk_reply(core, R.TOO_FREQUENT), SERVER, 271.0)
    assert core.datagrams_to_send(276.9) == []
    assert core.datagrams_to_send(277.0)  # back to 6 s


def test_uuid_mismatch_waits_for_new_identity() -> None:
    core = make()
    core.datagrams_to_send(0)
    core.receive_datagram(pk_reply(core, R.UUID_MISMATCH), SERVER, 0.1)
    assert IdTaken("123456789") in core.next_events()
    assert core.state == ID_TAKEN
    assert send_times(core, 300) == []
    core.set_identity("987654321", UUID, KEY, 1)
    [(kind, msg)] = sent(core, 301)
    assert (kind, msg.id) == ("register_pk", "987654321")
    assert core.state == REGISTERING
    core.receive_datagram(pk_reply(core), SERVER, 301.1)
    assert Registered("987654321") in core.next_events()


def test_uuid_mismatch_after_registration_drops_confirmation() -> None:
    core = registered_core()
    core.receive_datagram(peer_reply(request_pk=True), SERVER, 1)
    assert kinds(core, 1) == ["register_pk"]
    core.receive_datagram(pk_reply(core, R.UUID_MISMATCH), SERVER, 1)
    assert not core.confirmed
    assert core.status(1)["state"] == ID_TAKEN


@pytest.mark.parametrize(
    "result", [R.NOT_DEPLOYED, R.SERVER_ERROR, R.ID_EXISTS, R.INVALID_ID_FORMAT, R.NOT_SUPPORT, 99]
)
def test_other_results_retry_slowly(result: int) -> None:
    core = make()
    core.datagrams_to_send(0)
    core.receive_datagram(pk_reply(core, result), SERVER, 0)
    assert core.state.startswith("error: ")
    assert send_times(core, 29.5, 0.5) == []
    assert kinds(core, 30) == ["register_pk"]


def test_stale_reply_while_unreachable_and_unconfirmed_goes_back_to_registering() -> None:
    core = make()
    for t in (0, 3, 9):
        core.datagrams_to_send(t)
    assert core.state == UNREACHABLE
    core.receive_datagram(peer_reply(), SERVER, 10)
    assert core.state == REGISTERING


def test_reply_resets_outstanding_send() -> None:
    core = make()
    core.datagrams_to_send(0)
    core.receive_datagram(pk_reply(core, R.OK), SERVER, 1)
    core.datagrams_to_send(1)  # the immediate RegisterPeer
    core.receive_datagram(peer_reply(), SERVER, 1.5)
    assert core.datagrams_to_send(4) == []
    assert core.datagrams_to_send(5.5)


# -- pushes ---------------------------------------------------------------------------------------


def punch(addr: str, tm: int, relay: str = "r:21117") -> bytes:
    return signed(
        messages.build(
            punch_hole=pb.PunchHole(
                socket_addr=addrmangle.encode(addrmangle.parse_sockaddr(addr), tm), relay_server=relay
            )
        )
    )


def test_pushes_come_out_as_events() -> None:
    core = make()
    core.receive_datagram(punch("198.51.100.7:4000", 1), SERVER, 1.0)
    fla = pb.FetchLocalAddr(socket_addr=addrmangle.encode(addrmangle.parse_sockaddr("198.51.100.7:4000"), 2))
    core.receive_datagram(signed(messages.build(fetch_local_addr=fla)), SERVER, 1.0)
    rr = pb.RequestRelay(id="1", uuid="u-1", relay_server="r:21117")
    core.receive_datagram(signed(messages.build(request_relay=rr)), SERVER, 1.0)
    core.receive_datagram(signed(messages.build(test_nat_response=pb.TestNatResponse(port=5))), SERVER, 1.0)
    events = [e for e in core.next_events() if isinstance(e, Push)]
    assert [e.kind for e in events] == ["punch_hole", "fetch_local_addr", "request_relay", "test_nat_response"]
    assert addrmangle.decode(events[0].message.socket_addr) == addrmangle.parse_sockaddr("198.51.100.7:4000")
    assert events[2].message.uuid == "u-1"
    assert core.status(1)["pushes_received"] == 4


def test_duplicate_push_within_100ms_is_dropped_even_with_new_mangle_time() -> None:
    core = make()
    core.receive_datagram(punch("198.51.100.7:4000", 1000), SERVER, 1.00)
    core.receive_datagram(punch("198.51.100.7:4000", 2000), SERVER, 1.05)  # same push, resent
    core.receive_datagram(punch("198.51.100.8:4000", 3000), SERVER, 1.06)  # another peer
    core.receive_datagram(punch("198.51.100.7:4000", 1000, relay="x:1"), SERVER, 1.07)  # differs
    core.receive_datagram(punch("198.51.100.7:4000", 4000), SERVER, 1.10)  # 100 ms later: new
    pushes = [e for e in core.next_events() if isinstance(e, Push)]
    assert len(pushes) == 4
    assert core.status(1.1)["duplicate_pushes"] == 1


def test_request_relays_with_different_uuids_are_not_duplicates() -> None:
    core = make()
    for uuid in ("a", "b"):
        core.receive_datagram(signed(messages.build(request_relay=pb.RequestRelay(id="1", uuid=uuid))), SERVER, 1.0)
    assert len([e for e in core.next_events() if isinstance(e, Push)]) == 2


def test_duplicate_filter_memory_is_bounded() -> None:
    core = make()
    for i in range(2000):
        core.receive_datagram(punch(f"198.51.{i // 250}.{i % 250}:4000", i), SERVER, 5.0)
    assert len(core._recent) <= 256
    core.receive_datagram(punch("203.0.113.1:1", 1), SERVER, 6.0)
    assert len(core._recent) == 1


def test_datagrams_from_elsewhere_are_dropped_and_counted() -> None:
    core = make()
    core.receive_datagram(pk_reply(core), OTHER, 0)
    core.receive_datagram(punch("198.51.100.7:4000", 1), SockAddr.of("192.0.2.1", 21115), 0)
    assert not core.confirmed
    assert core.next_events() == []
    assert core.status(0)["drops"] == {"foreign_source": 2}


def test_v4_mapped_source_counts_as_the_server() -> None:
    core = make()
    core.datagrams_to_send(0)
    core.receive_datagram(pk_reply(core), SockAddr.of("::ffff:192.0.2.1", 21116), 0)
    assert core.confirmed


def test_ipv6_server() -> None:
    core = RegistrarCore(SockAddr.of("::1", 21116), "123456", UUID, KEY, server_key=SERVER_PK)
    core.datagrams_to_send(0)
    core.receive_datagram(pk_reply(core), SockAddr.of("::1", 21116), 0)
    assert core.confirmed
    core.receive_datagram(pk_reply(core), SockAddr.of("127.0.0.1", 21116), 0)
    assert core.status(0)["drops"] == {"foreign_source": 1}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xff\xff", "malformed"),
        (b"\x0a\x05abc", "malformed"),  # truncated length-delimited field
        (b"\x00" * 5000, "oversized"),
        (messages.build(register_pk_response=R())[:-1] + b"\x80", "malformed"),
    ],
)
def test_garbage_is_dropped_and_counted(data: bytes, reason: str) -> None:
    core = make()
    core.receive_datagram(data, SERVER, 0)
    assert core.status(0)["drops"] == {reason: 1}
    assert core.replies == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_random_datagrams_never_raise(datagrams: list[bytes]) -> None:
    core = make()
    for i, d in enumerate(datagrams):
        core.receive_datagram(d, SERVER, float(i))
        core.datagrams_to_send(float(i))
    core.next_events()
    core.status(100.0)


def test_status_fields() -> None:
    core = registered_core()
    st_ = core.status(2.5)
    assert st_["state"] == REGISTERED
    assert st_["id"] == "123456789"
    assert st_["server"] == "192.0.2.1:21116"
    assert st_["last_reply_age"] == 2.5
    assert st_["registrations_sent"] == 2
    assert st_["replies"] == 2
    assert st_["pushes_received"] == 0
    assert st_["drops"] == {}
    assert st_["unanswered_for"] is None
    assert make().status(0)["last_reply_age"] is None


def test_status_says_how_long_a_heartbeat_has_gone_unanswered() -> None:
    """A dead server shows before the state turns unreachable (status said "registered" for ~10 s)."""
    core = registered_core()
    assert core.datagrams_to_send(core.interval + 1)
    st_ = core.status(core.interval + 3.5)
    assert (st_["state"], st_["unanswered_for"]) == (REGISTERED, 2.5)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        make(interval=0)
    with pytest.raises(ValueError):
        make(reply_timeout=5, max_backoff=4)
