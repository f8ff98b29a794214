"""`punchthrough-ops relays`: the relays per node, their load and health, from the servers' metrics.

The rendezvous server knows each relay's health and load (its health checks); a relay pool knows
its replicas per node (actors/relay_pool.py). Both export them as Prometheus text
(agent/servers/server_metrics.py), so this view reads the endpoints an operator already scrapes
instead of a second protocol. Parsing is pure; a scrape that is not Prometheus text is one line.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

MAX_SCRAPE = 4 * 1024 * 1024
R = "punchthrough_rendezvous_relay_"
L = "punchthrough_relay_"


class ViewError(Exception):
    """A metrics endpoint could not be read or parsed; str() is one line."""


def metrics_url(text: str) -> str:
    """"HOST:PORT" (or a full http:// URL) -> the /metrics URL."""
    if text.startswith(("http://", "https://")):
        return text
    if not text or ":" not in text:
        raise ViewError(f"metrics endpoint must be HOST:PORT or http://HOST:PORT/metrics, got {text!r}")
    return f"http://{text}/metrics"


def fetch(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read(MAX_SCRAPE + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ViewError(f"{url}: {getattr(exc, 'reason', None) or exc}") from None
    if len(body) > MAX_SCRAPE:
        raise ViewError(f"{url}: more than {MAX_SCRAPE} bytes of metrics")
    return body.decode("utf-8", errors="replace")


@dataclass
class Node:
    replicas: dict[str, dict[str, float]] = field(default_factory=dict)
    relays: dict[str, dict[str, float]] = field(default_factory=dict)
    """What the rendezvous server says of the relays on this host (health and load), by HOST:PORT."""


def parse(texts: dict[str, str]) -> dict[str, Node]:
    """Scrapes (source -> Prometheus text) -> nodes by address. ViewError names a bad source."""
    nodes: dict[str, Node] = defaultdict(Node)
    for source, text in texts.items():
        try:
            samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            detail = "".join(c if c.isprintable() else "?" for c in str(exc))[:120]
            raise ViewError(f"{source} is not Prometheus text: {detail}") from None
        for s in samples:
            name, labels, value = s.name, s.labels, float(s.value)
            if name.startswith(R) and "relay" in labels:
                relay = labels["relay"]
                host = relay.rpartition(":")[0].strip("[]") or "(this host)"
                nodes[host].relays.setdefault(relay, {})[name.removeprefix(R)] = value
            elif name.startswith(L) and "node" in labels and "replica" in labels:
                row = nodes[labels["node"]].replicas.setdefault(labels["replica"], {})
                row[name.removeprefix(L).removesuffix("_total")] = value
    return dict(nodes)


def render(nodes: dict[str, Node]) -> str:
    if not nodes:
        return "no relay in these metrics (a rendezvous server with --relay, or a relay pool with --metrics)"
    lines = [f"{'NODE':<18} {'REPLICAS UP':<12} {'PAIRS':>6} {'WAITING':>8} {'BYTES':>14}  RENDEZVOUS SAYS"]
    for host in sorted(nodes):
        node = nodes[host]
        reps = node.replicas.values()
        up = f"{sum(r.get('replica_up', 0) > 0 for r in reps)}/{len(reps)}" if reps else "-"
        pairs = _sum(reps, "pairs_active")
        waiting = _sum(reps, "waiting")
        sent = _sum(reps, "bytes")
        said = ", ".join(
            f"{relay} up, load {st.get('load', 0):g}" if st.get("up", 0) > 0 else f"{relay} DOWN"
            for relay, st in sorted(node.relays.items())
        ) or "-"
        lines.append(f"{host:<18} {up:<12} {pairs:>6} {waiting:>8} {sent:>14}  {said}")
    return "\n".join(lines)


def _sum(rows: Any, key: str) -> str:
    values = [r[key] for r in rows if key in r]
    return f"{sum(values):.0f}" if values else "-"


def relays_view(endpoints: list[str], timeout: float = 5.0) -> dict[str, Node]:
    urls = [metrics_url(e) for e in endpoints]
    return parse({url: fetch(url, timeout) for url in urls})
