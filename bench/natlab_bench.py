"""Real agents behind real kernel NAT: connect latency, bulk throughput and small-message round trips.

    python -m bench.natlab_bench [--runs 20] [--mb 100] [--scenarios both-cone,...] [--budget 340]

Needs root (network namespaces). Prints numbers, asserts nothing. Every lab is torn down in `finally`
(agents first, then the namespaces, which ends whatever still runs in them).

Per scenario (agent A on ha, B on hb, or ha2 for same-lan; A asks with the row's `--path` policy):

* floor: spawn of `punchthrough --help` in A's namespace to its exit (Python start + the CLI's imports, which
  `pipe` shares; `punchthrough id` is slower still, it loads the crypto libraries `pipe` never imports): the part
  of every pipe number that is not the tunnel.
* first byte: a probe running *inside* A's namespace spawns `punchthrough pipe B 127.0.0.1:ECHO`, writes one
  byte at once and times spawn -> that byte echoed back. Every pipe opens a new session, so this includes
  the whole path race (punch, relay, handshake). `runs` times; first, median, p90.
* path: the winning attempt of each of those sessions (`punchthrough-ops sessions --json`, outcome "won").
* upload / download: one pipe to a sink on B; timed from the sink's greeting (the stream is open) to the
  sink's byte count (upload) or the last byte (download). MB = 10^6 bytes.
* lossy-cone only: 200 round trips of 64 bytes over one pipe session, KCP (`disable-tcp-punch`) vs the TCP
  relay (`relay-only`), p50/p99/max. The lab drops 5 % of forwarded UDP only, so the TCP relay sees no loss:
  this shows what KCP's retransmissions cost in the tail, not TCP under the same loss.

The next scenario's lab is built and its agents started while the previous one is torn down (nothing else
runs while a scenario is measured); the load average is printed because other work on a 2-core machine
skews every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file inside a namespace, too
    sys.path.insert(0, str(ROOT))

PT = [sys.executable, "-m", "agent.cli"]
ECHO_PORT, SINK_PORT = 9000, 9001
CHUNK = 256 * 1024


@dataclass
class Case:
    scenario: str
    a: str = "ha"
    b: str = "hb"
    policy: str = ""


CASES = [
    Case("both-cone"),
    Case("same-lan", b="ha2"),
    Case("both-symmetric"),
    Case("cone-symmetric"),
    Case("sequential-cone"),
    Case("udp-blocked"),
    Case("ipv6"),
    Case("lossy-cone", policy="disable-tcp-punch"),
    Case("fullcone-symmetric"),
    Case("reject"),
]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 20 samples p90 is the 18th)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


# ============================================================ inside a namespace (probe and sink)


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError(f"pipe closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _pipe(args: dict[str, Any], target: str) -> subprocess.Popen[bytes]:
    argv = [*PT, "--state-dir", args["state"], "pipe", args["peer"], target]
    if args.get("policy"):
        argv += ["--path", args["policy"]]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes]) -> str:
    """Close our end, reap the pipe process; its stderr if it failed."""
    with contextlib.suppress(OSError):
        assert proc.stdin is not None
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "pipe did not exit within 30 s of EOF"
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.stdout is not None:
        proc.stdout.close()
    proc.stderr.close()
    return "" if proc.returncode == 0 else f"exit {proc.returncode}: {err[-300:]}"


def probe_floor(args: dict[str, Any]) -> dict[str, Any]:
    times = []
    for _ in range(args["runs"]):
        t0 = time.perf_counter()
        subprocess.run([*PT, "--help"], capture_output=True, check=True, timeout=30)
        times.append(time.perf_counter() - t0)
    return {"times": times}


def probe_first_byte(args: dict[str, Any]) -> dict[str, Any]:
    times: list[float] = []
    errors: list[str] = []
    for _ in range(args["runs"]):
        t0 = time.perf_counter()
        proc = _pipe(args, f"127.0.0.1:{ECHO_PORT}")
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"\x5a")
        proc.stdin.flush()
        try:
            got = _read_exact(proc.stdout.fileno(), 1)
            t1 = time.perf_counter()
            if got != b"\x5a":
                errors.append(f"echoed {got!r}")
            else:
                times.append(t1 - t0)
        except EOFError:
            pass
        err = _finish(proc)
        if err:
            errors.append(err)
    return {"times": times, "errors": errors}


def probe_bulk(args: dict[str, Any]) -> dict[str, Any]:
    """Upload: stream N bytes, the sink answers with its count. Download: the sink sends N bytes."""
    n = args["bytes"]
    proc = _pipe(args, f"127.0.0.1:{SINK_PORT}")
    assert proc.stdin is not None and proc.stdout is not None
    out_fd = proc.stdout.fileno()
    try:
        if _read_exact(out_fd, 1) != b"+":
            return {"error": "no greeting from the sink"}
        t0 = time.perf_counter()
        if args["direction"] == "up":
            proc.stdin.write(b"U")
            block = os.urandom(CHUNK)
            left = n
            while left:
                k = min(left, CHUNK)
                proc.stdin.write(block[:k])
                left -= k
            proc.stdin.close()
            reply = b""
            while chunk := os.read(out_fd, 64):
                reply += chunk
            t1 = time.perf_counter()
            got = int(reply or b"-1")
        else:
            proc.stdin.write(b"D" + struct.pack("!Q", n))
            proc.stdin.flush()
            got = 0
            while chunk := os.read(out_fd, 1 << 20):
                got += len(chunk)
            t1 = time.perf_counter()
        err = _finish(proc)
        return {"seconds": t1 - t0, "bytes": got, "error": err if got == n else f"moved {got} of {n} bytes; {err}"}
    except (EOFError, OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}; {_finish(proc)}"}


def probe_rtt(args: dict[str, Any]) -> dict[str, Any]:
    proc = _pipe(args, f"127.0.0.1:{ECHO_PORT}")
    assert proc.stdin is not None and proc.stdout is not None
    out_fd, in_fd = proc.stdout.fileno(), proc.stdin.fileno()
    times: list[float] = []
    try:
        msg = os.urandom(64)
        os.write(in_fd, msg)
        _read_exact(out_fd, 64)  # the session is open and warm
        for _ in range(args["count"]):
            msg = os.urandom(64)
            t0 = time.perf_counter()
            os.write(in_fd, msg)
            if _read_exact(out_fd, 64) != msg:
                return {"times": times, "error": "echo mismatch"}
            times.append(time.perf_counter() - t0)
    except (EOFError, OSError) as exc:
        return {"times": times, "error": f"{exc}; {_finish(proc)}"}
    return {"times": times, "error": _finish(proc)}


class _Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.sendall(b"+")
        mode = sock.recv(1)
        if mode == b"U":
            total = 0
            while data := sock.recv(1 << 20):
                total += len(data)
            sock.sendall(str(total).encode())
        elif mode == b"D":
            head = b""
            while len(head) < 8 and (data := sock.recv(8 - len(head))):
                head += data
            left = struct.unpack("!Q", head)[0]
            block = os.urandom(CHUNK)
            while left:
                k = min(left, CHUNK)
                sock.sendall(block[:k])
                left -= k
        sock.shutdown(socket.SHUT_WR)


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def run_sink(port: int) -> None:
    with _SinkServer(("127.0.0.1", port), _Sink) as srv:
        print("ready", flush=True)
        srv.serve_forever()


PROBES = {"floor": probe_floor, "first_byte": probe_first_byte, "bulk": probe_bulk, "rtt": probe_rtt}


# ============================================================ the driver (root namespace)


@dataclass
class Row:
    case: Case
    floor: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    paths: Counter[str] = field(default_factory=Counter)
    up_s: float = 0.0
    mbs: dict[str, float] = field(default_factory=dict)
    rtt: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""
    agent_ms: list[float] = field(default_factory=list)
    """Per session: the agent's time from the open to the winning path's authenticated handshake."""
    ice: dict[str, Any] | None = None
    """aioice in the same lab (bench/ice_agent.py measure_ice), with --ice."""


def _probe(lab: Any, host: str, what: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    out = lab.run(host, [sys.executable, str(Path(__file__).resolve()), "_probe", what, json.dumps(args)],
                  capture_output=True, timeout=timeout, cwd=str(ROOT))
    if out.returncode != 0:
        return {"error": f"probe {what} exit {out.returncode}: {out.stderr.decode()[-400:]}", "times": []}
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@dataclass
class Prepared:
    row: Row
    lab: Any = None
    agents: Any = None
    b_id: str = ""


def prepare(case: Case, work: Path, new_links: bool = False) -> Prepared:
    """Lab, server, echo and sink on B, both agents up. Runs while the previous lab is torn down.
    `new_links`: the agents keep no idle link (link_idle 0), so every pipe races for a new one."""
    from ops.natlab import Lab
    from tests.natlab.agents import LabAgents

    prep = Prepared(Row(case))
    try:
        prep.lab = Lab(case.scenario)
        prep.agents = LabAgents(prep.lab, work / case.scenario)
        prep.lab.up()
        prep.agents.start_server()
        prep.agents.start_echo(case.b)
        sink = prep.lab.popen(case.b, [sys.executable, str(Path(__file__).resolve()), "_sink", str(SINK_PORT)],
                              stdout=subprocess.PIPE, cwd=str(ROOT))
        assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready", "sink did not start"
        a_id, prep.b_id = prep.agents.agent_id(case.a), prep.agents.agent_id(case.b)
        extra: list[str] = []
        if new_links:
            conf = work / case.scenario / "new-links.toml"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text("[agent]\nlink_idle = 0\n")
            extra = ["--config", str(conf)]
        prep.row.up_s = prep.agents.up({case.b: ["--allow", a_id, "--allow-target", f"127.0.0.1:{ECHO_PORT}",
                                                 "--allow-target", f"127.0.0.1:{SINK_PORT}", *extra], case.a: extra})
    except Exception as exc:
        prep.row.errors.append(f"setup: {type(exc).__name__}: {exc}")
    return prep


def teardown(prep: Prepared) -> None:
    if prep.agents is not None:
        prep.agents.down()
    if prep.lab is not None:
        prep.lab.down()


def measure(prep: Prepared, runs: int, nbytes: int, deadline: float, ice: bool = False) -> None:
    from tests.natlab.agents import winner

    row, case, lab, agents = prep.row, prep.row.case, prep.lab, prep.agents
    if row.errors:  # setup failed
        return

    def initiated() -> list[dict[str, Any]]:
        return [s for s in agents.ops(case.a, "sessions")["sessions"] if s.get("role") == "initiator"]

    try:
        base = {"state": str(agents.state(case.a)), "peer": prep.b_id, "policy": case.policy}
        row.floor = _probe(lab, case.a, "floor", {**base, "runs": 5}, 60)["times"]
        res = _probe(lab, case.a, "first_byte", {**base, "runs": runs}, 40 + runs * 30)
        row.first, row.errors = res["times"], res.get("errors", []) + ([res["error"]] if "error" in res else [])
        for s in initiated()[-runs:]:
            won = winner(s)
            row.paths[won or f"(no 'won' attempt; path {s.get('path') or '-'})"] += 1
            row.agent_ms += [a["elapsed_ms"] for a in s.get("attempts", []) if a.get("outcome") == "won"][:1]
            if not won and not any("no 'won'" in e for e in row.errors):
                row.errors.append(f"no 'won' attempt in session: {json.dumps(s)}")
        for direction in ("up", "down"):
            if time.monotonic() + 60 > deadline:
                row.note = "bulk skipped: out of time budget"
                break
            res = _probe(lab, case.a, "bulk", {**base, "bytes": nbytes, "direction": direction},
                         max(10.0, deadline - time.monotonic() - 20))
            if res.get("error"):
                row.errors.append(f"bulk {direction}: {res['error']}")
            else:
                row.mbs[direction] = res["bytes"] / res["seconds"] / 1e6
        if case.scenario == "lossy-cone":
            for policy in ("disable-tcp-punch", "relay-only"):
                res = _probe(lab, case.a, "rtt", {**base, "policy": policy, "count": 200}, 90)
                if res.get("error"):
                    row.errors.append(f"rtt {policy}: {res['error']}")
                sessions = initiated()
                row.rtt[f"{policy} ({winner(sessions[-1]) if sessions else '?'})"] = res["times"]
        if ice:
            if str(Path(__file__).resolve().parent) not in sys.path:  # a sibling file, as the other benches import
                sys.path.insert(0, str(Path(__file__).resolve().parent))
            from ice_agent import measure_ice, start_ice_servers

            stun, turn = start_ice_servers(lab)
            transport = "tcp" if case.scenario == "udp-blocked" else "udp"  # only TCP gets out there
            row.ice = measure_ice(lab, case.a, case.b, runs, stun, turn, turn_transport=transport)
    except Exception as exc:
        row.errors.append(f"{type(exc).__name__}: {exc}")


def render_ice(rows: list[Row]) -> str:
    """Ours (agent time: open -> the winning path authenticated) beside aioice (gathering -> connect)."""
    table = [["scenario", "ours p50 ms", "ours path", "aioice p50 ms", "aioice path", "aioice ok", "ours/aioice"]]
    for r in rows:
        if r.ice is None:
            continue
        ours = statistics.median(r.agent_ms) if r.agent_ms else None
        theirs = statistics.median(r.ice["times"]) * 1000 if r.ice.get("times") else None
        table.append([
            r.case.scenario,
            f"{ours:.0f}" if ours is not None else "-",
            ", ".join(f"{k} x{v}" for k, v in r.paths.most_common()) or "-",
            f"{theirs:.0f}" if theirs is not None else "-",
            ", ".join(f"{k} x{v}" for k, v in sorted(r.ice.get("paths", {}).items(), key=lambda kv: -kv[1])) or "-",
            f"{len(r.ice.get('times', []))}/{sum(r.ice.get('paths', {}).values()) or '-'}",
            f"{ours / theirs:.2f}x" if ours is not None and theirs else "-",
        ])
    if len(table) == 1:
        return ""
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = ["ours beside a third-party ICE agent (aioice + coturn STUN/TURN in the same lab, same runs):", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table]
    return "\n".join(lines)


def _ms(v: float) -> str:
    return f"{v * 1000:.0f}" if v >= 0.0995 else f"{v * 1000:.1f}"


def render(rows: list[Row], runs: int, nbytes: int) -> str:
    head = ["scenario", "policy", "floor ms", "first ms", "p50 ms", "p90 ms", "ok", "winning path",
            "up MB/s", "down MB/s"]
    table = [head]
    for r in rows:
        ok = f"{len(r.first)}/{runs}"
        table.append([
            r.case.scenario, r.case.policy or "auto",
            _ms(statistics.median(r.floor)) if r.floor else "-",
            _ms(r.first[0]) if r.first else "-",
            _ms(statistics.median(r.first)) if r.first else "-",
            _ms(pct(r.first, 90)) if r.first else "-",
            ok,
            ", ".join(f"{k} x{v}" for k, v in r.paths.most_common()) or "-",
            f"{r.mbs['up']:.1f}" if "up" in r.mbs else "-",
            f"{r.mbs['down']:.1f}" if "down" in r.mbs else "-",
        ])
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = [f"natlab bench: {runs} pipe opens per scenario, {nbytes / 1e6:.0f} MB bulk each way", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table]
    lines.append("")
    for r in rows:
        for policy, times in r.rtt.items():
            if times:
                lines.append(f"{r.case.scenario} 64-byte echo round trips over one pipe, --path {policy}: "
                             f"n={len(times)} p50 {_ms(pct(times, 50))} ms, p99 {_ms(pct(times, 99))} ms, "
                             f"max {_ms(max(times))} ms")
        if r.note.strip():
            lines.append(f"{r.case.scenario}: {r.note.strip()}")
        for e in r.errors[:5]:  # one line each, long ones cut
            lines.append(f"{r.case.scenario} error: {e[:1500]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:
        print(json.dumps(PROBES[argv[1]](json.loads(argv[2]))))
        return 0
    if argv[:1] == ["_sink"]:
        run_sink(int(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--mb", type=float, default=100.0)
    p.add_argument("--scenarios", default=",".join(c.scenario for c in CASES))
    p.add_argument("--budget", type=float, default=340.0, help="seconds; later scenarios are skipped past it")
    p.add_argument("--ice", action="store_true",
                   help="also run aioice (bench/ice_agent.py; coturn in the lab) in each scenario and compare")
    p.add_argument("--new-links", action="store_true",
                   help="agents keep no idle link: every first-byte run races for a new one (else runs 2.. reuse it)")
    args = p.parse_args(argv)
    from ops.natlab import available

    ok, why = available()
    if not ok:
        print(f"natlab bench skipped: {why}")
        return 0
    wanted = args.scenarios.split(",")
    cases = [c for c in CASES if c.scenario in wanted]
    unknown = set(wanted) - {c.scenario for c in CASES}
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    started = time.monotonic()
    deadline = started + args.budget
    load = os.getloadavg()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="natlab-bench-") as work, ThreadPoolExecutor(1) as pool:
        # The next lab is built (and its agents started) while the previous one is torn down; nothing
        # else runs while a scenario is measured.
        nxt: Future[Prepared] | None = pool.submit(prepare, cases[0], Path(work), args.new_links) if cases else None
        for i, case in enumerate(cases):
            assert nxt is not None
            prep = nxt.result()
            t0 = time.monotonic()
            try:
                measure(prep, args.runs, int(args.mb * 1e6), deadline, ice=args.ice)
            finally:
                later = [c for c in cases[i + 1:]]
                nxt = None
                if later and time.monotonic() + 45 < deadline:
                    nxt = pool.submit(prepare, later[0], Path(work), args.new_links)
                teardown(prep)
            rows.append(prep.row)
            print(f"{case.scenario}: agents up in {prep.row.up_s:.1f}s (overlapping the previous teardown), "
                  f"measured in {time.monotonic() - t0:.0f}s", flush=True)
            if nxt is None:
                for c in later:
                    print(f"{c.scenario}: skipped, out of time budget", flush=True)
                break
    print()
    print(f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (2 cores; other work on the machine "
          f"skews every number)")
    print()
    print(render(rows, args.runs, int(args.mb * 1e6)))
    if args.ice:
        print()
        print(render_ice(rows))
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
