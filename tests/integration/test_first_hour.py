"""Issue 10's friction points, each reproduced with the real CLIs and agents, as a newcomer meets them.

B runs the agent with its embedded servers (what the README's first command does), A points at it
with the key B printed, the way the README's second machine does; everything goes through the
`punchthrough` and `punchthrough-ops` commands a user types. The two-namespace version of the
same setup (whose winning path must not be the relay) is tests/natlab/test_readme_setup.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from agent.runner import running_pid
from agent.runtime_paths import calls_dir
from tests.agent_fixtures import b64
from tests.integration.test_agent_e2e import OPS, PT, _Echo, _EchoServer, free_triple, pt

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@dataclass
class Hour:
    root: Path
    port: int
    target: str
    b: Path
    a: Path
    b_out: str = ""
    a_out: str = ""
    ids: dict[str, str] = field(default_factory=dict)
    specs: dict[str, str] = field(default_factory=dict)
    server_key: str = ""
    a_proc: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ops(self, state: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*OPS, "--state-dir", str(state), *args], capture_output=True, timeout=60)

    def ops_json(self, state: Path, *args: str) -> Any:
        out = self.ops(state, *args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def pipe(self, data: bytes = b"hello\n") -> subprocess.CompletedProcess[bytes]:
        return pt(self.a, "pipe", self.ids["b"], self.target, input=data, timeout=60)


def one_line(out: subprocess.CompletedProcess[bytes]) -> str:
    err = out.stderr.decode()
    assert out.returncode != 0 and err.count("\n") == 1, (out.returncode, err)
    return err.strip()


def start_foreground(state: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """`up --foreground`: what it prints up to its "is up" line (the line `up` prints, foreground too)."""
    proc = subprocess.Popen(
        [*PT, "--state-dir", str(state), "up", "--foreground", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    threading.Thread(target=collect, args=(proc, FOREGROUND_OUTPUT.setdefault(state, [])), daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and "is up" not in foreground_output(state):
        time.sleep(0.2)
    time.sleep(0.5)  # the rest of the report comes with the "is up" line
    return proc, foreground_output(state)


FOREGROUND_OUTPUT: dict[Path, list[str]] = {}


def collect(proc: subprocess.Popen[bytes], into: list[str]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        into.append(raw.decode(errors="replace"))


def foreground_output(state: Path) -> str:
    return "".join(FOREGROUND_OUTPUT.get(state, []))


@pytest.fixture(scope="module")
def hour(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hour]:
    root = tmp_path_factory.mktemp("hour")
    echo = _EchoServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    port = free_triple()
    h = Hour(root, port, f"127.0.0.1:{echo.server_address[1]}", root / "b", root / "a")
    config = root / "b.toml"
    config.write_text(f'[embedded]\nrendezvous_port = {port}\nrelay_port = {port + 1}\nbind = "127.0.0.1"\n')
    try:
        out = pt(h.b, "up", "--config", str(config), "--allow-target", h.target, timeout=180)
        h.b_out = out.stdout.decode()
        assert out.returncode == 0, out.stderr.decode()
        h.server_key = re.search(r"--server-key (\S+)", h.b_out).group(1)  # type: ignore[union-attr]
        for name, state in (("a", h.a), ("b", h.b)):
            spec = pt(state, "id").stdout.decode().strip()
            h.specs[name], h.ids[name] = spec, spec.split("=")[0]
        h.a_proc, h.a_out = start_foreground(h.a, "--server", h.server, "--server-key", h.server_key)
        assert h.a_proc.poll() is None, h.a_out
        yield h
    finally:
        if h.a_proc is not None and h.a_proc.poll() is None:
            h.a_proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.a_proc.wait(60)
        with contextlib.suppress(Exception):
            pt(h.b, "down", timeout=60)
        echo.shutdown()


def test_up_says_what_peers_need_and_that_nobody_can_get_in_yet(hour: Hour) -> None:
    """B's `up` used to print only "registered": not its peer spec, not its server key, not that it
    admits nobody. Foreground `up` printed nothing at all."""
    b = hour.b_out
    assert f"peers allow this agent as {hour.specs['b']}" in b
    assert re.search(rf"up --server \S+:{hour.port} --server-key {re.escape(hour.server_key)}", b), b
    assert "no peer may connect to this agent yet" in b and "punchthrough allow ID=SHA256:" in b
    assert json.loads(pt(hour.b, "id", "--json").stdout)["embedded_server_key"] == hour.server_key
    a = hour.a_out
    assert f"punchthrough agent {hour.ids['a']} is up" in a and "registration: registered" in a
    assert "trusting" not in a  # the key was given, so nothing is trusted on first use


def test_a_refused_peer_hears_why_and_the_fix_at_once(hour: Hour) -> None:
    """Was: `relay: peer closed the connection during the handshake` after 6.3 s."""
    started = time.monotonic()
    err = one_line(hour.pipe())
    took = time.monotonic() - started
    assert "this agent admits nobody yet" in err
    assert f"on {hour.ids['b']}, run `punchthrough allow {hour.specs['a']}`" in err
    print(f"\nrefusal reached A in {took:.2f}s: {err}")
    log = (hour.b / "logs" / "coordinator.log").read_text()
    assert "ignored a" in log and hour.ids["a"] in log


def test_allow_and_revoke_act_on_the_running_agent(hour: Hour) -> None:
    """No restart: `allow` admits A at its next session, `revoke` turns it away again."""
    pid = running_pid(hour.b)
    out = pt(hour.b, "allow", hour.specs["a"])
    assert out.returncode == 0 and b"a running agent admits it from its next session" in out.stdout
    out = hour.pipe(b"first byte\n")
    assert (out.returncode, out.stdout) == (0, b"first byte\n"), out.stderr
    assert pt(hour.b, "revoke", hour.ids["a"]).returncode == 0
    err = one_line(hour.pipe())
    assert f"admits nobody yet: on {hour.ids['b']}, run `punchthrough allow {hour.specs['a']}`" in err
    typo = hour.ids["a"][:-1] + str((int(hour.ids["a"][-1]) + 1) % 10)  # the walk-through's wrong digit
    assert pt(hour.b, "allow", typo + "=" + hour.specs["a"].split("=", 1)[1]).returncode == 0
    err = one_line(hour.pipe())
    assert "is not on this agent's allow list" in err and f"(its key is allowed here as {typo}: a typo" in err
    assert pt(hour.b, "revoke", typo).returncode == 0
    assert pt(hour.b, "allow", hour.specs["a"]).returncode == 0
    assert running_pid(hour.b) == pid
    peers = json.loads(pt(hour.b, "peers", "--json").stdout)
    assert next(p for p in peers if p["id"] == hour.ids["a"])["allowed"] == "by key"


def test_ping_reports_path_and_round_trips(hour: Hour) -> None:
    pt(hour.b, "allow", hour.specs["a"])
    result = hour.ops_json(hour.a, "ping", hour.ids["b"], "-c", "3")
    assert result["direct"] and result["path"] != "relay" and len(result["rtt_ms"]) == 3
    words = hour.ops(hour.a, "ping", hour.ids["b"], "-c", "1")
    assert words.returncode == 0 and f"pong from {hour.ids['b']} via" in words.stdout.decode()
    print(f"\nping: {result}")


def test_sessions_rows_and_counts_tell_the_truth(hour: Hour) -> None:
    """B kept two `failed` rows per session it answered; status counted other things than the table."""
    pt(hour.b, "allow", hour.specs["a"])
    before = hour.ops_json(hour.b, "sessions")["sessions"]
    for _ in range(2):
        assert hour.pipe().returncode == 0
    time.sleep(3)  # B's losing LAN answer times out (2 s) and must fold into its session
    rows = hour.ops_json(hour.b, "sessions")["sessions"]
    new = [r for r in rows if r["id"] not in {b["id"] for b in before}]
    assert [r["state"] for r in new] == ["done", "done"], new
    status = hour.ops_json(hour.b, "status")
    assert status["sessions_total"] == len(rows)
    a_rows = hour.ops_json(hour.a, "sessions")["sessions"]
    for row in a_rows:
        for attempt in row["attempts"]:
            if row["state"] == "failed":
                assert attempt["reason"] != "another path won first", row
    peers = {p["id"]: p for p in status["peers"]}
    assert peers[hour.ids["a"]]["allowed"] == "by key"


def test_netcheck_in_words(hour: Hour) -> None:
    out = hour.ops(hour.a, "netcheck")
    fields = {line[:14].strip(): line[14:] for line in out.stdout.decode().splitlines()}
    assert out.returncode == 0 and fields["UDP"].startswith("works")
    assert fields["mapping"].startswith("endpoint-independent")
    assert fields["udp mapping"].startswith("endpoint-independent (one public port per socket: a cone); the local")
    assert fields["filtering"].startswith("open: a reply from a port we never sent to gets in")
    assert fields["public IP"].startswith("127.0.0.1 (the server is on this host")
    assert re.fullmatch(rf"{hour.server}  TCP handshake \d+\.\d ms", fields["server"]), fields["server"]
    assert re.fullmatch(rf"127\.0\.0\.1:{hour.port + 1}  TCP handshake \d+\.\d ms", fields["relay"]), fields


def test_up_with_a_wrong_server_key_fails_and_names_both_keys(hour: Hour) -> None:
    """Was: exit 0 and "registered"; the mismatch showed only at connect time. Now `up` checks the
    server's signature before it starts anything, and leaves no agent and no config behind."""
    wrong = b64(bytes(SigningKey.generate().verify_key))
    started = time.monotonic()
    out = pt(hour.root / "c", "up", "--server", hour.server, "--server-key", wrong, timeout=120)
    err = one_line(out)
    assert "signs with key SHA256:" in err and "not the trusted SHA256:" in err and "--server-key" in err
    assert running_pid(hour.root / "c") is None and not (hour.root / "c" / "config.toml").exists()
    print(f"\nwrong key: `up` failed after {time.monotonic() - started:.1f}s: {err}")


def test_up_with_an_unreachable_server_fails(hour: Hour) -> None:
    """Was: 25 s of waiting, "registration: unreachable", exit 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    started = time.monotonic()
    out = pt(hour.root / "d", "up", "--server", f"127.0.0.1:{dead}", timeout=120)
    err = one_line(out)
    assert f"rendezvous server 127.0.0.1:{dead} does not answer" in err and "UDP port" in err
    assert running_pid(hour.root / "d") is None
    print(f"\nunreachable server: `up` failed after {time.monotonic() - started:.1f}s")


def test_down_is_quiet_clean_and_idempotent(hour: Hour) -> None:
    """Last: stops A (foreground, SIGTERM as Ctrl-C would) and B; no stack trace in the logs."""
    assert hour.a_proc is not None
    hour.a_proc.send_signal(signal.SIGTERM)
    assert hour.a_proc.wait(60) == 0
    out = pt(hour.b, "down", timeout=60)
    assert out.returncode == 0 and b"stopped" in out.stdout
    again = pt(hour.b, "down", timeout=60)
    assert (again.returncode, again.stdout, again.stderr) == (0, b"", b"")
    for log in (foreground_output(hour.a), (hour.b / "logs" / "agent.log").read_text()):
        assert "Traceback" not in log, log[-2000:]
    for state in (hour.a, hour.b):  # the actors' direct-call sockets go with them
        assert not calls_dir(state).exists(), list(calls_dir(state).iterdir())
