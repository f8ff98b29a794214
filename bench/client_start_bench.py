"""How long `punchthrough pipe` takes to start, against the floor of starting Python at all.

    python bench/client_start_bench.py [--runs 30]

`pipe` is an ssh ProxyCommand: its start-up is paid on every ssh. Three commands, spawned in turn
`--runs` times each, timed from spawn to exit, medians and p90 printed:
  floor       python -c pass (the interpreter and site, nothing of ours)
  pipe        the console script's path (agent/entry.py) up to asking the agent for a stream, against
              a state dir with no agent, so that it stops there (goal: <= 100 ms)
  full CLI    the same through agent/cli.py (argparse, config, protobuf): the path before this change
The agent's own part of opening a stream is measured by bench/links_bench.py.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False, cwd=ROOT)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    script = Path(sys.executable).with_name("punchthrough")
    with tempfile.TemporaryDirectory() as state:
        pipe = ["--state-dir", state, "pipe", "1234567890", "127.0.0.1:22"]
        rows = {
            "floor (python -c pass)": [sys.executable, "-c", "pass"],
            "pipe (console script)": [str(script), *pipe],
            "pipe via the full CLI": [sys.executable, "-m", "agent.cli", *pipe],
        }
        results: dict[str, list[float]] = {}
        for _ in range(2):  # interleaved rounds: a noisy moment hits every row alike
            for name, cmd in rows.items():
                results.setdefault(name, []).extend(timed(cmd, args.runs // 2))
    floor = statistics.median(results["floor (python -c pass)"])
    for name, xs in results.items():
        xs.sort()
        med, p90 = statistics.median(xs), xs[int(len(xs) * 0.9) - 1]
        print(f"{name:<24} median {med:6.1f} ms  p90 {p90:6.1f} ms  (+{med - floor:.1f} ms over the floor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
