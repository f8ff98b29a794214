"""The whole agent on real Ray, end to end: three agents (each with its own state dir and private
Ray head) and a rendezvous+relay server process, on loopback.

Covers issue 3's acceptance: `pipe` and `connect -L` move 100 MB with matching SHA-256 both ways;
wrong password, unlisted peer, changed key and disallowed target each fail with one clear line;
SIGKILL of every actor in turn and the agent serves again (status shows the restart); a restarted
rendezvous server sees the agents again. Times are printed, not asserted against tight bounds
(shared machines are noisy); the bounds below only catch a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.common import ctlproto
from agent.proto import rendezvous_pb2 as pb
from agent.runtime_paths import control_socket
from agent.wire import messages
from agent.wire.frames import FrameDecoder, encode_frame
from tests import placement

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]

PT = [sys.executable, "-m", "agent.cli"]
OPS = [sys.executable, "-m", "ops.cli"]
MB100 = 100 * 1024 * 1024


def free_triple() -> int:
    """A port P with P-1 and P+1 also free (rendezvous, NAT test, relay), TCP and UDP on every address.

    Picked below the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, 32768 and
    up by default): a free port from inside it can be taken by any outgoing connection between this
    check and the agent's bind (seen: the direct port, EADDRINUSE)."""
    low = _ephemeral_start()
    for _ in range(500):
        port = random.randrange(max(1100, low - 12000), max(1200, low - 1))
        ok = True
        for p in (port - 1, port, port + 1):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as t:
                    try:
                        t.bind(("0.0.0.0", p))
                    except OSError:
                        ok = False
        if ok:
            return port
    raise RuntimeError(f"no free port triple below {low}")


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # a test may reset the stream on purpose
            while data := self.request.recv(1 << 18):
                self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def pt(
    state: Path, *args: str, input: bytes | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*PT, "--state-dir", str(state), *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class Lab:
    def __init__(self, root: Path, placement: str = "isolated") -> None:
        self.root = root
        self.placement = placement
        self.port = free_triple()
        self.server = f"127.0.0.1:{self.port}"
        self.serve: subprocess.Popen[bytes] | None = None
        self.key = ""
        self.echo = _EchoServer(("127.0.0.1", 0), _Echo)
        threading.Thread(target=self.echo.serve_forever, daemon=True).start()
        self.target = f"127.0.0.1:{self.echo.server_address[1]}"
        self.dirs = {name: root / name for name in ("a", "b", "c")}
        self.ids: dict[str, str] = {}

    def start_server(self) -> None:
        self.serve = subprocess.Popen(
            [*PT, "--state-dir", str(self.root / "srv"), "serve", "--bind", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.serve.stdout is not None
        line = self.serve.stdout.readline().decode()
        assert line.startswith("key: "), line
        self.key = line.split()[1]

    def kill_server(self) -> None:
        assert self.serve is not None
        self.serve.kill()
        self.serve.wait()

    def up(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*PT, "--state-dir", str(self.dirs[name]), "up", "--server", self.server, "--server-key", self.key,
             *placement.flags(self.placement), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def ops(self, name: str, what: str, patience: float = 0.0) -> Any:
        """`punchthrough-ops WHAT --json`; `patience`: seconds to retry while the coordinator restarts."""
        deadline = time.monotonic() + patience
        while True:
            out = subprocess.run(
                [*OPS, "--state-dir", str(self.dirs[name]), what, "--json"], capture_output=True, timeout=30
            )
            if out.returncode == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def send_all_then_eof(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module", params=placement.for_module("isolated", "grouped"))
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("e2e"), request.param)
    lab.start_server()
    with ThreadPoolExecutor(len(lab.dirs)) as pool:  # each is a CLI start: side by side
        outs = dict(zip(lab.dirs, pool.map(lambda state: pt(state, "id", "--json"), lab.dirs.values()), strict=True))
    lab.ids.update({name: json.loads(out.stdout)["id"] for name, out in outs.items()})
    pw = lab.root / "b.password"
    pw.write_text("correct horse\n")
    started = time.monotonic()
    procs = [
        lab.up("b", "--allow", lab.ids["a"], "--allow-target", lab.target, "--password-file", str(pw)),
        lab.up("a"),
        # c only knocks with passwords: grouped whatever the module's placement (8 fewer worker processes
        # to start on 2 cores, ~3 s of this setup), and peers of different placements meet as deployed
        lab.up("c", *([] if placement.forced() else ["--placement", "grouped"])),
    ]
    try:
        for p in procs:
            _out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err.decode()
        print(f"\n3 agents up and registered ({lab.placement}) in {time.monotonic() - started:.1f}s")
        yield lab
    finally:
        def down(state: Path) -> None:
            with contextlib.suppress(Exception):
                pt(state, "down", timeout=60)

        with ThreadPoolExecutor(len(lab.dirs)) as pool:
            list(pool.map(down, lab.dirs.values()))
        with contextlib.suppress(Exception):
            lab.kill_server()
        lab.echo.shutdown()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pipe_100mb_both_ways(lab: Lab) -> None:
    payload = os.urandom(MB100)
    started = time.monotonic()
    out = pt(lab.dirs["a"], "pipe", lab.ids["b"], lab.target, input=payload, timeout=300)
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert sha(out.stdout) == sha(payload)
    print(f"\npipe: 100 MiB each way (LAN path on loopback) in {took:.1f}s ({2 * 100 / took:.0f} MiB/s total)")


def test_forward_100mb_both_ways_and_concurrent(lab: Lab) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local_port = s.getsockname()[1]
    fwd = subprocess.Popen(
        [
            *PT,
            "--state-dir",
            str(lab.dirs["a"]),
            "connect",
            lab.ids["b"],
            "--path",
            "relay",
            "-L",
            f"127.0.0.1:{local_port}:{lab.target}",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        assert fwd.stderr is not None
        assert b"forwarding" in fwd.stderr.readline()

        def transfer(size: int) -> bool:
            data = os.urandom(size)
            with socket.create_connection(("127.0.0.1", local_port), timeout=60) as c:
                sender = threading.Thread(target=send_all_then_eof, args=(c, data))
                sender.start()
                got = bytearray()
                while chunk := c.recv(1 << 18):
                    got += chunk
                sender.join()
            return sha(bytes(got)) == sha(data)

        started = time.monotonic()
        assert transfer(MB100)
        print(f"\n-L over the relay: 100 MiB each way in {time.monotonic() - started:.1f}s")
        results: list[bool] = []
        threads = [threading.Thread(target=lambda: results.append(transfer(2_000_000))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [True] * 8
    finally:
        fwd.send_signal(signal.SIGINT)
        fwd.wait(10)


def test_forward_is_accepted_in_the_agent_reports_refusals_here_and_ends_with_the_client(lab: Lab) -> None:
    """`connect -L` hands its port to the agent (agent/session/forwards.py): a refused connection is
    still reported by the client, one line, and the port closes when the client goes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local_port = s.getsockname()[1]
    fwd = subprocess.Popen(
        [*PT, "--state-dir", str(lab.dirs["a"]), "connect", lab.ids["b"], "-L", f"{local_port}:127.0.0.1:9"],
        stderr=subprocess.PIPE,
    )
    try:
        assert fwd.stderr is not None
        assert b"forwarding" in fwd.stderr.readline()
        fwd.send_signal(signal.SIGSTOP)  # the agent accepts and answers without the client's help
        try:
            with socket.create_connection(("127.0.0.1", local_port), timeout=20) as c:
                c.sendall(b"hello")
                with contextlib.suppress(ConnectionResetError):
                    assert c.recv(100) == b""  # refused by B: nothing served
        finally:
            fwd.send_signal(signal.SIGCONT)
        line = fwd.stderr.readline().decode()
        assert line.startswith("punchthrough: ") and "not allowed" in line, line
    finally:
        fwd.send_signal(signal.SIGINT)
        fwd.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the agent's copy of the port closes once it sees the client gone
        try:
            socket.create_connection(("127.0.0.1", local_port), timeout=2).close()
        except ConnectionRefusedError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the agent still accepts on the port after the client ended")


def _one_line_failure(out: subprocess.CompletedProcess[bytes], expect: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("punchthrough: "), lines
    assert expect in lines[0], lines[0]


def test_disallowed_target(lab: Lab) -> None:
    _one_line_failure(pt(lab.dirs["a"], "pipe", lab.ids["b"], "127.0.0.1:9", input=b""), "not allowed")


def test_unlisted_peer_and_passwords(lab: Lab) -> None:
    c, b = lab.dirs["c"], lab.ids["b"]
    _one_line_failure(pt(c, "pipe", b, lab.target, input=b""), "password required")
    _one_line_failure(pt(c, "pipe", b, lab.target, input=b"", env={"PUNCHTHROUGH_PASSWORD": "wrong"}), "wrong password")
    ok = pt(c, "pipe", b, lab.target, input=b"hello", env={"PUNCHTHROUGH_PASSWORD": "correct horse"})
    assert ok.returncode == 0 and ok.stdout == b"hello", ok.stderr


def test_changed_peer_key_refused(lab: Lab) -> None:
    pins = lab.dirs["a"] / "known_peers.json"
    original = pins.read_text()
    forged = json.loads(original)
    forged[lab.ids["b"]] = "A" * 43 + "="  # a different 32-byte key pinned for B
    pins.write_text(json.dumps(forged))
    try:
        _one_line_failure(pt(lab.dirs["a"], "pipe", lab.ids["b"], lab.target, input=b""), "pinned")
    finally:
        pins.write_text(original)


def _pipe_works(lab: Lab, deadline: float) -> float:
    started = time.monotonic()
    errors: list[str] = []
    while time.monotonic() - started < deadline:
        out = pt(lab.dirs["a"], "pipe", lab.ids["b"], lab.target, input=b"ping", timeout=30)
        if out.returncode == 0 and out.stdout == b"ping":
            if errors:
                print(f"  ({len(errors)} failed tries first, last: {errors[-1]})")
            return time.monotonic() - started
        errors.append(out.stderr.decode().strip())
        time.sleep(0.1)
    raise AssertionError(f"no working session within {deadline}s: {out.stderr.decode()}")


@pytest.mark.parametrize("side", ["a", "b"])
def test_sigkill_each_actor(lab: Lab, side: str) -> None:
    """Every actor in turn (each component alone when isolated, each group when grouped): the agent
    serves again, and every component the actor carried shows the new pid and one more restart."""
    rows = lab.ops(side, "actors")["actors"]
    assert {r["name"] for r in rows} >= {"coordinator", "registrar", "nat_probe", "relay", "sessions"}
    before = {r["name"]: r for r in rows}
    for actor, pid, kinds in placement.kill_plan(rows, spare=set()):
        os.kill(pid, signal.SIGKILL)
        took = _pipe_works(lab, 30)
        print(f"\nagent {side}: actor {actor} ({', '.join(kinds)}) killed, serving again after {took:.2f}s")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            # A stream on the running link works before a killed coordinator is back: ask it patiently.
            now = {a["name"]: a for a in lab.ops(side, "actors", patience=10)["actors"]}
            if all(now[k]["pid"] != pid and now[k]["state"] == "alive" for k in kinds):
                break
            time.sleep(0.2)
        for kind in kinds:
            assert now[kind]["restarts"] >= before[kind]["restarts"] + 1, now[kind]
            assert now[kind]["pid"] != pid and now[kind]["actor"] == actor, now[kind]


def _online(port: int, peer: str) -> bool:
    with socket.create_connection(("127.0.0.1", port - 1), timeout=3) as s:
        s.sendall(encode_frame(messages.build(online_request=pb.OnlineRequest(id="probe", peers=[peer]))))
        dec = FrameDecoder()
        while not (frames := dec.feed(s.recv(4096))):
            pass
    kind, msg = messages.parse(frames[0])
    return kind == "online_response" and bool(msg.states) and bool(msg.states[0] & 0x80)


def _slow_pipe(lab: Lab, payload_file: Path, seconds: float) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """`pipe` over the relay fed by a writer that spreads the payload over `seconds`."""
    feeder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            f"d = open({str(payload_file)!r}, 'rb').read(); n = 64; step = len(d) // n\n"
            "for i in range(n):\n"
            "    sys.stdout.buffer.write(d[i * step:(i + 1) * step if i < n - 1 else len(d)]); sys.stdout.flush()\n"
            f"    time.sleep({seconds / 64})\n",
        ],
        stdout=subprocess.PIPE,
    )
    pipe = subprocess.Popen(
        [*PT, "--state-dir", str(lab.dirs["a"]), "pipe", lab.ids["b"], lab.target, "--path", "relay-only"],
        stdin=feeder.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert feeder.stdout is not None
    feeder.stdout.close()
    deadline = time.monotonic() + 20
    while pipe.poll() is None and time.monotonic() < deadline:  # the stream is open (not still opening)
        if any(s["state"] == "open" and s["bytes_out"] for s in lab.ops("a", "sessions")["sessions"]):
            break
        time.sleep(0.1)
    return feeder, pipe


def test_transfer_survives_killing_every_other_actor(lab: Lab, tmp_path: Path) -> None:
    """Only the session owner (and the KCP pump, for KCP sessions) carries session bytes: killing any
    other actor on either side while a transfer runs leaves the transfer intact."""
    payload = os.urandom(16 * 1024 * 1024)
    src = tmp_path / "payload"
    src.write_bytes(payload)
    feeder, pipe = _slow_pipe(lab, src, 6.0)
    killed = []
    spared = {"sessions", "udp_punch", "servers"}
    time.sleep(1.0)
    for side in ("a", "b"):
        plan = placement.kill_plan(lab.ops(side, "actors")["actors"], spared)
        assert plan, f"{side}: every actor carries a session's bytes"
        for actor, pid, _kinds in plan:
            if pipe.poll() is None:
                os.kill(pid, signal.SIGKILL)
                killed.append(f"{side}:{actor}")
                time.sleep(0.2)
    out, err = pipe.communicate(timeout=120)
    feeder.wait(10)
    print(f"\nkilled during the transfer ({lab.placement}): {', '.join(killed)}")
    assert pipe.returncode == 0, err.decode()
    assert sha(out) == sha(payload)
    assert len(killed) >= (10 if lab.placement == "isolated" else 2)
    _pipe_works(lab, 30)  # and everything came back


def test_killing_the_session_owner_ends_only_its_session_clearly(lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(os.urandom(8 * 1024 * 1024))
    feeder, pipe = _slow_pipe(lab, src, 20.0)
    time.sleep(1.5)
    owner = next(a for a in lab.ops("a", "actors")["actors"] if a["name"] == "sessions")
    os.kill(owner["pid"], signal.SIGKILL)
    _out, err = pipe.communicate(timeout=60)
    feeder.kill()
    feeder.wait(10)
    lines = err.decode().strip().splitlines()
    print(f"\nsession owner killed: pipe exit {pipe.returncode}: {lines}")
    assert pipe.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("punchthrough: stream to "), lines
    _pipe_works(lab, 30)  # the restarted owner serves new sessions


def test_rendezvous_restart_reregisters(lab: Lab) -> None:
    assert _online(lab.port, lab.ids["b"])
    lab.kill_server()
    lab.start_server()
    started = time.monotonic()
    while not (_online(lab.port, lab.ids["a"]) and _online(lab.port, lab.ids["b"])):
        assert time.monotonic() - started < 30, "agents did not re-register"
        time.sleep(0.1)
    print(f"\nrendezvous restarted: both agents registered again after {time.monotonic() - started:.2f}s")
    _pipe_works(lab, 10)


def test_status_tables(lab: Lab) -> None:
    st = lab.ops("a", "status")
    assert st["id"] == lab.ids["a"] and st["registration"]["state"] == "registered"
    assert st["nat"]["nat_name"] in ("ASYMMETRIC", "SYMMETRIC", "UNKNOWN_NAT")
    sessions = lab.ops("a", "sessions")["sessions"]
    assert any(any(a["outcome"] == "won" for a in s["attempts"]) for s in sessions)
    text = subprocess.run([*OPS, "--state-dir", str(lab.dirs["a"]), "actors"], capture_output=True, timeout=30)
    assert b"coordinator" in text.stdout and b"RESTARTS" in text.stdout
    assert control_socket(lab.dirs["a"]).exists()
    assert ctlproto.call(control_socket(lab.dirs["a"]), {"op": "nonsense"})["ok"] is False
