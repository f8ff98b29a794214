"""RegistrationPath: UDP first, TCP when UDP stays silent, back to UDP when it answers (no sockets, no clock)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.rendezvous.registration_path import TCP, UDP, CloseTcp, OpenTcp, ProbeUdp, RegistrationPath, Step
from agent.runtime_paths import leave_udp_blocked_hint, take_udp_blocked_hint


def on_tcp(now: float = 3.0) -> RegistrationPath:
    path = RegistrationPath()
    assert path.due(now, 3.0) == [OpenTcp()]
    assert path.tcp_connected(now) is True
    return path


def test_udp_answers_in_time_no_tcp() -> None:
    path = RegistrationPath()
    for t in range(100):
        assert path.due(float(t), 2.9) == []
        assert path.due(float(t), None) == []
    assert path.transport == UDP


def test_silent_udp_opens_tcp_and_registration_moves_there() -> None:
    path = RegistrationPath()
    assert path.due(3.0, 3.0) == [OpenTcp()]
    assert path.transport == UDP  # not before the connection is up
    assert path.due(3.5, 3.5) == []  # one connect at a time
    assert path.tcp_connected(3.6) is True
    assert path.status()["transport"] == TCP
    assert path.status()["why_tcp"] == "no answer over UDP in 3 s"


def test_on_tcp_udp_is_probed_now_and_then_and_an_answer_moves_back() -> None:
    path = on_tcp(3.0)
    assert path.due(32.9, None) == []
    assert path.due(33.0, None) == [ProbeUdp()]
    assert path.due(40.0, None) == []
    assert path.due(63.0, None) == [ProbeUdp()]
    assert path.udp_answered(63.1) == [CloseTcp()]
    assert path.transport == UDP
    assert path.udp_answered(63.2) == []  # already there
    assert path.status()["back_to_udp"] == 1


def test_back_on_udp_a_silent_network_goes_to_tcp_again() -> None:
    path = on_tcp()
    path.udp_answered(10.0)
    assert path.due(11.0, 1.0) == []
    assert path.due(13.0, 3.0) == [OpenTcp()]


def test_a_lost_connection_reconnects_with_a_growing_backoff() -> None:
    path = on_tcp(3.0)
    assert path.tcp_failed(10.0) is True  # registration was on it: re-register (over UDP until it is back)
    assert path.transport == UDP
    assert path.due(10.5, None) == []
    assert path.due(11.0, None) == [OpenTcp()]
    assert path.tcp_failed(11.1) is False  # the connect failed: nothing was on it
    assert path.due(13.0, None) == []
    assert path.due(13.1, None) == [OpenTcp()]
    path.tcp_failed(13.2)
    waits = []
    t = 13.2
    for _ in range(10):
        steps: list[Step] = []
        start = t
        while not steps:
            t += 0.5
            steps = path.due(t, None)
        waits.append(t - start)
        path.tcp_failed(t)
    assert waits[-1] <= 30.5 and waits[-1] >= 30.0  # capped
    assert path.tcp_connected(t) is False  # a connect nobody asked for is not taken
    assert path.due(t + 30.0, None) == [OpenTcp()]
    assert path.tcp_connected(t + 30.1) is True
    path.tcp_failed(t + 40)
    assert path.due(t + 41, None) == [OpenTcp()]  # a success reset the backoff


def test_a_connect_in_flight_is_cancelled_when_udp_answers() -> None:
    path = RegistrationPath()
    assert path.due(3.0, 3.0) == [OpenTcp()]
    assert path.udp_answered(3.1) == [CloseTcp()]
    assert path.tcp_connected(3.2) is False


def test_a_network_change_starts_over_on_udp() -> None:
    path = on_tcp()
    assert path.reset() == [CloseTcp()]
    assert path.transport == UDP and path.status()["tcp"] == "down"
    assert path.due(20.0, 2.0) == []
    assert path.reset() == []


def test_bad_timers_refused() -> None:
    with pytest.raises(ValueError):
        RegistrationPath(tcp_after=0)
    with pytest.raises(ValueError):
        RegistrationPath(reconnect_min=5, reconnect_max=1)


@given(st.lists(st.tuples(st.sampled_from(["due", "ok", "fail", "udp", "reset"]), st.floats(0, 5)), max_size=60))
def test_any_sequence_keeps_one_connection_at_most(ops: list[tuple[str, float]]) -> None:
    """Whatever happens, at most one connect is asked for at a time, and TCP carries registration
    only while a connection is up."""
    path = RegistrationPath()
    now = 0.0
    open_asked = 0
    for op, dt in ops:
        now += dt
        if op == "due":
            steps = path.due(now, dt * 2)
            open_asked += steps.count(OpenTcp())
            if CloseTcp() in steps:
                open_asked = 0
        elif op == "ok":
            if path.tcp_connected(now):
                assert open_asked == 1
            open_asked = 0 if path.tcp != "up" else open_asked
        elif op == "fail":
            if path.tcp != "down":
                path.tcp_failed(now)
            open_asked = 0
        elif op == "udp":
            path.udp_answered(now)
            open_asked = 0
        else:
            path.reset()
            open_asked = 0
        assert open_asked <= 1
        assert path.transport == (TCP if path.tcp == "up" and path.want_tcp else UDP)


def test_up_found_udp_blocked_so_tcp_comes_first() -> None:
    """No 3 s of unanswered registrations to learn again what `up`'s preflight just learnt."""
    path = RegistrationPath()
    path.prefer_tcp("UDP blocked at start (no reply to 2 requests in 6 s)")
    assert path.due(0.0, None) == [OpenTcp()]
    assert path.tcp_connected(0.1) is True and path.transport == TCP
    assert path.due(10.0, None) == []
    assert path.due(30.1, None) == [ProbeUdp()]  # and UDP is still checked now and then


def test_the_udp_blocked_hint_is_used_once_and_only_fresh(tmp_path: Path) -> None:
    leave_udp_blocked_hint(tmp_path, "no reply to 2 requests in 6 s")
    assert take_udp_blocked_hint(tmp_path) == "no reply to 2 requests in 6 s"
    assert take_udp_blocked_hint(tmp_path) == ""
    leave_udp_blocked_hint(tmp_path, "stale")
    old = time.time() - 3600
    os.utime(tmp_path / "udp_blocked", (old, old))
    assert take_udp_blocked_hint(tmp_path) == ""
    leave_udp_blocked_hint(tmp_path, "x")
    leave_udp_blocked_hint(tmp_path, "")  # a later up that found UDP working takes it back
    assert take_udp_blocked_hint(tmp_path) == ""
