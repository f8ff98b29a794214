"""The session owner's peer links: which exist, to whom, on which path, and what became of them.

A link is kept while it runs (agent/link/link.py) and remembered for `punchthrough-ops links`
after it ended, like sessions are. A new stream may reuse a running link the dialer made to the
same peer, if the link's proven key is the one the stream asks for (when it names one) and its
path is one the stream's path policy allows.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.link.link import Link

MAX_LINKS_KEPT = 128
"""Ended links remembered for `punchthrough-ops links` (the oldest are forgotten first)."""


class Notice(Protocol):
    """A KCP transport's pump notice (agent/session/owner.py's PumpNotice): why the transport ended."""

    def poll(self) -> str | None: ...


@dataclass(eq=False)
class LinkRecord:
    id: str
    role: str
    """"dialer" (this agent opened it; it opens the streams) or "acceptor"."""
    peer: str
    peer_key: str
    """Fingerprint of the key the peer proved it holds."""
    path: str
    link: Link
    admitted_by: str = ""
    state: str = "up"
    error: str = ""
    created: float = field(default_factory=time.monotonic)
    ended: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    """The link's paths over time: {"at": wall clock, "path", "why"}."""
    notice: Notice | None = None
    peer_pk: bytes = b""
    target: str = ""
    """The first stream's target: a new transport's handshake names it (B checks it as for any)."""
    policy: str = ""
    """The path policy the link was raced with: later races for it keep to it."""
    poked: bool = False
    """The network changed: look for a better path now, not at the back-off's next turn."""
    why: str = ""
    """Why the link is moving (shown with the path it moves to)."""

    def note_path(self, path: str, why: str) -> None:
        self.path = path
        self.history.append({"at": round(time.time(), 3), "path": path, "why": why})

    def as_dict(self) -> dict[str, Any]:
        link = self.link
        end = self.ended if self.ended is not None else time.monotonic()
        return {
            "id": self.id,
            "role": self.role,
            "peer": self.peer,
            "peer_key": self.peer_key,
            "path": self.path,
            "state": "moving" if self.state == "up" and link.moving else self.state,
            "error": self.error,
            "admitted_by": self.admitted_by,
            "streams": link.stream_count,
            "streams_total": link.opened,
            "bytes_out": link.bytes_out,
            "bytes_in": link.bytes_in,
            "age": round(end - self.created, 3),
            "history": list(self.history),
        }


class LinkTable:
    def __init__(self) -> None:
        self.links: OrderedDict[str, LinkRecord] = OrderedDict()

    def add(self, rec: LinkRecord) -> None:
        self.links[rec.id] = rec
        ended = [k for k, r in self.links.items() if r.state != "up"]
        for key in ended[: max(0, len(ended) - MAX_LINKS_KEPT)]:
            del self.links[key]

    def usable(self, peer: str, want_key: str, path_ok: Callable[[str], bool]) -> LinkRecord | None:
        """The newest running link this agent dialled to `peer` that a new stream may take."""
        for rec in reversed(self.links.values()):
            if (
                rec.role == "dialer"
                and rec.state == "up"
                and rec.peer == peer
                and not rec.link.closing
                and not rec.link.suspect
                and (not want_key or rec.peer_key == want_key)
                and path_ok(rec.path)
            ):
                return rec
        return None

    def ended(self, rec: LinkRecord, error: str) -> None:
        rec.state = "failed" if error else "closed"
        rec.error = error
        rec.ended = time.monotonic()

    def running(self) -> list[LinkRecord]:
        return [r for r in self.links.values() if r.state == "up"]

    def as_list(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.links.values()]
