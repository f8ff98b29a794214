"""Peer links with real clients: punchthrough `connect -L` beside `ssh -L` and the bare target.

    python bench/links_bench.py [--seconds 5] [--parallel 20] [--pool 50] [--placement isolated]

One run, on 127.0.0.1 only: an HTTP/1.1 server (Python's ThreadingHTTPServer, keep-alive, a 1 KiB
page) is reached four ways, and the same clients run against each:
  - straight to the target;
  - `ssh -L` over one ssh connection to a throwaway loopback sshd (every forwarded connection is a
    channel in that connection, as Tailscale's are streams of one link);
  - `punchthrough connect -L` over the relay (`--path relay`) and over a direct path
    (`--path direct`), two real agents (`punchthrough up`; B runs the embedded servers).
Clients (Python's http.client, a real HTTP/1.1 client):
  new-conn   one client, a new TCP connection per request (a browser or HTTP client without
             keep-alive); requests/s.
  parallel   `--parallel` clients at once, each a new connection per request; requests/s.
  pooled     a pool of `--pool` persistent connections, busy at once; requests/s.
  rtt        one persistent connection, requests one after another; median ms per request.
Every failed request is counted and printed. Ratios are against `ssh -L` (goal >= 1.0 everywhere)
and, for new connections, against the bare target (goal >= 0.2).

Numbers and ratios only, no asserts. Every process started here is stopped by pid or
`punchthrough down`, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_bench import Agent, Owned, free_port, free_port_run

PAGE = os.urandom(512).hex().encode()  # 1 KiB
SERVER = f"""
import http.server, sys
PAGE = {PAGE!r}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms Nagle/delayed-ACK stall
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer.daemon_threads = True
http.server.ThreadingHTTPServer.request_queue_size = 1024
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool, error: str = "") -> None:
        with self.lock:
            if ok:
                self.ok += 1
            else:
                self.failed += 1
                if len(self.errors) < 3:
                    self.errors.append(error)


def _get(conn: http.client.HTTPConnection) -> bool:
    conn.request("GET", "/")
    resp = conn.getresponse()
    return resp.status == 200 and resp.read() == PAGE


def new_connection_requests(port: int, seconds: float, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            tally.add(_get(conn), "bad answer")
        except (OSError, http.client.HTTPException) as exc:
            tally.add(False, f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()


def pooled_requests(port: int, seconds: float, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        while time.monotonic() < deadline:
            try:
                tally.add(_get(conn), "bad answer")
            except (OSError, http.client.HTTPException) as exc:
                tally.add(False, f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    finally:
        conn.close()


def threads(n: int, work: Callable[[], None]) -> float:
    ts = [threading.Thread(target=work) for _ in range(n)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def rate(n: int, port: int, seconds: float, work: Callable[[int, float, Tally], None]) -> tuple[float, Tally]:
    tally = Tally()
    took = threads(n, lambda: work(port, seconds, tally))
    return tally.ok / took, tally


def round_trips(port: int, count: int) -> tuple[float, Tally]:
    tally = Tally()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    try:
        _get(conn)  # the connection (and for us the stream) is up before timing
        for _ in range(count):
            t0 = time.perf_counter()
            ok = _get(conn)
            times.append(time.perf_counter() - t0)
            tally.add(ok, "bad answer")
    except (OSError, http.client.HTTPException) as exc:
        tally.add(False, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    return (statistics.median(times) * 1000 if times else float("nan")), tally


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout:.0f}s")


@contextlib.contextmanager
def ssh_forward(owned: Owned, tmp: Path, target: int) -> Iterator[int]:
    """A throwaway sshd on loopback and one `ssh -N -L` connection through it."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    key = tmp / "client_key"
    host_key = tmp / "host_key"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    os.chmod(tmp / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    sshd_port = free_port()
    config = tmp / "sshd_config"
    config.write_text(
        f"Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPermitRootLogin prohibit-password\n"
        f"PubkeyAuthentication yes\nPasswordAuthentication no\nAuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        f"PidFile {tmp / 'sshd.pid'}\nAllowTcpForwarding yes\nUsePAM no\nMaxSessions 1000\nMaxStartups 1000\n"
        "StrictModes no\n"  # the key files sit under /tmp, which is world-writable
    )
    daemon = owned.popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
    wait_port(sshd_port, daemon)
    local = free_port()
    user = os.environ.get("USER") or "root"
    client = owned.popen(
        [
            "ssh", "-N", "-p", str(sshd_port), "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{local}:127.0.0.1:{target}", f"{user}@127.0.0.1",
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(local, client)
    yield local


@contextlib.contextmanager
def pt_forward(owned: Owned, a: Agent, peer: str, target: int, path: str) -> Iterator[int]:
    port = free_port()
    proc = owned.popen(
        a.cmd("connect", peer, "-L", f"127.0.0.1:{port}:127.0.0.1:{target}", "--path", path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], 20)
    line = proc.stderr.readline().decode(errors="replace") if ready else ""
    if "forwarding" not in line:
        raise RuntimeError(f"connect -L did not start: {line.strip()}")
    # The first request brings the link up (a race); what is measured is the link's steady state.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    _get(conn)
    conn.close()
    yield port


def measure(name: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    fails: list[str] = []
    out["new-conn"], t = rate(1, port, args.seconds, new_connection_requests)
    fails += [f"new-conn {t.failed} ({'; '.join(t.errors)})"] if t.failed else []
    out["parallel"], t = rate(args.parallel, port, args.seconds, new_connection_requests)
    fails += [f"parallel {t.failed} ({'; '.join(t.errors)})"] if t.failed else []
    out["pooled"], t = rate(args.pool, port, args.seconds, pooled_requests)
    fails += [f"pooled {t.failed} ({'; '.join(t.errors)})"] if t.failed else []
    out["rtt"], t = round_trips(port, args.rtt_count)
    fails += [f"rtt {t.failed} ({'; '.join(t.errors)})"] if t.failed else []
    out["failed"] = float(len(fails))
    print(
        f"{name:<22} new-conn {out['new-conn']:8.0f}/s  parallel {out['parallel']:8.0f}/s  "
        f"pooled {out['pooled']:8.0f}/s  rtt {out['rtt']:6.2f} ms  failed: {', '.join(fails) or 'none'}",
        flush=True,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per rate measurement")
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--pool", type=int, default=50)
    parser.add_argument("--rtt-count", type=int, default=500)
    parser.add_argument("--placement", default="isolated", choices=["isolated", "grouped"])
    args = parser.parse_args()
    owned = Owned()
    tmp = Path(tempfile.mkdtemp(prefix="links-bench-"))
    try:
        http_port = free_port()
        server = owned.popen([sys.executable, "-c", SERVER, str(http_port)])
        wait_port(http_port, server)
        base = free_port_run(3)
        rv_port, relay_port = base + 1, base + 2
        a, b = Agent(tmp / "a"), Agent(tmp / "b")
        a.make_id()
        b.make_id()
        cfg = tmp / "b.toml"
        cfg.write_text(f'[embedded]\nrendezvous_port = {rv_port}\nrelay_port = {relay_port}\nbind = "127.0.0.1"\n')
        target = f"127.0.0.1:{http_port}"
        b.up(owned, "--config", str(cfg), "--allow", a.peer_id, "--allow-target", target, "--placement", args.placement)
        key = (b.state / "server" / "id_ed25519.pub").read_text().strip()
        a.up(owned, "--server", f"127.0.0.1:{rv_port}", "--server-key", key, "--placement", args.placement)
        print(
            f"target: HTTP/1.1 on :{http_port}, 1 KiB page; agents up ({args.placement}); "
            f"{args.seconds:.0f} s per rate, {args.parallel} parallel, pool {args.pool}, {args.rtt_count} round trips",
            flush=True,
        )
        results: dict[str, dict[str, float]] = {}
        results["straight to the target"] = measure("straight to the target", http_port, args)
        with ssh_forward(owned, tmp, http_port) as port:
            results["ssh -L"] = measure("ssh -L (one connection)", port, args)
        for path in ("relay", "direct"):
            with pt_forward(owned, a, b.peer_id, http_port, path) as port:
                links = [x for x in a.ops("links")["links"] if x["state"] == "up"]
                on = links[-1]["path"] if links else "?"  # the newest: the one this forward brought up
                results[path] = measure(f"punchthrough ({on})", port, args)
        ssh, bare = results["ssh -L"], results["straight to the target"]
        print("\nratios (punchthrough / ssh -L; new connections also / straight to the target)")
        for path in ("relay", "direct"):
            r = results[path]
            new = f"{r['new-conn'] / ssh['new-conn']:5.2f}x ({r['new-conn'] / bare['new-conn']:.2f}x)"
            print(
                f"  {path:<7} new-conn {new}"
                f"  parallel {r['parallel'] / ssh['parallel']:5.2f}x ({r['parallel'] / bare['parallel']:.2f}x)"
                f"  pooled {r['pooled'] / ssh['pooled']:5.2f}x"
                f"  rtt {ssh['rtt'] / r['rtt']:5.2f}x (latency ssh/ours)"
            )
        for row in a.ops("links")["links"]:
            print(f"  link {row['id']} {row['path']} {row['state']}: {row['streams_total']} streams")
    finally:
        owned.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
