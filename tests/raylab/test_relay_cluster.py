"""Relays on a real three-node Ray cluster (issue 14), each node in its own network namespace.

The relay pool joins the cluster (`punchthrough relay --ray-address`) and places one replica on
every node, bound to that node's address; the rendezvous server is told about all three and
hands each new pair the least-loaded relay that answers its health checks. 100 relayed pairs
stream at once (the split over the nodes is printed), then one worker node is killed outright:
its pairs end with a reason, every other pair finishes intact, new pairs succeed within 5 s, and
the rendezvous server keeps serving.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.natlab import available
from ops.raylab import RayLab, remove_stale
from tests.integration.test_metrics import promtool_check

pytestmark = [pytest.mark.natlab, pytest.mark.ray, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
PT = [sys.executable, "-m", "agent.cli"]
RELAY_PORT = 21117
SCRAPE = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
KILLED = 2
"""The worker node that dies (node 0 is the head, which runs the pool's driver)."""


def wait_log(lab: RayLab, log: str, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    path = lab.tmp / log
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"{log}: exited {proc.returncode}: {path.read_text()[-1500:]}"
        time.sleep(0.1)
    raise AssertionError(f"{log}: no {text!r} within {timeout} s: {path.read_text()[-1500:]}")


def scrape(lab: RayLab, port: int) -> str:
    """A metrics endpoint on the head's loopback (the test itself is outside the lab's namespaces)."""
    return subprocess.run(lab.cmd("n0", [sys.executable, "-c", SCRAPE.format(port=port)]),
                          capture_output=True, text=True, timeout=10).stdout


@pytest.fixture
def cluster() -> Iterator[RayLab]:
    ok, why = available()
    if not ok:
        pytest.skip(why)
    remove_stale()
    lab = RayLab(nodes=3, hosts=("client",)).up()
    try:
        yield lab
    finally:
        lab.down()


def test_relays_spread_over_nodes_and_survive_a_node_kill(cluster: RayLab) -> None:
    lab = cluster
    relays = [f"{lab.addr(lab.node_name(i))}:{RELAY_PORT}" for i in range(lab.nodes)]
    state = lab.tmp / "srv"
    rendezvous = lab.popen("n0", [*PT, "--state-dir", str(state), "rendezvous", "--port", "21116",
                                  *[a for r in relays for a in ("--relay", r)], "--metrics", "127.0.0.1:9464"],
                           "rendezvous.log", cwd=ROOT)
    wait_log(lab, "rendezvous.log", "rendezvous on", rendezvous)
    pool = lab.popen("n0", [*PT, "--state-dir", str(state), "relay", "--port", str(RELAY_PORT),
                            "--ray-address", lab.head_address, "--replicas", str(lab.nodes), "--bind", "node",
                            "--metrics", "127.0.0.1:9465"],
                     "relay-pool.log", cwd=ROOT)
    wait_log(lab, "relay-pool.log", "listening on port", pool, timeout=90)
    nodes_line = next(line for line in (lab.tmp / "relay-pool.log").read_text().splitlines() if "listening" in line)
    assert all(r.rpartition(":")[0] in nodes_line for r in relays), nodes_line  # a replica on every node
    for i, relay in enumerate(relays):  # ... listening on its node's address (--bind node), nothing else
        ss = subprocess.run(lab.cmd(lab.node_name(i), ["ss", "-Hltn", f"sport = :{RELAY_PORT}"]),
                            capture_output=True, text=True, timeout=10).stdout
        local = {line.split()[3] for line in ss.splitlines() if line.strip()}  # State Recv-Q Send-Q Local Peer
        assert local == {relay}, ss

    # the server hands out a relay once a health check (every 2 s) found it up: wait for all three
    deadline = time.monotonic() + 15
    while True:
        text = scrape(lab, 9464)
        if all(f'punchthrough_rendezvous_relay_up{{relay="{r}"}} 1.0' in text for r in relays):
            break
        assert time.monotonic() < deadline, text[-1500:]
        time.sleep(0.3)

    driver = lab.popen("client", [sys.executable, "-m", "tests.raylab.pairs", "--server",
                                  f"{lab.addr('n0')}:21116", "--pairs", "100"],
                       "pairs.log", cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert driver.stdin is not None and driver.stdout is not None
    try:
        up = json.loads(driver.stdout.readline() or "{}").get("up")
        assert up is not None, (lab.tmp / "pairs.log").read_text()[-2000:]
        split = up["split"]
        print(f"\n100 pairs over the relays: {split}")
        assert up["failed"] == [] and up["streaming"] == 100
        assert set(split) == set(relays), split  # every node carries pairs
        assert max(split.values()) - min(split.values()) <= 10, split

        dead = relays[KILLED]
        killed_at = time.monotonic()
        pids = lab.kill_node(KILLED)
        print(f"killed node {KILLED} ({dead}): {len(pids)} processes in {time.monotonic() - killed_at:.2f} s")
        driver.stdin.write(b"go\n")
        driver.stdin.flush()
        line = driver.stdout.readline()
        done: dict[str, Any] = json.loads(line or "{}").get("done")
        assert done is not None, (lab.tmp / "pairs.log").read_text()[-2000:]
        assert driver.wait(timeout=30) == 0
    finally:
        driver.kill()

    first, later = done["first"], done["later"]
    on_dead = [p for p in first if p["relay"] == dead]
    others = [p for p in first if p["relay"] != dead]
    print(f"first pairs: {len(others)} on live nodes, {len(on_dead)} on the killed one")
    # only the killed node's pairs fail, each with a reason; the others stream intact to the end
    assert all(p["ok"] and p["verified"] == p["sent"] > 0 for p in others), [p for p in others if not p["ok"]][:3]
    assert on_dead and all(not p["ok"] and p["error"] for p in on_dead)
    print("reasons on the killed node:", dict(Counter(p["error"].split(":")[1].strip() for p in on_dead)))
    # new pairs: every one started 5 s after the kill or later succeeds, on a live relay
    for p in later:
        print(f"  new pair at +{p['started']:.2f} s: {'ok' if p['ok'] else p['error']} via {p['relay']}")
    late = [p for p in later if p["started"] >= 5.0]
    assert late and all(p["ok"] and p["relay"] != dead for p in late)
    failed = [p["started"] for p in later if not p["ok"]]
    print(f"new pairs: {len(later) - len(failed)}/{len(later)} ok; last failure at +{max(failed, default=0):.2f} s")
    # the rendezvous server kept serving and says which relay is down
    assert rendezvous.poll() is None
    server_scrape = scrape(lab, 9464)
    assert f'punchthrough_rendezvous_relay_up{{relay="{dead}"}} 0.0' in server_scrape, server_scrape[-1500:]
    for r in relays:
        if r != dead:
            assert f'punchthrough_rendezvous_relay_up{{relay="{r}"}} 1.0' in server_scrape
    pool_scrape = scrape(lab, 9465)
    assert 'punchthrough_relay_replica_up{node="' + dead.rpartition(":")[0] in pool_scrape
    # the ops view: relays per node, replicas up, pairs, and what the rendezvous server says of each
    view = subprocess.run(lab.cmd("n0", [sys.executable, "-m", "ops.cli", "relays", "127.0.0.1:9464",
                                         "127.0.0.1:9465"]), capture_output=True, text=True, timeout=30, cwd=ROOT)
    print(view.stdout)
    assert view.returncode == 0, view.stderr
    rows = {line.split()[0]: line for line in view.stdout.splitlines()[1:]}
    dead_host = dead.rpartition(":")[0]
    assert set(rows) == {r.rpartition(":")[0] for r in relays}
    assert " 0/1 " in rows[dead_host] and "DOWN" in rows[dead_host]
    assert all(" 1/1 " in rows[h] and " up, load " in rows[h] for h in rows if h != dead_host)
    for proc in (pool, rendezvous):
        proc.terminate()
        proc.wait(timeout=20)
    promtool_check(server_scrape)  # last: it skips where promtool is missing (scripts/test.sh fetches it)
    promtool_check(pool_scrape)
