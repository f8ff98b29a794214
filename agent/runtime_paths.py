"""Where a running agent's sockets live, derived from its state directory.

Unix socket paths are limited to ~107 bytes; a deep state directory (pytest's
tmp dirs, long home paths) falls back to a private short directory in /tmp
named after a hash of the state directory, so both CLIs find the same place.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

_MAX_SOCK_PATH = 100
CALLS = "calls"
"""Below the runtime dir: each actor's socket for direct calls (actors/direct_calls.py)."""
CALL_NAME_MAX = 16
"""Longest actor name a direct-call socket is named after (the built-in ones are 4-11 characters);
a longer one (a plug-in strategy's) is named by a hash of that length."""
_LONGEST = f"{CALLS}/{'x' * CALL_NAME_MAX}.sock"
"""The longest socket path below the runtime dir: the one the length check must fit."""


def runtime_dir(state_dir: Path) -> Path:
    state_dir = state_dir.resolve()
    if len(str(state_dir / _LONGEST)) < _MAX_SOCK_PATH:
        return state_dir
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    short = Path("/tmp") / f"punchthrough-{os.getuid()}-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    if short.stat().st_uid != os.getuid():
        raise PermissionError(f"{short} belongs to another user")
    return short


def control_socket(state_dir: Path) -> Path:
    """The coordinator's socket: ops queries and stream requests from `pipe`/`connect`."""
    return runtime_dir(state_dir) / "control.sock"


def sessions_socket(state_dir: Path) -> Path:
    """The session owner's socket: strategies hand it their connected transports."""
    return runtime_dir(state_dir) / "sessions.sock"


def calls_dir(state_dir: Path) -> Path:
    """The actors' direct-call sockets (removed by the supervisor at start and stop)."""
    return runtime_dir(state_dir) / CALLS


def call_socket(state_dir: Path, actor: str) -> Path:
    """The socket on which `actor` takes direct calls from the agent's other actors."""
    name = actor if len(actor) <= CALL_NAME_MAX else hashlib.sha256(actor.encode()).hexdigest()[:CALL_NAME_MAX]
    return calls_dir(state_dir) / f"{name}.sock"


UDP_BLOCKED_HINT = "udp_blocked"
"""A file in the state dir: `up`'s preflight found UDP to the server blocked (its reason inside); the
registrar reads it once at start and registers over TCP at once (agent/rendezvous/registration_path.py)."""
HINT_FRESH = 120.0


def leave_udp_blocked_hint(state_dir: Path, reason: str) -> None:
    hint = state_dir / UDP_BLOCKED_HINT
    if reason:
        hint.write_text(reason[:300])
    else:
        hint.unlink(missing_ok=True)


def take_udp_blocked_hint(state_dir: Path) -> str:
    """The preflight's reason if `up` left one moments ago ("" otherwise); it is used once."""
    hint = state_dir / UDP_BLOCKED_HINT
    try:
        fresh = time.time() - hint.stat().st_mtime < HINT_FRESH
        reason = hint.read_text().strip()
        hint.unlink()
    except OSError:
        return ""
    return reason if fresh else ""
