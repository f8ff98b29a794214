"""Network-change decisions without a network: which views differ, how the change reads, server hints."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from agent.nat.watch_core import NetView, NetWatchCore, describe_change, usable_addresses
from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.registrar_core import REGISTERING, KeyRequested, Registered, RegistrarCore
from agent.wire import messages, signing
from agent.wire.addr import SockAddr


def view(route: str, *addrs: str) -> NetView:
    return NetView(route, frozenset(addrs))


def test_usable_addresses_drop_what_no_peer_can_reach() -> None:
    raw = ["127.0.0.1", "::1", "fe80::1%eth0", "169.254.3.4", "ff02::1", "0.0.0.0", "::", "junk", "",
           "10.0.2.2", "2001:db8:2::2", "::ffff:192.0.2.7", "198.51.100.22"]
    assert usable_addresses(raw) == {"10.0.2.2", "2001:db8:2::2", "192.0.2.7", "198.51.100.22"}


def test_first_view_is_the_baseline_and_same_view_is_quiet() -> None:
    core = NetWatchCore()
    assert core.observe(view("10.0.2.2", "10.0.2.2"), 0.0) is None
    assert core.observe(view("10.0.2.2", "10.0.2.2"), 1.0) is None
    assert core.changes == 0 and core.status(1.0)["last_change"] is None


def test_a_move_is_reported_once_per_difference_with_what_changed() -> None:
    core = NetWatchCore()
    core.observe(view("10.0.2.2", "10.0.2.2"), 0.0)
    gone = core.observe(view("", ), 1.0)  # cable out: no route, no address
    assert gone is not None and gone.local
    assert gone.reason == "route 10.0.2.2 -> none; gone 10.0.2.2"
    assert core.observe(view(""), 2.0) is None
    back = core.observe(view("198.51.100.22", "198.51.100.22"), 3.0)
    assert back is not None and back.reason == "route none -> 198.51.100.22; new 198.51.100.22"
    st_ = core.status(4.5)
    assert st_["changes"] == 2 and st_["local_changes"] == 2 and st_["last_change_age"] == 1.5
    assert st_["view"] == {"route": "198.51.100.22", "addresses": ["198.51.100.22"]}


def test_an_added_v6_address_alone_is_a_change() -> None:
    core = NetWatchCore()
    core.observe(view("10.0.1.2", "10.0.1.2"), 0.0)
    change = core.observe(view("10.0.1.2", "10.0.1.2", "2001:db8:1::2"), 1.0)
    assert change is not None and change.reason == "new 2001:db8:1::2"


def test_server_hint_is_remote() -> None:
    core = NetWatchCore()
    change = core.server_asked_for_key(5.0)
    assert not change.local and "asked for our key" in change.reason
    assert core.status(5.0)["server_hints"] == 1 and core.changes == 1


addr = st.sampled_from(["10.0.1.2", "10.0.2.2", "198.51.100.22", "2001:db8:1::2", "192.0.2.1"])
views = st.builds(lambda r, a: NetView(r, frozenset(a)), st.sampled_from(["", "10.0.1.2", "198.51.100.22"]),
                  st.sets(addr, max_size=4))


@given(st.lists(views, min_size=1, max_size=30))
def test_changes_count_exactly_the_differences_between_neighbours(seq: list[NetView]) -> None:
    core = NetWatchCore()
    reported = [core.observe(v, float(i)) for i, v in enumerate(seq)]
    expected = sum(1 for a, b in itertools.pairwise(seq) if a != b)
    assert sum(r is not None for r in reported) == expected == core.changes
    for (old, new), r in zip(itertools.pairwise(seq), reported[1:], strict=True):
        if r is not None:
            assert r.reason == describe_change(old, new) and r.reason


# --- the registrar's half: re-registering at once, and the server's hint -----------------------------

SERVER = SockAddr.of("198.51.100.1", 21116)
KEY = SigningKey(b"k" * 32)
SERVER_KEY = SigningKey(b"s" * 32)
SERVER_PK = bytes(SERVER_KEY.verify_key)


def ok(core: RegistrarCore) -> bytes:
    """The server's OK for the core's RegisterPk in flight (signed for its nonce)."""
    body = messages.build(register_pk_response=pb.RegisterPkResponse(result=pb.RegisterPkResponse.OK))
    return signing.seal(SERVER_KEY, signing.SERVER, core._nonce, body)


def registered_core() -> RegistrarCore:
    core = RegistrarCore(SERVER, "1234567890", b"u" * 16, KEY, interval=30.0, server_key=SERVER_PK)
    assert messages.parse(core.datagrams_to_send(0.0)[0])[0] == "register_pk"
    core.receive_datagram(ok(core), SERVER, 0.1)
    assert any(isinstance(e, Registered) for e in core.next_events())
    assert messages.parse(core.datagrams_to_send(0.1)[0])[0] == "register_peer"
    core.receive_datagram(messages.build(register_peer_response=pb.RegisterPeerResponse()), SERVER, 0.2)
    core.next_events()
    return core


def test_reregister_sends_register_pk_now_not_at_the_next_heartbeat() -> None:
    core = registered_core()
    assert core.datagrams_to_send(1.0) == []  # the heartbeat is 30 s away
    core.reregister()
    assert core.state == REGISTERING
    sent = core.datagrams_to_send(1.0)
    assert [messages.parse(d)[0] for d in sent] == ["register_pk"]
    core.receive_datagram(ok(core), SERVER, 1.1)
    assert any(isinstance(e, Registered) for e in core.next_events())
    # ... followed at once by a RegisterPeer, which carries the (maybe re-measured) NAT type
    assert [messages.parse(d)[0] for d in core.datagrams_to_send(1.1)] == ["register_peer"]


def test_request_pk_while_registered_is_a_hint_but_not_before() -> None:
    core = RegistrarCore(SERVER, "1234567890", b"u" * 16, KEY, server_key=SERVER_PK)
    core.datagrams_to_send(0.0)
    ask = messages.build(register_peer_response=pb.RegisterPeerResponse(request_pk=True))
    core.receive_datagram(ask, SERVER, 0.1)  # not yet confirmed: the normal first-contact case
    assert not any(isinstance(e, KeyRequested) for e in core.next_events())
    core = registered_core()
    core.receive_datagram(ask, SERVER, 5.0)
    assert [e for e in core.next_events() if isinstance(e, KeyRequested)] == [KeyRequested("1234567890")]


def test_a_server_hint_after_a_move_does_not_hide_what_moved() -> None:
    core = NetWatchCore()
    core.observe(view("10.0.2.2", "10.0.2.2"), 0.0)
    moved = core.observe(view("198.51.100.22", "198.51.100.22"), 1.0)
    assert moved is not None
    core.server_asked_for_key(1.1)  # the server saw us at the new address
    st_ = core.status(2.0)
    assert "asked for our key" in st_["last_change"]
    assert st_["last_local_change"] == moved.reason
