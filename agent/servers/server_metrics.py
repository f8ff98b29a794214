"""The rendezvous and relay servers' numbers as Prometheus families (from their `stats()`; pure).

Names follow Prometheus' conventions: `punchthrough_<role>_<what>`, `_total` for counters, labels for
the kind, reason or event that ops already counts by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.core import Metric

from agent.common.metrics import counter, gauge, labelled_counter, labelled_gauge

R = "punchthrough_rendezvous"
L = "punchthrough_relay"


def rendezvous_families(stats: Mapping[str, Any]) -> list[Metric]:
    return [
        counter(f"{R}_messages", "Messages handled, by transport and kind (udp.register_peer, ...)",
                stats.get("messages", {}), "kind"),
        counter(f"{R}_drops", "Inputs dropped, by reason", stats.get("drops", {}), "reason"),
        counter(f"{R}_events", "Decisions and outcomes, by event (punch_relay, punch_birthday, ...)",
                stats.get("events", {}), "event"),
        gauge(f"{R}_peers_online", "Peers whose last registration is recent", stats.get("peers_online", 0)),
        gauge(f"{R}_peers_registered", "IDs bound to a key in the database", max(0, stats.get("peers_registered", 0))),
        gauge(f"{R}_pending_requests", "Requests waiting for the peer's answer", stats.get("pending_requests", 0)),
        gauge(f"{R}_tcp_connections", "Open TCP connections (requests, NAT tests, registrations over TCP)",
              stats.get("tcp_connections", 0)),
        gauge(f"{R}_relay_up", "1 while a relay answers its health checks (only those are handed out)",
              {r: int(s["up"]) for r, s in stats.get("relays", {}).items()}, "relay"),
        gauge(f"{R}_relay_load", "A relay's pairs at its last check plus those handed out since",
              {r: s["load"] for r, s in stats.get("relays", {}).items()}, "relay"),
    ]


def relay_families(stats: Mapping[str, Any], replica: str = "0") -> list[Metric]:
    """One replica's numbers (`replica` labels them when a relay runs several)."""
    del replica  # one process: its stats already sum its replicas
    return [
        gauge(f"{L}_pairs_active", "Pairs being relayed now", stats.get("pairs_active", 0)),
        counter(f"{L}_pairs", "Pairs joined since start", stats.get("pairs_total", 0)),
        gauge(f"{L}_waiting", "Connections waiting for their partner", stats.get("waiting", 0)),
        gauge(f"{L}_handshaking", "Connections that have not sent their first frame yet", stats.get("handshaking", 0)),
        counter(f"{L}_bytes", "Bytes relayed, both directions", stats.get("bytes_relayed", 0)),
        counter(f"{L}_drops", "Connections dropped, by reason", stats.get("drops", {}), "reason"),
        counter(f"{L}_pair_ends", "Pairs ended, by reason", stats.get("pair_ends", {}), "reason"),
    ]


def pool_families(replicas: Sequence[Mapping[str, Any]]) -> list[Metric]:
    """A relay pool's replicas (actors/relay_pool.py), labelled by node address and replica index:
    `sum by (node)` gives a machine's share; a replica whose node died reports up 0 and nothing else."""
    labels = ["node", "replica"]

    def rows(key: str) -> list[tuple[tuple[str, ...], float]]:
        return [((str(r["node"]), str(r["replica"])), float(r[key])) for r in replicas if r.get("up")]

    return [
        labelled_gauge(f"{L}_replica_up", "1 while the replica answers the pool's driver", labels,
                       [((str(r["node"]), str(r["replica"])), float(bool(r.get("up")))) for r in replicas]),
        labelled_gauge(f"{L}_pairs_active", "Pairs being relayed now", labels, rows("pairs_active")),
        labelled_counter(f"{L}_pairs", "Pairs joined since start", labels, rows("pairs_total")),
        labelled_gauge(f"{L}_waiting", "Connections waiting for their partner", labels, rows("waiting")),
        labelled_counter(f"{L}_bytes", "Bytes relayed, both directions", labels, rows("bytes_relayed")),
        labelled_counter(f"{L}_handed_off", "Connections passed to the sibling that pairs their uuid", labels,
                         rows("handed_off")),
    ]
