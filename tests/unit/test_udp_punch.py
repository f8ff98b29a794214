"""RustDesk's punch schedule and the punch state machine, in fake time."""

from __future__ import annotations

import itertools

import pytest

from agent.strategies.punch_schedule import TRIGGERED_REPLIES, Puncher, PunchSchedule, _same_endpoint


def test_schedule_starts_at_once_then_20ms_growing_by_half() -> None:
    times = PunchSchedule().send_times()
    # gaps 20, 30, 45, 67.5, 101.25, 151.875 ms, then capped at 200 ms
    assert times[:8] == pytest.approx([0.0, 0.02, 0.05, 0.095, 0.1625, 0.26375, 0.415625, 0.615625])
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) == pytest.approx(0.2)
    assert gaps[6:] == pytest.approx([0.2] * len(gaps[6:]))
    assert times[-1] < 20.0
    assert len(times) == 7 + 97  # 7 sends by 0.42 s, then one per 200 ms while below 20 s


def test_schedule_is_configurable() -> None:
    times = PunchSchedule(first_interval=0.1, growth=2.0, max_interval=0.3, deadline=1.0).send_times()
    assert times == pytest.approx([0.0, 0.1, 0.3, 0.6, 0.9])


def test_puncher_sends_on_schedule_without_bursts() -> None:
    p = Puncher(listen=False, now=10.0)
    assert p.due(10.0)
    assert not p.due(10.0)
    assert p.next_timer() == pytest.approx(10.02)
    assert not p.due(10.019)
    assert p.due(10.02)
    # a loop that wakes up very late sends one datagram, not the backlog
    assert p.due(12.0)
    assert not p.due(12.0)
    assert p.next_timer() > 12.0
    assert p.sent == 3


def test_initiator_stops_at_any_datagram() -> None:
    p = Puncher(listen=False, now=0.0)
    assert p.on_datagram(b"", 0.3)
    assert p.done and p.first_datagram is None and p.finished_at == 0.3
    assert not p.due(0.4)


def test_responder_ignores_empty_datagrams_and_keeps_the_syn() -> None:
    p = Puncher(listen=True, now=0.0)
    assert not p.on_datagram(b"", 0.1)
    assert not p.on_datagram(b"", 0.2)
    syn = b"\x01\x00\x00\x00" + bytes(8) + b"\x01\x00"
    assert p.on_datagram(syn, 0.3)
    assert p.first_datagram == syn
    assert p.ignored_empty == 2


def test_responder_answers_an_empty_datagram_at_once_a_bounded_number_of_times() -> None:
    """ICE's triggered check: the peer's punch got through to us, so one sent back now gets through
    to the peer (its NAT opened toward us when it sent), a schedule gap (20 ms or more) sooner."""
    p = Puncher(listen=True, now=0.0)
    assert not p.reply_now()  # nothing heard yet: only the schedule sends
    assert not p.on_datagram(b"", 0.01)
    assert p.reply_now()
    assert not p.reply_now()  # one reply per datagram heard
    for i in range(20):
        p.on_datagram(b"", 0.02 + i / 1000)
    replies = sum(p.reply_now() for _ in range(40))
    assert replies == TRIGGERED_REPLIES - 1  # a flood of empties gets a bounded answer, never more
    q = Puncher(listen=False, now=0.0)
    assert q.on_datagram(b"", 0.01) and not q.reply_now()  # the initiator is done: KCP's SYN answers


def test_deadline() -> None:
    p = Puncher(listen=True, now=0.0, schedule=PunchSchedule(deadline=1.0))
    sent = 0
    now = 0.0
    while not p.expired(now):
        sent += p.due(now)
        now = p.next_timer()
    assert now == pytest.approx(1.0)
    assert sent == len(PunchSchedule(deadline=1.0).send_times())
    assert not p.due(1.0)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (("127.0.0.1", 5), ("127.0.0.1", 5), True),
        (("::ffff:127.0.0.1", 5, 0, 0), ("127.0.0.1", 5), True),
        (("::1", 5, 0, 0), ("::1", 5), True),
        (("fe80::1%eth0", 5, 0, 2), ("fe80::1", 5), True),
        (("127.0.0.1", 5), ("127.0.0.1", 6), False),
        (("127.0.0.2", 5), ("127.0.0.1", 5), False),
        (("not-an-ip", 5), ("not-an-ip", 5), True),
    ],
)
def test_same_endpoint(a: tuple[object, ...], b: tuple[object, ...], same: bool) -> None:
    assert _same_endpoint(a, b) is same


async def test_answer_copies_follow_the_first_and_stop_when_the_socket_closes() -> None:
    """B's two later PunchHoleSent copies go out while it punches (udp_punch._copies); once the punch
    socket is closed they end quietly instead of raising into the actor."""
    import asyncio
    import socket

    from agent.strategies.udp_punch import _copies

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await _copies(sock, b"sent", server.getsockname())
        assert [server.recv(64), server.recv(64)] == [b"sent", b"sent"]
        task = asyncio.ensure_future(_copies(sock, b"late", server.getsockname(), copies=5))
        await asyncio.sleep(0)
        sock.close()
        await asyncio.wait_for(task, 5)
        server.settimeout(0.05)
        with pytest.raises(TimeoutError):
            server.recv(64)
    finally:
        sock.close()
        server.close()
