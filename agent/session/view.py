"""The rows `punchthrough-ops sessions` shows, one per session as its user sees it (sans-IO).

Two sources describe a session: the coordinator's plan (the strategies it tried and how each
ended) and the session owner's record (state, bytes, the peer's key). A's race is one plan, joined
to the owner's record of the transport that won. B hears one push per strategy A tries (LAN,
TCP punch, UDP punch, relay) and answers each on its own, and the pushes carry no common session
id: B's answers to one peer that begin within `ANSWER_WINDOW` of the first are one session, shown as
one row (the answer that got furthest, every other answer listed among its attempts) instead of a
row per push, two of them "failed" beside every session that worked.
"""

from __future__ import annotations

from typing import Any

from agent.session.states import ACTIVE, Outcome, SessionState

ANSWER_WINDOW = 12.0
"""Seconds within which one peer's pushes belong to one of its sessions: the longest an initiator's
race waits for a direct path before its relay push (the punch budget), with room to spare."""

ADMITTED = (SessionState.HANDSHAKE, SessionState.OPEN, SessionState.DONE)
RANK: dict[str, int] = {
    SessionState.OPEN: 0,
    SessionState.HANDSHAKE: 1,
    SessionState.DONE: 2,
    SessionState.CONNECTING: 3,
    SessionState.ANSWERING: 3,
    SessionState.LOST: 4,
    SessionState.FAILED: 5,
}
"""Which of a group's rows stands for the session: the one that got furthest."""


def plan_state(role: str, attempts: list[dict[str, Any]], error: str, path: str) -> tuple[str, str]:
    """(state, error) of a plan the session owner holds no record of."""
    if error:
        return SessionState.FAILED, error
    if path and (role == "initiator" or any(a.get("outcome") in (Outcome.CONNECTED, Outcome.WON) for a in attempts)):
        return SessionState.FAILED, "lost: the session owner restarted"
    if attempts and all(a.get("outcome") not in (Outcome.RUNNING, Outcome.CONNECTED) for a in attempts):
        return SessionState.FAILED, str(attempts[-1].get("reason") or "no path connected")
    return (SessionState.ANSWERING if role == "responder" else SessionState.CONNECTING), ""


def join(plans: list[dict[str, Any]], live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per plan (with the owner's record when it has one), then the owner's records no plan
    names, then B's answers folded into sessions."""
    records = {str(s.get("id")): s for s in live}
    rows = []
    for plan in plans:
        attempts = list(plan.get("attempts") or [])
        record = records.pop(str(plan["id"]), None)
        if record is None:
            state, error = plan_state(str(plan["role"]), attempts, str(plan.get("error") or ""), str(plan["path"]))
            record = {
                "id": plan["id"],
                "peer": plan["peer"],
                "role": plan["role"],
                "path": plan["path"],
                "state": state,
                "bytes_out": 0,
                "bytes_in": 0,
                "age": plan["age"],
                "error": error,
            }
        row = dict(record, attempts=attempts)
        if plan.get("error") and not row.get("error"):
            row["error"] = plan["error"]
        rows.append(row)
    rows.extend(dict(s, attempts=[]) for s in records.values())
    return fold_answers(rows)


def _as_attempts(row: dict[str, Any], session_won: bool) -> list[dict[str, Any]]:
    """A folded answer's attempts, saying how its transport ended when it did get one. Beside a session
    that got going, an answer that ended without admission was simply not used (A went another way,
    and then B's punch times out): "not used", not an error that looks like a fault."""
    out = []
    for a in row.get("attempts") or []:
        if a.get("outcome") in (Outcome.CONNECTED, Outcome.WON) and row.get("state") in (
            SessionState.LOST,
            SessionState.FAILED,
        ):
            a = dict(a, outcome=row["state"], reason=str(row.get("error") or ""))
        out.append(a)
    if not out and row.get("path"):
        out.append({"strategy": row["path"], "outcome": row.get("state"), "reason": str(row.get("error") or "")})
    if session_won:
        out = [
            dict(a, outcome=Outcome.NOT_USED.value, reason=f"another path won; {a.get('reason') or a.get('outcome')}")
            if a.get("outcome") in (Outcome.ERROR, Outcome.FAILED, SessionState.LOST)
            else a
            for a in out
        ]
    return out


def _progress(row: dict[str, Any]) -> tuple[int, int, int]:
    """Smaller is further: by state, then whether a transport connected at all, then bytes moved."""
    connected = any(a.get("outcome") in (Outcome.CONNECTED, Outcome.WON) for a in row.get("attempts") or [])
    return RANK.get(str(row.get("state")), 9), 0 if connected else 1, -int(row.get("bytes_in") or 0)


def fold_answers(rows: list[dict[str, Any]], window: float = ANSWER_WINDOW) -> list[dict[str, Any]]:
    """B's answer rows for one peer become one row per session: each answer that admitted the peer is a
    session of its own; every other answer joins the closest such session within `window` seconds, and
    answers near none of them join each other. Everything else passes through."""
    anchors: dict[int, list[dict[str, Any]]] = {}
    loose: list[tuple[int, dict[str, Any]]] = []
    for index, row in enumerate(rows):
        if row.get("role") != "responder" or not row.get("peer") or _a_session(row):
            anchors[index] = [row]
        else:
            loose.append((index, row))
    for index, row in sorted(loose, key=lambda item: -_age(item[1])):  # oldest first
        near = [
            (abs(_age(group[0]) - _age(row)), i)
            for i, group in anchors.items()
            if group[0].get("role") == "responder"
            and group[0].get("peer") == row.get("peer")
            and abs(_age(group[0]) - _age(row)) <= window
            and (_a_session(group[0]) or _age(group[0]) >= _age(row))
        ]
        if near:
            anchors[min(near)[1]].append(row)
        else:
            anchors[index] = [row]
    out = []
    for index in sorted(anchors):
        members = anchors[index]
        if len(members) == 1:
            out.append(members[0])
            continue
        best = members[0] if _a_session(members[0]) else min(members, key=_progress)
        attempts = list(best.get("attempts") or [])
        for other in members:
            if other is not best:
                attempts += _as_attempts(other, _a_session(best))
        out.append(dict(best, attempts=attempts, age=max(_age(m) for m in members), error=best.get("error") or ""))
    return out


def _a_session(row: dict[str, Any]) -> bool:
    """A session of its own: the peer was admitted on this transport and it was not left for another
    path (one that failed after that, at its target or mid-stream, is a session that failed)."""
    return row.get("state") in ADMITTED or (row.get("state") == SessionState.FAILED and bool(row.get("admitted_by")))


def _age(row: dict[str, Any]) -> float:
    return float(row.get("age") or 0.0)


def counts(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """(active, total) as the sessions table shows them."""
    return sum(r.get("state") in ACTIVE for r in rows), len(rows)


def peer_view(known: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`punchthrough-ops status`'s peer table (like `tailscale status`): every known peer with its
    active sessions and their paths, then any peer with a session that is not known yet."""
    active: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("state") in ACTIVE and row.get("peer"):
            active.setdefault(str(row["peer"]), []).append(row)
    out = []
    for peer in known:
        now = active.pop(str(peer.get("id")), [])
        out.append(dict(peer, active=len(now), paths=sorted({str(r.get("path") or "?") for r in now})))
    for peer_id, now in active.items():
        out.append(
            {
                "id": peer_id,
                "allowed": "no",
                "key": str(now[0].get("peer_key") or ""),
                "pinned": False,
                "last_seen": None,
                "last_path": "",
                "last_role": "",
                "active": len(now),
                "paths": sorted({str(r.get("path") or "?") for r in now}),
            }
        )
    return out
