"""Soak: registration storms and concurrent relayed pairs against in-process servers, on 127.0.0.1 only.

    python bench/load_bench.py [--minutes 1] [--peers 10000] [--pairs 200] [--pair-kib 4096] [--sample 30]

The soak versions of tests/integration/test_load.py 1(a) and 1(b), round after round until
--minutes is up (a started round finishes; each is bounded by its own stall timeouts):

* registration: --peers fresh IDs per round, RegisterPk then one RegisterPeer heartbeat, from
  8 UDP sockets with 8 requests in flight each; then OnlineRequest for all of them (must be all
  online). Per-IP limits are lifted (many simulated hosts share a few source addresses).
* relay: --pairs concurrent pairs, --pair-kib each way, SHA-256 checked; per-stream throughput
  min/median/max.

Every --sample seconds (and at the start and end) it prints the process RSS (servers and load
generator share this process), DB rows, and the relay's totals. Exit status 1 if any round lost a
registration or damaged a stream.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.relay_server import RelayConfig, start_relay
from agent.rendezvous_core import Limits
from agent.rendezvous_server import RendezvousConfig, start_rendezvous
from tests.integration.test_load import online_states, register_peers, relay_pairs, rss_mib


async def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="load-bench-"))
    rv = await start_rendezvous(
        RendezvousConfig(
            binds=["127.0.0.1"],
            port=0,
            db_path=tmp / "rv.sqlite3",
            key_file=tmp / "rv_key",
            limits=Limits(ip_block_limit=1 << 30, ip_ids_limit=1 << 30),
        )
    )
    relay = await start_relay(RelayConfig(binds=["127.0.0.1"], port=0))
    t_start = time.monotonic()
    deadline = t_start + args.minutes * 60
    failures = 0

    def sample(tag: str) -> None:
        st, rs = rv.stats(), relay.stats()
        print(
            f"[{time.monotonic() - t_start:7.1f} s] {tag:5} RSS {rss_mib():7.1f} MiB  peers in DB "
            f"{st['peers_registered']:>8}  online {st['peers_online']:>8}  relay pairs {rs['pairs_total']:>6}  "
            f"relayed {rs['bytes_relayed'] / (1 << 20):9.0f} MiB",
            flush=True,
        )

    async def sampler() -> None:
        while True:
            await asyncio.sleep(args.sample)
            sample("rss")

    sample("start")
    ticker = asyncio.ensure_future(sampler())
    rnd = 0
    try:
        while time.monotonic() < deadline:
            ids = [f"soak{rnd:04d}x{i:07d}" for i in range(args.peers)]
            took = await register_peers(rv, ids)
            online = await online_states(rv.nat_port, ids)
            lost = online.count(False)
            failures += lost > 0
            durations = await relay_pairs(relay.port, args.pairs, args.pair_kib << 10)
            rates = sorted(2 * (args.pair_kib << 10) / d / (1 << 20) for d in durations)
            print(
                f"round {rnd}: {args.peers} registrations in {took:.2f} s = {args.peers / took:,.0f}/s, "
                f"lost {lost}; {args.pairs} pairs x {args.pair_kib} KiB each way: per-stream MiB/s min "
                f"{rates[0]:.2f} median {statistics.median(rates):.2f} max {rates[-1]:.2f} "
                f"(max/min {rates[-1] / rates[0]:.1f})",
                flush=True,
            )
            rnd += 1
    except AssertionError as exc:
        print(f"round {rnd} FAILED: {exc}", flush=True)
        failures += 1
    finally:
        ticker.cancel()
        sample("end")
        await relay.close()
        await rv.close()
    return 1 if failures else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--peers", type=int, default=10_000, help="fresh IDs registered per round")
    ap.add_argument("--pairs", type=int, default=200, help="concurrent relayed pairs per round")
    ap.add_argument("--pair-kib", type=int, default=4096, help="KiB each way per pair")
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    args = ap.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
