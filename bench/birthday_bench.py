"""Birthday probing through real kernel NAT: how often, how fast and at what cost a link between a
port-restricted cone and a random-port symmetric NAT leaves the relay for a direct path.

    python -m bench.birthday_bench [--runs 20] [--scenario cone-symmetric] [--sockets 256 --probes 2000 --rate 1000]

Needs root (network namespaces). Prints numbers, asserts nothing. Per run: a new link (the agents keep
none idle) carrying a paced transfer from A to B's echo; the time from the pipe's start to the link on
the relay (the first byte), then to the link on a direct path; the transfer checked intact. The agents
may probe for the same peer once a second here (agent.birthday_interval = 1; 30 s by default), so runs
can follow each other. The budget is printed with its odds; the datagrams are counted by the NAT routers
(nft counters on the WAN side), not estimated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def link_state(agents: Any, host: str) -> list[tuple[str, str]]:
    links = [x for x in agents.ops(host, "links")["links"] if x["state"] == "up"]
    return [(h["path"], h["why"]) for h in links[0]["history"]] if links else []


def wait(cond: Any, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if cond():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def udp_packets(lab: Any, router: str) -> int:
    """UDP datagrams the router has forwarded out to the WAN so far (a counter rule we add)."""
    out = lab.run(router, ["nft", "list", "chain", "ip", "natlab", "forward"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if "birthday-bench" in line and "packets" in line:
            return int(line.split("packets")[1].split()[0])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--scenario", default="cone-symmetric")
    p.add_argument("--sockets", type=int, default=256)
    p.add_argument("--probes", type=int, default=2000)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds a run may take to leave the relay")
    args = p.parse_args(argv)
    from agent.strategies.birthday_core import Budget
    from ops.natlab import Lab, available
    from tests.natlab.agents import LabAgents
    from tests.natlab.test_faults_paths import A, B, PacedPipe, Pair

    ok, why = available()
    if not ok:
        print(f"birthday bench skipped: {why}")
        return 0
    budget = Budget(sockets=args.sockets, probes=args.probes, rate=args.rate)
    print(f"budget: {budget.describe()}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="birthday-bench-") as work, Lab(args.scenario) as lab:
        conf = Path(work) / "agent.toml"
        conf.write_text(
            "[agent]\nlink_idle = 0\nbirthday_interval = 1\n"
            f"birthday_sockets = {args.sockets}\nbirthday_probes = {args.probes}\nbirthday_rate = {args.rate}\n"
        )
        for router in ("ra", "rb"):
            lab.run(router, ["nft", "insert", "rule", "ip", "natlab", "forward", "oifname", "wan", "meta", "l4proto",
                             "udp", "counter", "comment", '"birthday-bench"'], check=True)
        agents = LabAgents(lab, Path(work))
        try:
            agents.start_server()
            target = agents.start_echo(B)
            a_id, b_id = agents.agent_id(A), agents.agent_id(B)
            agents.up({B: ["--allow", a_id, "--allow-target", target, "--config", str(conf)],
                       A: ["--config", str(conf)]})
            pair = Pair(agents, a_id, b_id, target)
            for i in range(args.runs):
                before = {r: udp_packets(lab, r) for r in ("ra", "rb")}
                pipe = PacedPipe(pair, "")
                first = wait(lambda: bool(link_state(agents, A)), 30)
                on = link_state(agents, A)[0][0] if first is not None and link_state(agents, A) else "-"
                direct = wait(lambda: (link_state(agents, A) or [("-", "")])[-1][0] == "udp_punch", args.timeout)
                out = {r: udp_packets(lab, r) - before[r] for r in ("ra", "rb")}  # up to the move
                rc = pipe.finish()
                intact = rc == 0 and pipe.intact()
                row: dict[str, Any] = {"first": first, "direct": direct, "intact": intact, "udp": out}
                rows.append(row)
                print(f"run {i + 1:2d}: link on {on} after {first or 0:.2f} s; "
                      + (f"direct {direct:.2f} s after that" if direct is not None else "stayed on the relay")
                      + f"; intact {row['intact']}; UDP out A {row['udp']['ra']}, B {row['udp']['rb']}", flush=True)
                wait(lambda: not link_state(agents, A), 10)  # the link ends with its stream (link_idle 0)
                time.sleep(1.1)  # the per-peer pace
        finally:
            agents.down()
    met = [r for r in rows if r["direct"] is not None]
    print(f"\n{args.scenario}: {len(met)}/{len(rows)} runs left the relay for a direct path "
          f"({len(met) / max(1, len(rows)):.0%}); all transfers intact: {all(r['intact'] for r in rows)}")
    if met:
        d = sorted(r["direct"] for r in met)
        print(f"time on the relay before the move: median {statistics.median(d):.2f} s, max {d[-1]:.2f} s "
              f"(the first look for a direct path is 2 s after the link came up)")
    firsts = sorted(r["first"] for r in rows if r["first"] is not None)
    if firsts:
        print(f"link up (first byte on the relay): median {statistics.median(firsts):.2f} s")
    per_run = [r["udp"]["ra"] + r["udp"]["rb"] for r in rows]
    print(f"UDP datagrams out of both NATs per run until the move: median {statistics.median(per_run):.0f}, "
          f"max {max(per_run)} (budget: at most {budget.packets()} for the probing; the rest is registration, "
          "NAT probes and the first KCP packets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
