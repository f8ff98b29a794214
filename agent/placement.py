"""Which Ray actor carries which component: configuration, not code.

"isolated" (the default) gives every component its own actor, as DESIGN.md wants: a crash kills one
component and Ray restarts it alone, while the session owner keeps every session's bytes. Each actor
is a Python process with Ray's core worker, ~45-55 MiB PSS, so ten of them do not fit a 1 GiB machine.
"grouped" carries the components in two actors instead, split by what crosses them: control
(coordinator, registrar, NAT probe: decisions, never a byte of a session) and data (the session
owner, every strategy, and the embedded rendezvous and relay servers: everything that carries bytes).
A crash then restarts a group: losing control leaves every session and relayed pair alone; losing
data ends them, as losing the session owner does in the isolated placement (the rendezvous server
comes back from its SQLite registry, and agents register again on their next heartbeat). The
components and their calls are the same in both placements.
"""

from __future__ import annotations

from collections.abc import Iterable

PLACEMENTS = ("isolated", "grouped")
DEFAULT = "isolated"

GROUPS = {"coordinator": "control", "registrar": "control", "nat_probe": "control"}
"""The grouped placement; every other component (the servers, the session owner, each strategy) goes to DATA."""
DATA = "data"


def actor_of(kind: str, placement: str) -> str:
    """The name of the actor that carries component `kind`."""
    if placement == "isolated":
        return kind
    if placement == "grouped":
        return GROUPS.get(kind, DATA)
    raise ValueError(f"unknown placement {placement!r} (choose {' or '.join(PLACEMENTS)})")


def layout(kinds: Iterable[str], placement: str) -> dict[str, str]:
    """Component -> actor for every one of `kinds`."""
    return {kind: actor_of(kind, placement) for kind in kinds}


def actors(where: dict[str, str]) -> dict[str, list[str]]:
    """Actor -> the components it carries, in the order of `where` (their start order)."""
    out: dict[str, list[str]] = {}
    for kind, actor in where.items():
        out.setdefault(actor, []).append(kind)
    return out
