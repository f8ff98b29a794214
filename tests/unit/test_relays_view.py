"""`punchthrough-ops relays`: the pool's per-replica families and the view built from the scrapes,
including what a hostile or broken endpoint sends (one line, never a traceback)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.servers.server_metrics import pool_families, rendezvous_families
from ops.relays_view import ViewError, metrics_url, parse, render

REPLICAS: list[dict[str, Any]] = [
    {"replica": 0, "node": "10.0.0.1", "up": True, "pairs_active": 3, "pairs_total": 9, "waiting": 1,
     "bytes_relayed": 1000, "handed_off": 2},
    {"replica": 1, "node": "10.0.0.1", "up": True, "pairs_active": 2, "pairs_total": 4, "waiting": 0,
     "bytes_relayed": 500, "handed_off": 0},
    {"replica": 2, "node": "10.0.0.2", "up": False},
]
RENDEZVOUS = {"relays": {"10.0.0.1:21117": {"up": True, "load": 5, "misses": 0},
                         "10.0.0.2:21117": {"up": False, "load": 7, "misses": 2}}}


def text(families: list[Any]) -> str:
    class Snap:
        def collect(self) -> Iterator[Any]:
            yield from families

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Snap())
    return generate_latest(reg).decode()


def test_pool_families_label_each_replica_by_node_and_a_dead_one_only_up_0() -> None:
    out = text(pool_families(REPLICAS))
    assert 'punchthrough_relay_replica_up{node="10.0.0.2",replica="2"} 0.0' in out
    assert 'punchthrough_relay_pairs_active{node="10.0.0.1",replica="0"} 3.0' in out
    assert 'punchthrough_relay_bytes_total{node="10.0.0.1",replica="1"} 500.0' in out
    assert 'replica="2"' not in out.replace('punchthrough_relay_replica_up{node="10.0.0.2",replica="2"}', "")


def test_the_view_joins_replicas_and_the_rendezvous_verdict_per_node() -> None:
    nodes = parse({"pool": text(pool_families(REPLICAS)), "rv": text(rendezvous_families(RENDEZVOUS))})
    assert set(nodes) == {"10.0.0.1", "10.0.0.2"}
    lines = render(nodes).splitlines()
    one = next(line for line in lines if line.startswith("10.0.0.1"))
    two = next(line for line in lines if line.startswith("10.0.0.2"))
    assert one.split()[:5] == ["10.0.0.1", "2/2", "5", "1", "1500"] and "10.0.0.1:21117 up, load 5" in one
    assert two.split()[:5] == ["10.0.0.2", "0/1", "-", "-", "-"] and "10.0.0.2:21117 DOWN" in two
    assert "no relay" in render({})


@pytest.mark.parametrize(
    "bad",
    ["not metrics at all {", 'x{a="1" 2', "# TYPE x counter\nx{ 1\n", "\x00\xff" * 5000,
     'punchthrough_relay_pairs_active{node="a",replica="0"} notanumber'],
)
def test_a_scrape_that_is_not_prometheus_text_is_one_short_line(bad: str) -> None:
    with pytest.raises(ViewError) as info:
        parse({"http://h:1/metrics": bad})
    message = str(info.value)
    assert message.startswith("http://h:1/metrics is not Prometheus text") and message.isprintable()
    assert len(message) < 200


def test_foreign_metrics_show_nothing_rather_than_fail() -> None:
    assert parse({"other": "# TYPE up gauge\nup 1\nnode_load1 0.5\n"}) == {}


@pytest.mark.parametrize("endpoint", ["", "nohost", "h", "ftp//x"])
def test_bad_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ViewError, match="HOST:PORT"):
        metrics_url(endpoint)
