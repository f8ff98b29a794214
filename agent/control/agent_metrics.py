"""The agent's numbers as Prometheus families (pure): streams and races by path and outcome,
strategy attempts, actor restarts, links by path, registration and NAT.

The coordinator counts as sessions finish (`AgentCounters`); the rest is read at scrape time from
what `status` and `links` already hold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric

from agent.common.metrics import counter, gauge, labelled_counter

P = "punchthrough_agent"


@dataclass
class AgentCounters:
    streams: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(path, outcome): every stream asked of the coordinator (pipe, ping), on a running link or a new one."""
    races: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """(kind, path, outcome): races for a new link ("link") or a running link's new transport ("relink")."""
    attempts: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(strategy, outcome) of every attempt in those races."""

    def stream(self, path: str, ok: bool) -> None:
        self.streams[(path or "none", "ok" if ok else "failed")] += 1

    def race(self, kind: str, path: str, ok: bool, attempts: list[Any]) -> None:
        self.races[(kind, path or "none", "ok" if ok else "failed")] += 1
        for a in attempts:
            self.attempts[(str(a.strategy), str(a.outcome))] += 1


def agent_families(
    counts: AgentCounters,
    actors: Mapping[str, int],
    links: list[Mapping[str, Any]],
    registered: bool,
    nat_type: int,
) -> list[Metric]:
    """`actors`: component -> restarts; `links`: the session owner's link rows (path, state)."""
    up: Counter[str] = Counter(str(x.get("path") or "none") for x in links if x.get("state") == "up")
    return [
        labelled_counter(f"{P}_streams", "Streams opened through the coordinator, by path and outcome",
                         ["path", "outcome"], counts.streams.items()),
        labelled_counter(f"{P}_races", "Races for a link's transport, by kind (link, relink), path and outcome",
                         ["kind", "path", "outcome"], counts.races.items()),
        labelled_counter(f"{P}_attempts", "Strategy attempts in those races, by strategy and outcome",
                         ["strategy", "outcome"], counts.attempts.items()),
        counter(f"{P}_actor_restarts", "Restarts of each component's actor", dict(actors), "component"),
        gauge(f"{P}_links", "Links up now, by path", dict(up), "path"),
        gauge(f"{P}_registered", "1 while the rendezvous server confirms our registration", int(registered)),
        gauge(f"{P}_nat_type", "RustDesk's NAT type as measured (0 unknown, 1 cone, 2 symmetric)", nat_type),
    ]
