"""Agent benchmark: footprint, pipe first-byte latency, tunnel throughput against the bare relay.

    python bench/agent_bench.py [--bytes 1G] [--pipe-runs 20] [--repeat 3] [--placements isolated,grouped]
                                [--profile auto|always|never]

Two agents run on 127.0.0.1 only, each with its own state dir: B with embedded
rendezvous + relay servers on free ports, A pointed at them. Everything goes
over the relay path (`--path relay`).

0. The Ray floor: a bare lean private head, started as `up` starts it, with no
   actor and no driver (what any placement pays before its first actor).
   Sections 1-3 then run once per placement (`--placements`, default both),
   with fresh agents, and a summary table puts them side by side.
1. Footprint of B right after `up`: the supervisor, every descendant, and every
   process whose cmdline names the private Ray head's temp dir; count, RSS, PSS
   (goals: isolated <= 800 MiB, grouped <= 450 MiB); time from spawning `up` to
   its return (it returns once the agent is registered; goal <= 4 s idle), and
   the first log line of each actor (where that time goes). A (no embedded
   servers) is measured as well.
2. `punchthrough pipe` against an echo target: spawn -> first echoed byte on its
   stdout, median and p90 of N runs, next to the floor of spawning the same CLI
   for `id --json` (Python start + imports, no agent work).
3. MB/s of `--bytes` through `connect -L` over the relay (iperf3 -n, both
   directions with -R) against, in the same run: iperf3 direct, and a raw relay
   pair (two plain TCP clients that send RequestRelay{uuid} to an open relay,
   `punchthrough relay --open`, the same code as B's, then stream bytes).
   Goal: the encrypted session at >= 50 % of the raw pair.
   CPU seconds per GiB of the processes on the path say where the time went;
   when the goal is missed (or --profile always) py-spy samples both sessions
   actors during one more tunnel transfer and the hottest frames are printed.

Numbers and ratios only, no asserts. Every process started here is stopped by
pid or `punchthrough down`, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay_bench import wait_listening

from agent.proto import rendezvous_pb2 as pb
from agent.wire import messages
from agent.wire.frames import encode_frame

MiB = 1 << 20
GOAL_PSS = {"isolated": 800 * MiB, "grouped": 450 * MiB}
"""B with embedded servers, right after `up` (issue 11)."""
GOAL_UP_SECONDS = 4.0
GOAL_RATIO = 0.5


def _console_script(name: str) -> str:
    """The installed entry point itself, not a pyenv shim (a shim adds a bash start to every spawn)."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found; pip install -e . first")
    return found


PT = _console_script("punchthrough")
PT_OPS = _console_script("punchthrough-ops")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 1G)")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def fmt_mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


# --------------------------------------------------------------------------- ports


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port_run(n: int) -> int:
    """First of `n` consecutive ports free for TCP and UDP (the rendezvous needs port-1 and a relay port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n < 65535 and all(_bindable(base + i) for i in range(n)):
            return base
    raise SystemExit("no run of free ports found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- processes we own


@dataclass
class Owned:
    """Everything this run started, so `cleanup` can stop exactly that."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agents: list[Path] = field(default_factory=list)
    servers: list[socketserver.BaseServer] = field(default_factory=list)

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, **kw)
        self.procs.append(proc)
        return proc

    def stop_proc(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            self.stop_proc(proc)
        for state in reversed(self.agents):
            if (state / "agent.pid").exists():
                subprocess.run([PT, "--state-dir", str(state), "down"], capture_output=True, timeout=40, check=False)
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()


# --------------------------------------------------------------------------- agents


@dataclass
class Agent:
    state: Path
    peer_id: str = ""
    up_seconds: float = 0.0
    head_seconds: float | None = None
    timeline: str = ""

    def cmd(self, *args: str) -> list[str]:
        return [PT, "--state-dir", str(self.state), *args]

    def make_id(self) -> None:
        out = subprocess.run(self.cmd("id", "--json"), capture_output=True, check=True, timeout=30).stdout
        self.peer_id = json.loads(out)["id"]

    def up(self, owned: Owned, *args: str) -> None:
        owned.agents.append(self.state)
        wall0 = time.time()
        t0 = time.perf_counter()
        res = subprocess.run(self.cmd("up", *args), capture_output=True, text=True, timeout=120, check=False)
        self.up_seconds = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"up failed for {self.state}: {res.stderr.strip() or res.stdout.strip()}")
        log = (self.state / "logs" / "agent.log").read_text(errors="replace")
        m = re.search(r"private Ray head up at \S+ \(pid \d+\) in ([\d.]+) s", log)
        self.head_seconds = float(m.group(1)) if m else None
        self.timeline = self._timeline(wall0)

    def _timeline(self, wall0: float) -> str:
        """Seconds from spawning `up` to each component's first log line (where the start-up time goes)."""
        marks = []
        for path in sorted((self.state / "logs").glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
                if m:
                    at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                    marks.append((at - wall0, path.stem))
                    break
        return ", ".join(f"{name} +{dt:.1f}s" for dt, name in sorted(marks))

    def supervisor_pid(self) -> int:
        return int((self.state / "agent.pid").read_text().split()[0])

    def ops(self, what: str) -> dict[str, Any]:
        res = subprocess.run(
            [PT_OPS, "--state-dir", str(self.state), what, "--json"], capture_output=True, timeout=15, check=True
        )
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    def actor_pids(self) -> dict[str, int]:
        return {a["name"]: int(a["pid"]) for a in self.ops("actors").get("actors", []) if a.get("pid")}


def agent_processes(supervisor: int) -> list[psutil.Process]:
    """The supervisor, its descendants, and whatever names its Ray head's temp dir."""
    procs: dict[int, psutil.Process] = {}
    sup = psutil.Process(supervisor)
    procs[sup.pid] = sup
    for child in sup.children(recursive=True):
        procs[child.pid] = child
    markers: set[str] = set()
    for p in list(procs.values()):
        with contextlib.suppress(psutil.Error):
            for part in p.cmdline():
                m = re.search(r"(/tmp/ptray-[^/\s=]+)", part)
                if m:
                    markers.add(m.group(1))
    if markers:
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                cmd = p.info["cmdline"] or []
                if any(mk in part for part in cmd for mk in markers):
                    procs[p.pid] = p
    return list(procs.values())


def _label(p: psutil.Process) -> str:
    cmd = p.cmdline()
    name = p.name()
    if cmd and cmd[0].startswith("ray::"):
        title = cmd[0].split()[0]  # e.g. ray::HostActor.call while busy
        head, dot, _method = title.partition("Actor.")
        return head + "Actor" if dot else title
    if "agent.cli" in " ".join(cmd[:3]):
        return "supervisor (python -m agent.cli up)"
    if "start" in cmd and "--block" in cmd:
        return "ray start --block"
    base = Path(cmd[0]).name if cmd else name
    if base.startswith("python") and len(cmd) > 2 and cmd[1] == "-m":
        return f"python -m {cmd[2]}"
    if base.startswith("python") and len(cmd) > 1:
        return f"python {Path(cmd[1]).name}"
    return base


@dataclass
class Footprint:
    count: int
    rss: int
    pss: int
    uss: int
    rows: list[tuple[str, int, int, int]]


def footprint(supervisor: int) -> Footprint:
    return measure(agent_processes(supervisor))


def measure(procs: list[psutil.Process]) -> Footprint:
    """Count, RSS, PSS and USS of `procs`, with a row per kind of process (largest PSS first)."""
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    count = rss = pss = uss = 0
    for p in procs:
        try:
            mem = p.memory_full_info()
            label = _label(p)
        except psutil.Error:
            continue
        count += 1
        rss += mem.rss
        pss += mem.pss
        uss += mem.uss
        g = groups[label]
        g[0] += 1
        g[1] += mem.rss
        g[2] += mem.pss
    rows = sorted(((k, v[0], v[1], v[2]) for k, v in groups.items()), key=lambda r: -r[3])
    return Footprint(count, rss, pss, uss, rows)


def print_footprint(title: str, fp: Footprint, goal: int | None = None) -> None:
    verdict = (
        f"  ({'meets' if fp.pss <= goal else 'MISSES'} goal PSS <= {goal // MiB} MiB; PSS/goal {fp.pss / goal:.2f})"
        if goal
        else ""
    )
    sizes = f"RSS {fmt_mib(fp.rss)}, PSS {fmt_mib(fp.pss)}, USS {fmt_mib(fp.uss)}"
    print(f"{title}: {fp.count} processes, {sizes}{verdict}")
    for label, n, r, p in fp.rows:
        print(f"    {n:2d} x {label:40s} RSS {fmt_mib(r):>11s}  PSS {fmt_mib(p):>11s}")
    actors = [row for row in fp.rows if row[0].endswith("HostActor")]
    n_act, pss_act = sum(r[1] for r in actors), sum(r[3] for r in actors)
    print(
        f"    = {n_act} agent actors PSS {fmt_mib(pss_act)} ({fmt_mib(pss_act / max(n_act, 1))} each); "
        f"everything else (supervisor, Ray head and its helpers) PSS {fmt_mib(fp.pss - pss_act)}"
    )


def ray_floor() -> tuple[Footprint, float]:
    """A bare lean private head, started as the agent starts it, with no actor and no driver: the floor."""
    from actors.ray_runtime import start_private_head

    t0 = time.perf_counter()
    head = start_private_head()
    took = time.perf_counter() - t0
    try:
        time.sleep(1.0)  # let its helpers finish importing, as they have by the time an agent is measured
        return measure(head._ours()), took
    finally:
        head.stop()


# --------------------------------------------------------------------------- echo target


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_echo(owned: Owned) -> int:
    srv = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    owned.servers.append(srv)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return int(srv.server_address[1])


# --------------------------------------------------------------------------- 2. pipe latency


def spawn_floor(runs: int, state: Path) -> float:
    """Median seconds to spawn the CLI for `id --json`: Python start + imports, no agent work."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([PT, "--state-dir", str(state), "id", "--json"], capture_output=True, timeout=30, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pipe_first_byte(owned: Owned, a: Agent, peer: str, target: str, timeout: float = 20.0) -> float:
    t0 = time.perf_counter()
    proc = owned.popen(
        a.cmd("pipe", peer, target, "--path", "relay"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b"x")
        proc.stdin.flush()
        fd = proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise RuntimeError(f"pipe: no byte within {timeout:.0f}s")
        first = os.read(fd, 1)
        elapsed = time.perf_counter() - t0
        if first != b"x":
            proc.wait(10)
            err = proc.stderr.read().decode(errors="replace").strip()
            last = (a.ops("sessions").get("sessions") or [{}])[-1]
            raise RuntimeError(
                f"pipe got {first!r}, exit {proc.returncode}, stderr {err!r}; A's last session: "
                f"state {last.get('state')!r} error {last.get('error')!r} attempts {last.get('attempts')}"
            )
        proc.stdin.close()
        proc.wait(10)
        return elapsed
    finally:
        owned.stop_proc(proc)
        owned.procs.remove(proc)


# --------------------------------------------------------------------------- 3. throughput


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
    return out


def iperf(port: int, nbytes: int, reverse: bool, timeout: float = 120.0) -> float:
    """MB/s (10^6 bytes per second) received, from iperf3's own JSON report."""
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", str(nbytes), "-J"] + (["-R"] if reverse else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 failed: {res.stderr.strip() or res.stdout[-300:]}") from None
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 8e6


def raw_relay_pair(relay_port: int, nbytes: int, timeout: float = 120.0) -> float:
    """MB/s between two plain TCP clients joined by the relay (no agent, no crypto)."""
    frame = encode_frame(messages.build(request_relay=pb.RequestRelay(id="bench", uuid=str(uuid.uuid4()))))
    a = socket.create_connection(("127.0.0.1", relay_port), timeout=10)
    b = socket.create_connection(("127.0.0.1", relay_port), timeout=10)
    try:
        a.sendall(frame)
        b.sendall(frame)
        a.sendall(b"!")
        if b.recv(1) != b"!":  # paired: the pump runs
            raise RuntimeError("relay did not pair the raw clients")
        a.settimeout(timeout)
        b.settimeout(timeout)
        block = memoryview(bytes(MiB))
        errors: list[BaseException] = []

        def send() -> None:
            try:
                left = nbytes
                while left > 0:
                    n = min(left, len(block))
                    a.sendall(block[:n])
                    left -= n
                a.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # reported by the receiving side
                errors.append(exc)

        buf = bytearray(MiB)
        got = 0
        t0 = time.perf_counter()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while got < nbytes:
            n = b.recv_into(buf)
            if n == 0:
                break
            got += n
        elapsed = time.perf_counter() - t0
        sender.join(10)
        if errors or got != nbytes:
            raise RuntimeError(f"raw relay pair moved {got} of {nbytes} bytes ({errors[:1]})")
        return nbytes / elapsed / 1e6
    finally:
        a.close()
        b.close()


@contextlib.contextmanager
def forward(owned: Owned, a: Agent, peer: str, target: str) -> Iterator[int]:
    """`connect -L` on a free port for the duration of the block."""
    port = free_port()
    proc = owned.popen(
        a.cmd("connect", peer, "-L", f"127.0.0.1:{port}:{target}", "--path", "relay"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 20)
        line = proc.stderr.readline().decode(errors="replace") if ready else ""
        if "forwarding" not in line:
            raise RuntimeError(f"connect -L did not start: {line.strip()}")
        yield port
    finally:
        owned.stop_proc(proc)
        owned.procs.remove(proc)


def profile_transfer(owned: Owned, pids: dict[str, int], run: Any, seconds_hint: float, outdir: Path) -> None:
    """py-spy the given actors while `run()` moves bytes; print each one's hottest frames."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("  (py-spy not installed: pip install py-spy)")
        return
    outdir.mkdir(parents=True, exist_ok=True)
    duration = max(2, int(seconds_hint + 1))
    spies = {}
    for name, pid in pids.items():
        out = outdir / f"{name}.txt"
        spies[name] = (
            out,
            owned.popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "-d",
                    str(duration),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "--nonblocking",
                    "-o",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
        )
    time.sleep(0.7)  # py-spy attaches
    run()
    for name, (out, proc) in spies.items():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(duration + 10)
        owned.stop_proc(proc)
        owned.procs.remove(proc)
        if not out.exists():
            print(f"  {name}: py-spy wrote nothing")
            continue
        leaf: collections.Counter[str] = collections.Counter()
        total = in_loop = 0
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            total += int(n)
            if "run_forever" not in stack:
                continue  # Ray's own threads (mostly the blocked main thread), not the actor's event loop
            in_loop += int(n)
            leaf[stack.split(";")[-1]] += int(n)
        print(
            f"  {name} (pid {pids[name]}): {in_loop} of {total} samples in the actor's event loop thread; "
            f"hottest frames there (self time):"
        )
        for frame, hits in leaf.most_common(8):
            print(f"    {hits / max(in_loop, 1) * 100:5.1f}%  {frame}")


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, owned: Owned, tmp: Path) -> None:
    print(
        f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, python {sys.version.split()[0]}, "
        f"transfer {args.bytes / MiB:.0f} MiB, CLI {PT}"
    )
    print("\n== 0. the Ray floor: a bare lean private head (no actor, no driver), started as `up` starts it")
    floor, floor_seconds = ray_floor()
    print_footprint(f"Ray floor (started in {floor_seconds:.2f} s)", floor)
    echo_port = start_echo(owned)
    iperf_port = free_port()
    # The baseline pair: two plain TCP clients through an open relay (same code; B's own relay pairs
    # only tickets its rendezvous server issued, so a raw pair cannot use it).
    open_relay = free_port()
    relay = owned.popen(
        [PT, "--state-dir", str(tmp / "relay"), "relay", "--open", "--bind", "127.0.0.1", "--port", str(open_relay)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(open_relay, relay)
    owned.popen(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.3)
    results = []
    for placement in args.placements:
        print(f"\n######## placement {placement}")
        results.append(run_placement(args, owned, tmp / placement[:3], placement, echo_port, iperf_port, open_relay))
    print(f"\n== summary (Ray floor PSS {fmt_mib(floor.pss)}, {floor.count} processes)")
    head = ["placement", "B PSS", "goal", "A PSS", "B up s", "A up s", "pipe ms", "A->B MB/s", "B->A MB/s", "/raw"]
    print("  ".join(f"{h:>10s}" for h in head))
    for r in results:
        row = [
            r.placement,
            f"{r.b_pss / MiB:.0f}",
            f"{GOAL_PSS[r.placement] // MiB}",
            f"{r.a_pss / MiB:.0f}",
            f"{r.b_up:.2f}",
            f"{r.a_up:.2f}",
            f"{r.pipe_ms:.0f}",
            f"{r.up_mbs:.0f}",
            f"{r.down_mbs:.0f}",
            f"{r.ratio:.2f}",
        ]
        print("  ".join(f"{c:>10s}" for c in row))
    print(
        f"goals: B PSS within the goal of its placement; `up` -> registered <= {GOAL_UP_SECONDS:.0f} s on an idle "
        f"machine; tunnel >= {GOAL_RATIO:.2f} of the raw relay pair"
    )


@dataclass
class PlacementResult:
    placement: str
    b_pss: int
    a_pss: int
    b_up: float
    a_up: float
    pipe_ms: float
    up_mbs: float
    down_mbs: float
    ratio: float


def run_placement(
    args: argparse.Namespace,
    owned: Owned,
    tmp: Path,
    placement: str,
    echo_port: int,
    iperf_port: int,
    open_relay: int,
) -> PlacementResult:
    """B (embedded servers) and A up in `placement`, measured, then down again."""
    nbytes: int = args.bytes
    base = free_port_run(3)
    rv_port, relay_port = base + 1, base + 2  # base is the rendezvous' NAT-test port
    a, b = Agent(tmp / "a"), Agent(tmp / "b")
    a.make_id()
    b.make_id()
    cfg = tmp / "b.toml"
    cfg.write_text(f'[embedded]\nrendezvous_port = {rv_port}\nrelay_port = {relay_port}\nbind = "127.0.0.1"\n')

    # ---- 1. footprint
    b.up(
        owned,
        "--config",
        str(cfg),
        "--allow",
        a.peer_id,
        "--allow-target",
        f"127.0.0.1:{echo_port}",
        "--allow-target",
        f"127.0.0.1:{iperf_port}",
        "--placement",
        placement,
    )
    print(f"\n== 1. footprint (rendezvous :{rv_port}, relay :{relay_port})")
    print(
        f"B `up` (embedded servers) -> registered: {b.up_seconds:.2f} s"
        + (f"  (of which Ray head start {b.head_seconds:.2f} s)" if b.head_seconds else "")
    )
    print(f"    first log line per component (from spawning up): {b.timeline}")
    b_fp = footprint(b.supervisor_pid())
    print_footprint(f"B after up ({placement})", b_fp, GOAL_PSS[placement])
    server_key = (b.state / "server" / "id_ed25519.pub").read_text().strip()
    a.up(
        owned,
        "--server",
        f"127.0.0.1:{rv_port}",
        "--relay",
        f"127.0.0.1:{relay_port}",
        "--server-key",
        server_key,
        "--placement",
        placement,
    )
    print(
        f"A `up` (no embedded servers) -> registered: {a.up_seconds:.2f} s"
        + (f"  (of which Ray head start {a.head_seconds:.2f} s)" if a.head_seconds else "")
    )
    print(f"    first log line per component (from spawning up): {a.timeline}")
    a_fp = footprint(a.supervisor_pid())
    print_footprint(f"A after up ({placement})", a_fp)

    # ---- 2. pipe latency
    print(f"\n== 2. pipe spawn -> first echoed byte over the relay ({args.pipe_runs} runs after 1 warm-up)")
    target = f"127.0.0.1:{echo_port}"
    failures: list[str] = []

    def one() -> float | None:
        try:
            return pipe_first_byte(owned, a, b.peer_id, target)
        except RuntimeError as exc:  # counted and shown, the other runs still count
            failures.append(str(exc))
            return None

    warm = one()
    times = [t for t in (one() for _ in range(args.pipe_runs)) if t is not None]
    if failures:
        print(f"{len(failures)} pipe run(s) failed; first: {failures[0]}")
    if not times:
        raise RuntimeError("every pipe run failed")
    floor = spawn_floor(5, a.state)
    med, p90 = statistics.median(times), pct(times, 90)
    relay_ms = [
        x["elapsed_ms"]
        for s in a.ops("sessions").get("sessions", [])
        for x in s.get("attempts", [])
        if x.get("strategy") == "relay" and "elapsed_ms" in x
    ]
    print(
        f"first byte ({len(times)} runs): median {med * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms, "
        f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
        + (f" (warm-up {warm * 1000:.0f} ms)" if warm is not None else " (warm-up failed)")
    )
    print(
        f"floor: spawning `punchthrough id --json` {floor * 1000:.0f} ms (median of 5); "
        f"agent-side share of the median {max(med - floor, 0) * 1000:.0f} ms; "
        f"relay dial per session (agent's own timer) median {statistics.median(relay_ms):.0f} ms"
        if relay_ms
        else f"floor: spawning `punchthrough id --json` {floor * 1000:.0f} ms"
    )

    # ---- 3. throughput
    print(f"\n== 3. throughput, {nbytes / MiB:.0f} MiB per transfer, best and median of {args.repeat} (MB = 10^6 B)")
    a_pids, b_pids = a.actor_pids(), b.actor_pids()
    path_pids = {"A sessions": a_pids["sessions"], "B sessions": b_pids["sessions"]}
    if b_pids.get("servers") == b_pids["sessions"]:  # grouped: one actor carries both
        path_pids = {"A data": a_pids["sessions"], "B data (sessions + relay)": b_pids["sessions"]}
    elif "servers" in b_pids:
        path_pids["B servers (relay)"] = b_pids["servers"]

    results: dict[str, list[float]] = collections.defaultdict(list)
    cpu: dict[str, dict[str, float]] = {}

    def measure(label: str, fn: Any) -> None:
        before = cpu_seconds(path_pids)
        for _ in range(args.repeat):
            results[label].append(fn())
        after = cpu_seconds(path_pids)
        cpu[label] = {k: (after[k] - before[k]) / (args.repeat * nbytes / (1 << 30)) for k in after if k in before}

    measure("raw relay pair", lambda: raw_relay_pair(open_relay, nbytes))
    measure("iperf3 direct", lambda: iperf(iperf_port, nbytes, False))
    measure("iperf3 direct -R", lambda: iperf(iperf_port, nbytes, True))
    with forward(owned, a, b.peer_id, f"127.0.0.1:{iperf_port}") as fport:
        measure("agent tunnel A->B", lambda: iperf(fport, nbytes, False))
        measure("agent tunnel B->A (-R)", lambda: iperf(fport, nbytes, True))
        raw = max(results["raw relay pair"])
        for label, vals in results.items():
            print(
                f"{label:24s} best {max(vals):8.1f} MB/s  median {statistics.median(vals):8.1f} MB/s"
                f"  ({', '.join(f'{v:.0f}' for v in vals)})  best/raw-pair best {max(vals) / raw:5.2f}"
            )
        print("CPU seconds per GiB moved (all processes on the path, summed over the runs):")
        for label, per in cpu.items():
            if any(v > 0.005 for v in per.values()):
                print(f"    {label:24s} " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
        worst = min(max(results["agent tunnel A->B"]), max(results["agent tunnel B->A (-R)"]))
        ratio = worst / raw
        print(
            f"encrypted session / raw relay pair (worse direction, best runs): {ratio:.2f} "
            f"({'meets' if ratio >= GOAL_RATIO else 'MISSES'} goal >= {GOAL_RATIO:.2f})"
        )
        if args.profile == "always" or (args.profile == "auto" and ratio < GOAL_RATIO):
            outdir = Path(args.profile_dir) if args.profile_dir else tmp / "profile"
            print("\nprofile: py-spy on both sessions actors during one A->B tunnel transfer")
            secs = nbytes / (max(results["agent tunnel A->B"]) * 1e6)
            profile_transfer(
                owned,
                {"A sessions": a_pids["sessions"], "B sessions": b_pids["sessions"]},
                lambda: iperf(fport, nbytes, False),
                secs,
                outdir,
            )

    b_after = footprint(b.supervisor_pid())
    print(f"\nB after the transfers: {b_after.count} processes, RSS {fmt_mib(b_after.rss)}, PSS {fmt_mib(b_after.pss)}")
    for agent in (a, b):
        subprocess.run(agent.cmd("down"), capture_output=True, timeout=40, check=False)
        owned.agents.remove(agent.state)
    return PlacementResult(
        placement,
        b_fp.pss,
        a_fp.pss,
        b.up_seconds,
        a.up_seconds,
        med * 1000,
        max(results["agent tunnel A->B"]),
        max(results["agent tunnel B->A (-R)"]),
        ratio,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--bytes", type=parse_size, default=1 << 30, help="bytes per transfer (default 1G = 1 GiB)")
    ap.add_argument("--pipe-runs", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="transfers per measurement")
    ap.add_argument(
        "--placements",
        type=lambda t: t.split(","),
        default=["isolated", "grouped"],
        help="comma-separated placements to measure, side by side (default isolated,grouped)",
    )
    ap.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy the sessions actors (auto: only when below the throughput goal)",
    )
    ap.add_argument("--profile-dir", default=None, help="keep py-spy raw output here (default: discarded)")
    args = ap.parse_args()

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    owned = Owned()
    tmp = Path(tempfile.mkdtemp(prefix="ptab-", dir="/tmp"))  # short: agents put Unix sockets in it
    t0 = time.perf_counter()
    try:
        run(args, owned, tmp)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        for state in owned.agents:
            with contextlib.suppress(OSError):
                tail = (state / "logs" / "agent.log").read_text(errors="replace").splitlines()[-5:]
                print(f"  {state.name} agent.log: " + " | ".join(tail), file=sys.stderr)
        sys.exit(1)
    finally:
        owned.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"\n(total {time.perf_counter() - t0:.0f} s; agents down, helpers stopped)")


if __name__ == "__main__":
    main()
