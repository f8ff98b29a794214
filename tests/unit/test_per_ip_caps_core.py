"""Per-source-IP caps, sans-IO: agent.common.ip_caps.PerIpCap and the relay's PairingTable per-IP bound."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.common.ip_caps import PerIpCap, source_key, unread_bytes
from agent.servers.relay_core import EVICTED_OLDEST_WAITER, EVICTED_WAITER_PER_IP, Paired, PairingTable, Wait

A, B = "10.0.0.1", "10.0.0.2"

# ------------------------------------------------------------------ PerIpCap


def test_under_the_cap_nothing_is_evicted() -> None:
    cap: PerIpCap[int] = PerIpCap(3)
    assert [cap.admit(A, i) for i in range(3)] == [[], [], []]
    assert cap.count(A) == 3
    assert len(cap) == 3


def test_at_the_cap_the_ips_own_oldest_makes_room() -> None:
    cap: PerIpCap[int] = PerIpCap(3)
    for i in range(3):
        cap.admit(A, i)
    cap.admit(B, 100)
    assert cap.admit(A, 3) == [0]  # A's oldest, never B's (older still)
    assert cap.admit(A, 4) == [1]
    assert cap.count(A) == 3
    assert cap.count(B) == 1
    assert 0 not in cap
    assert 100 in cap


def test_other_ips_are_never_touched() -> None:
    cap: PerIpCap[str] = PerIpCap(2)
    cap.admit(B, "b1")
    for i in range(50):
        victims = cap.admit(A, f"a{i}")
        assert all(v.startswith("a") for v in victims)
    assert cap.count(A) == 2
    assert cap.count(B) == 1
    assert cap.max_count() == 2
    assert cap.ips == 2


def test_cap_zero_is_no_cap() -> None:
    cap: PerIpCap[int] = PerIpCap(0)
    for i in range(1000):
        assert cap.admit(A, i) == []
    assert cap.count(A) == 1000


def test_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError):
        PerIpCap(-1)


def test_discard_forgets_the_key_and_an_empty_ip() -> None:
    cap: PerIpCap[int] = PerIpCap(2)
    cap.admit(A, 1)
    assert cap.discard(1)
    assert not cap.discard(1)
    assert cap.count(A) == 0
    assert cap.ips == 0
    assert cap.max_count() == 0


def test_a_key_that_spoke_frees_its_slot() -> None:
    cap: PerIpCap[int] = PerIpCap(2)
    cap.admit(A, 1)
    cap.admit(A, 2)
    cap.discard(1)  # it sent its first frame: no longer idle
    assert cap.admit(A, 3) == []


def test_busy_entries_are_skipped() -> None:
    """An entry whose request is already in the kernel is not idle: the next oldest goes instead."""
    cap: PerIpCap[int] = PerIpCap(3)
    for i in range(3):
        cap.admit(A, i)
    assert cap.admit(A, 3, busy=lambda k: k == 0) == [1]
    assert cap.count(A) == 3


def test_all_busy_admits_over_the_cap_then_catches_up() -> None:
    """An accept burst (every one has its request queued) is admitted; once they are idle, the IP
    is brought back below its cap at its next connection, oldest first."""
    cap: PerIpCap[int] = PerIpCap(2)
    for i in range(5):
        assert cap.admit(A, i, busy=lambda _k: True) == []
    assert cap.count(A) == 5
    assert cap.admit(A, 5, busy=lambda _k: False) == [0, 1, 2, 3]
    assert cap.count(A) == 2


def test_victims_does_not_remove() -> None:
    cap: PerIpCap[int] = PerIpCap(1)
    cap.admit(A, 1)
    assert cap.victims(A) == [1]
    assert cap.victims(B) == []
    assert 1 in cap


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 30), st.booleans()), max_size=200))
def test_cap_invariants(ops: list[tuple[str, int, bool]]) -> None:
    cap: PerIpCap[int] = PerIpCap(3)
    live: dict[int, str] = {}
    for ip, key, add in ops:
        if add:
            if key in live:
                continue
            for v in cap.admit(ip, key):
                assert live.pop(v) == ip  # only the same IP's entries are ever evicted
            live[key] = ip
        else:
            assert cap.discard(key) == (live.pop(key, None) is not None)
        for i in "abc":
            assert cap.count(i) == sum(1 for v in live.values() if v == i) <= 3
        assert len(cap) == len(live)


# ------------------------------------------------------------------ unread_bytes


def test_unread_bytes_sees_the_receive_queue() -> None:
    a, b = socket.socketpair()
    try:
        assert unread_bytes(b.fileno()) == 0
        a.sendall(b"hello")
        assert unread_bytes(b.fileno()) == 5
        assert b.recv(5) == b"hello"
        assert unread_bytes(b.fileno()) == 0
    finally:
        a.close()
        b.close()
    assert unread_bytes(-1) == 0


# ------------------------------------------------------------------ PairingTable per IP


def test_waiters_per_ip_the_ips_oldest_makes_room() -> None:
    t: PairingTable[str] = PairingTable(max_waiting=100, max_waiting_per_ip=2)
    t.offer("b1", "B1", 0, B)
    t.offer("a1", "A1", 1, A)
    t.offer("a2", "A2", 2, A)
    res = t.offer("a3", "A3", 3, A)
    assert res == Wait(33.0, ("a1", "A1"))
    assert isinstance(res, Wait)
    assert res.evicted_reason == EVICTED_WAITER_PER_IP
    assert t.waiting_from(A) == 2
    assert t.waiting_from(B) == 1
    assert t.waiting == 3
    # B's waiter still pairs; A's evicted uuid starts over.
    assert t.offer("b1", "B1'", 4, B) == Paired("B1")
    assert t.waiting_from(B) == 0
    assert t.offer("a1", "A1'", 5, B) == Wait(35.0)


def test_the_partner_from_the_same_ip_pairs_even_at_the_cap() -> None:
    """The second half is not parked, so it does not count: both halves behind one NAT still pair."""
    t: PairingTable[str] = PairingTable(max_waiting_per_ip=1)
    t.offer("u", "A", 0, A)
    assert t.offer("u", "B", 1, A) == Paired("A")
    assert t.waiting_from(A) == 0


def test_total_bound_still_applies_and_says_so() -> None:
    t: PairingTable[str] = PairingTable(max_waiting=2, max_waiting_per_ip=5)
    t.offer("a1", "A1", 0, A)
    t.offer("b1", "B1", 1, B)
    res = t.offer("c1", "C1", 2, "10.0.0.3")
    assert isinstance(res, Wait)
    assert res.evicted == ("a1", "A1")
    assert res.evicted_reason == EVICTED_OLDEST_WAITER
    assert t.waiting_from(A) == 0  # the total's victim is forgotten per IP too


def test_cancel_and_expire_free_per_ip_slots() -> None:
    t: PairingTable[str] = PairingTable(pair_wait=10, max_waiting_per_ip=2)
    t.offer("a1", "A1", 0, A)
    t.offer("a2", "A2", 5, A)
    assert t.cancel("a2", "A2")
    assert t.waiting_from(A) == 1
    assert t.expire(10) == [("a1", "A1")]
    assert t.waiting_from(A) == 0
    assert t.per_ip.ips == 0


def test_no_source_is_not_counted() -> None:
    t: PairingTable[int] = PairingTable(max_waiting=10, max_waiting_per_ip=1)
    for i in range(5):
        res = t.offer(f"u{i}", i, 0)
        assert res == Wait(30.0)
    assert t.per_ip.ips == 0


def test_bad_per_ip_parameter() -> None:
    with pytest.raises(ValueError):
        PairingTable(max_waiting_per_ip=-1)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from("xyz"), st.integers(0, 3)), max_size=80))
def test_table_per_ip_invariants(ops: list[tuple[str, str, int]]) -> None:
    t: PairingTable[int] = PairingTable(pair_wait=5, max_waiting=4, max_waiting_per_ip=2)
    now = 0.0
    for n, (uuid, ip, action) in enumerate(ops):
        now += 1
        if action == 0:
            res = t.offer(uuid, n, now, ip)
            if isinstance(res, Wait) and res.evicted is not None:
                assert res.evicted_reason in (EVICTED_WAITER_PER_IP, EVICTED_OLDEST_WAITER)
        elif action == 1:
            t.release(uuid)
        elif action == 2:
            t.expire(now)
        else:
            t.cancel(uuid, n)
        assert t.waiting <= 4
        assert all(t.waiting_from(i) <= 2 for i in "xyz")
        assert sum(t.waiting_from(i) for i in "xyz") == t.waiting


# ------------------------------------------------------------------ source_key


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("127.0.0.2", "127.0.0.2"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2:bbbb::9]", "2001:db8:1:2::/64"),  # the relay's bracketed form, same /64
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_source_key(host: str, key: str) -> None:
    assert source_key(host) == key
