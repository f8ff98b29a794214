"""The words sessions and attempts are described with, shared by the session owner, the race and the
sessions table: enums, so a misspelt state is a type error, not a row that matches nothing."""

from __future__ import annotations

import enum


class SessionState(enum.StrEnum):
    WAITING = "waiting"
    """The session owner knows the session, no transport yet."""
    HANDSHAKE = "handshake"
    OPEN = "open"
    DONE = "done"
    """Ended cleanly: both sides closed."""
    FAILED = "failed"
    LOST = "lost"
    """B's side: admitted, but A chose another transport."""
    CONNECTING = "connecting"
    """A's plan, before the session owner has heard of it."""
    ANSWERING = "answering"
    """B's answer to a push, before it got a transport."""


ACTIVE = (SessionState.HANDSHAKE, SessionState.OPEN)


class Outcome(enum.StrEnum):
    """How one strategy attempt (A's race) or one transport (the session owner) ended, or where it is."""

    RUNNING = "running"
    CONNECTED = "connected"
    """Its transport reached the session owner."""
    WON = "won"
    LOST = "lost the race"
    CANCELLED = "cancelled"
    ERROR = "error"
    SKIPPED = "skipped"
    FAILED = "failed"
    """The transport failed its handshake."""
    NOT_USED = "not used"
    """B's answer beside a session that went another way."""
