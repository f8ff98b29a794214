"""What the trust checks cost a session setup (issue 9: under 5 ms, nothing in the data path).

    python bench/trust_bench.py [--sessions 30] [--baseline-rev REV]

Two measurements in one run, loopback only:

1. Every signature and check a session adds, timed alone (median of many runs, microseconds),
   and added up the way one session on the relay path pays them: the requests A signs, what the
   server verifies and signs, B's checks of the push and its access policy (built from the
   config and the state dir's files, as for every push), the tickets A and the relay check.
2. Session setup end to end: two in-process agents and real servers, `--sessions` streams
   opened one after the other (LAN path, then relay-only), each timed from the open request
   to the first echoed byte. With --baseline-rev, the same measurement runs first in a git
   worktree of that revision (e.g. the commit before the trust work), so the two medians come
   from the same machine in the same run.

The data path is untouched by construction: after the handshake the session pump runs the same
code as before (agent/session/stream.py), so there is nothing there to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

E2E_CODE = """
import asyncio, json, os, statistics, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
from tests.agent_fixtures import open_stream, two_agents

async def main(n):
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with two_agents(Path(tmp)) as lab:
            loop = asyncio.get_running_loop()
            for path in ("auto", "relay-only"):
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path=path)
                    assert sock is not None, reply
                    await loop.sock_sendall(sock, b"x")
                    assert await loop.sock_recv(sock, 1) == b"x"
                    times.append((time.perf_counter() - t0) * 1000)
                    sock.close()
                out[path] = times
    print(json.dumps(out))

asyncio.run(main(int(sys.argv[1])))
"""


def median_us(fn: Callable[[], Any], n: int = 300) -> float:
    for _ in range(20):
        fn()
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1e6


def micro(tmp: Path) -> list[tuple[str, str, int, float]]:
    """(who, what, times per relayed session, median µs)."""
    from nacl.signing import SigningKey

    from agent.config import Config
    from agent.control.access import build_policy
    from agent.proto import rendezvous_pb2 as pb
    from agent.rendezvous.requests import Signer
    from agent.wire import messages, signing
    from agent.wire.handshake import Binding
    from agent.wire.peer_ids import derive_id, fingerprint

    server = SigningKey.generate()
    server_pk = bytes(server.verify_key)
    a_key = SigningKey.generate()
    a_pk = bytes(a_key.verify_key)
    a_id = derive_id(a_pk)
    signer = Signer(a_id, a_key)
    request = signer.sign("punch_hole_request", pb.PunchHoleRequest(id="1234567890"))
    body, sig = signing.split(request)
    push_body = messages.build(
        request_relay=pb.RequestRelay(id="1234567890", uuid="u" * 36, requester_id=a_id, requester_pk=a_pk)
    )
    push = signing.seal(server, signing.PUSH, b"1234567890", push_body)
    ticket = signing.make_ticket(server, "u" * 36, "", int(time.time() * 1000))
    cfg = Config()
    cfg.access.allow = [a_id]
    cfg.access.allow_targets = ["127.0.0.1:22"]
    state = tmp / "b"
    state.mkdir()
    (state / "allowed_peers").write_text(f"{a_id}={fingerprint(a_pk)}\n")
    binding = Binding(a_id, a_pk)
    return [
        ("A", "sign a request (PunchHoleRequest x2, RequestRelay)", 3, median_us(lambda: signer.sign(
            "punch_hole_request", pb.PunchHoleRequest(id="1234567890")))),
        ("server", "verify a request's signature", 3, median_us(lambda: signing.verify(
            a_pk, signing.REQUEST, b"", body, sig))),
        ("server", "sign a push", 3, median_us(lambda: signing.seal(server, signing.PUSH, b"1234567890", push_body))),
        ("server", "sign a relay ticket", 1, median_us(
            lambda: signing.make_ticket(server, "u" * 36, "", int(time.time() * 1000)))),
        ("B", "verify a push's signature", 3, median_us(lambda: signing.opened(
            server_pk, signing.PUSH, b"1234567890", push))),
        ("B", "build the access policy and decide on the push", 3, median_us(
            lambda: build_policy(cfg, state).would_admit(binding))),  # type: ignore[union-attr]
        ("A", "check the relay ticket", 1, median_us(lambda: signing.check_ticket(
            (server_pk,), ticket, "u" * 36, "", time.time()))),
        ("relay", "check a ticket (both halves)", 2, median_us(lambda: signing.check_ticket(
            (server_pk,), ticket, "u" * 36, "", time.time()))),
    ]


def e2e(cwd: Path, n: int) -> dict[str, list[float]]:
    out = subprocess.run(
        [sys.executable, "-c", E2E_CODE, str(n)], cwd=cwd, capture_output=True, text=True, check=False, timeout=600
    )
    if out.returncode != 0:
        raise SystemExit(f"end-to-end run in {cwd} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def worktree(rev: str, where: Path) -> Path:
    path = where / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sessions", type=int, default=30)
    ap.add_argument("--baseline-rev", default="", help="git revision to measure the same setup times on")
    args = ap.parse_args()
    print(f"cpus {os.cpu_count()}, python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="trust-bench-") as tmp:
        rows = micro(Path(tmp))
        print(f"\n{'who':7} {'check':52} {'x/session':>9} {'median us':>10} {'us/session':>11}")
        total = 0.0
        for who, what, per_session, us in rows:
            total += per_session * us
            print(f"{who:7} {what:52} {per_session:9d} {us:10.1f} {per_session * us:11.1f}")
        print(f"{'':7} {'all of them, one relayed session':52} {'':9} {'':10} {total:11.1f}  = {total / 1000:.2f} ms")

        runs: dict[str, dict[str, list[float]]] = {}
        base = None
        if args.baseline_rev:
            base = worktree(args.baseline_rev, Path(tmp))
            try:
                runs[f"baseline {args.baseline_rev}"] = e2e(base, args.sessions)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False,
                               capture_output=True)
        runs["this tree"] = e2e(ROOT, args.sessions)
        print(f"\nsession setup, open request to first echoed byte, {args.sessions} sessions each (ms):")
        print(f"{'tree':24} {'path':11} {'p50':>7} {'p90':>7} {'min':>7}")
        for name, result in runs.items():
            for path, times in result.items():
                times.sort()
                print(f"{name:24} {path:11} {statistics.median(times):7.1f} {times[int(0.9 * len(times))]:7.1f} "
                      f"{times[0]:7.1f}")
        if base is not None:
            baseline = runs[f"baseline {args.baseline_rev}"]
            for path in ("auto", "relay-only"):
                now, before = statistics.median(runs["this tree"][path]), statistics.median(baseline[path])
                print(f"{path:11} median {now - before:+.1f} ms against the baseline ({now / before:.2f}x)")


if __name__ == "__main__":
    main()
