"""The sessions table tells the truth: one row per session, counts that match the rows."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.session.view import counts, fold_answers, join

A = "8922743670"


def plan(sid: str, role: str = "responder", peer: str = A, age: float = 1.0, path: str = "", **kw: Any) -> dict:
    return {"id": sid, "peer": peer, "role": role, "path": path, "error": "", "age": age, "attempts": [], **kw}


def attempt(strategy: str, outcome: str, reason: str = "") -> dict[str, Any]:
    return {"strategy": strategy, "outcome": outcome, "reason": reason, "elapsed_ms": 1.0}


def record(sid: str, state: str, path: str, age: float = 1.0, peer: str = A, **kw: Any) -> dict[str, Any]:
    return {"id": sid, "peer": peer, "role": "responder", "path": path, "state": state, "age": age, **kw}


def test_b_answers_to_one_session_are_one_row() -> None:
    """What B showed for one `pipe` from A: a done row plus a `failed` row per other push it answered."""
    plans = [
        plan("p-lan", path="lan", age=8.0, attempts=[attempt("lan", "connected")]),
        plan(
            "p-punch",
            path="tcp_punch",
            age=8.0,
            error="tcp_punch: timed out",
            attempts=[attempt("tcp_punch", "error", "tcp_punch: timed out")],
        ),
        plan("p-relay", path="relay", age=7.5, attempts=[attempt("relay", "connected")]),
    ]
    live = [
        record("p-lan", "done", "lan", age=7.9, bytes_in=3, bytes_out=3),
        record("p-relay", "lost", "relay", age=7.4, error="the peer chose another path"),
    ]
    rows = join(plans, live)
    assert len(rows) == 1 and counts(rows) == (0, 1)
    row = rows[0]
    assert (row["id"], row["state"], row["path"], row["error"]) == ("p-lan", "done", "lan", "")
    assert [(a["strategy"], a["outcome"]) for a in row["attempts"]] == [
        ("lan", "connected"),
        ("tcp_punch", "not used"),  # not an error that looks like a fault beside a session that worked
        ("relay", "not used"),
    ]
    assert row["attempts"][1]["reason"] == "another path won; tcp_punch: timed out"
    assert row["attempts"][2]["reason"] == "another path won; the peer chose another path"


def test_sessions_far_apart_or_from_other_peers_stay_apart() -> None:
    plans = [
        plan("s1", path="lan", age=100.0, attempts=[attempt("lan", "connected")]),
        plan("s2", path="lan", age=10.0, attempts=[attempt("lan", "connected")]),
        plan("s3", path="lan", age=10.0, peer="1111111111", attempts=[attempt("lan", "connected")]),
    ]
    live = [
        record("s1", "done", "lan", 100.0),
        record("s2", "open", "lan", 10.0),
        record("s3", "open", "lan", 10.0, peer="1111111111"),
    ]
    rows = join(plans, live)
    assert [r["id"] for r in rows] == ["s1", "s2", "s3"]
    assert counts(rows) == (2, 3)


def test_an_answer_still_running_is_answering_not_failed() -> None:
    rows = join([plan("p", age=0.2)], [])
    assert (rows[0]["state"], rows[0]["error"]) == ("answering", "")
    rows = join([plan("a", role="initiator", age=0.2, attempts=[attempt("tcp_punch", "running")])], [])
    assert rows[0]["state"] == "connecting"


def test_a_plan_whose_every_attempt_ended_failed_says_why() -> None:
    rows = join([plan("p", attempts=[attempt("lan", "error", "lan: timed out")])], [])
    assert (rows[0]["state"], rows[0]["error"]) == ("failed", "lan: timed out")


def test_a_connected_plan_without_a_record_lost_its_owner() -> None:
    rows = join([plan("p", path="lan", attempts=[attempt("lan", "connected")])], [])
    assert (rows[0]["state"], rows[0]["error"]) == ("failed", "lost: the session owner restarted")


def test_two_sessions_close_together_stay_two_rows() -> None:
    """`ping` then `pipe` 2 s apart: two sessions, each with the answers nearest to it."""
    plans = [
        plan("ping-lan", path="lan", age=6.0, attempts=[attempt("lan", "connected")]),
        plan("ping-lan2", path="lan", age=6.0, error="lan: timed out"),
        plan("pipe-lan", path="lan", age=3.6, attempts=[attempt("lan", "connected")]),
        plan("pipe-lan2", path="lan", age=3.5, error="lan: timed out"),
    ]
    live = [record("ping-lan", "done", "lan", 5.9), record("pipe-lan", "open", "lan", 3.5)]
    rows = join(plans, live)
    assert [(r["id"], r["state"], len(r["attempts"])) for r in rows] == [
        ("ping-lan", "done", 2),
        ("pipe-lan", "open", 2),
    ]
    assert counts(rows) == (1, 2)


def test_a_session_that_failed_after_admission_keeps_its_row() -> None:
    """Two sessions at once (KCP and TCP) to one peer; the KCP one dies mid-stream: still its own row."""
    plans = [
        plan("kcp", path="udp_punch", age=5.0, attempts=[attempt("udp_punch", "connected")]),
        plan("tcp", path="tcp_punch", age=5.0, attempts=[attempt("tcp_punch", "connected")]),
    ]
    live = [
        record("kcp", "failed", "udp_punch", 5.0, admitted_by="allow-list key", error="KCP connection lost"),
        record("tcp", "open", "tcp_punch", 5.0, admitted_by="allow-list key"),
        record("late", "lost", "relay", 4.0, admitted_by="allow-list key", error="the peer chose another path"),
    ]
    rows = join(plans, live)
    assert [(r["id"], r["state"]) for r in rows] == [("kcp", "failed"), ("tcp", "open")]
    assert rows[0]["error"] == "KCP connection lost"


def test_a_failed_group_stays_failed_with_its_reason() -> None:
    plans = [
        plan("x", path="lan", age=3.0, error="lan: timed out", attempts=[attempt("lan", "error", "lan: timed out")]),
        plan("y", path="relay", age=2.0, attempts=[attempt("relay", "connected")]),
    ]
    live = [record("y", "failed", "relay", 2.0, error="peer closed the connection during the handshake")]
    rows = join(plans, live)
    assert len(rows) == 1 and rows[0]["state"] == "failed"
    assert rows[0]["error"] == "peer closed the connection during the handshake"


def test_initiator_rows_are_never_folded() -> None:
    rows = [dict(record(f"i{n}", "done", "lan", 1.0), role="initiator") for n in range(3)]
    assert fold_answers(rows) == rows


rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.text(max_size=3),
            "peer": st.sampled_from(["", "1", "2"]),
            "role": st.sampled_from(["initiator", "responder", "?"]),
            "path": st.sampled_from(["", "lan", "relay"]),
            "state": st.sampled_from(["open", "done", "failed", "lost", "handshake", "??"]),
            "age": st.floats(0, 100),
            "attempts": st.lists(
                st.fixed_dictionaries({"strategy": st.just("lan"), "outcome": st.sampled_from(["connected", "error"])}),
                max_size=2,
            ),
        }
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(rows_strategy)
def test_folding_keeps_every_attempt_and_never_adds_rows(rows: list[dict[str, Any]]) -> None:
    out = fold_answers(rows)
    assert len(out) <= len(rows)
    assert sum(len(r["attempts"]) for r in out) >= sum(len(r["attempts"]) for r in rows)
    assert counts(out)[1] == len(out)
