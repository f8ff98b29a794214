"""Real agents in NAT lab namespaces: a rendezvous+relay server on wan, one agent (own Ray) per host."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.common import ctlproto
from agent.runtime_paths import control_socket
from ops.natlab import Lab
from tests import placement

PT = [sys.executable, "-m", "agent.cli"]
OPS = [sys.executable, "-m", "ops.cli"]
SERVER = "198.51.100.1"
ECHO_PORT = 9000
HERE = Path(__file__).parent


class LabAgents:
    def __init__(self, lab: Lab, root: Path, placement: str | None = None) -> None:
        self.lab = lab
        self.root = root
        self.placement = placement
        """The agents' placement; None: the default flags (unless PUNCHTHROUGH_TEST_PLACEMENT forces one)."""
        self.key = ""
        self.ids: dict[str, str] = {}
        self.up_hosts: list[str] = []

    def state(self, host: str) -> Path:
        return self.root / host

    def start_server(self) -> None:
        proc = self.lab.popen(
            "wan",
            # default binds (0.0.0.0 and [::]) on a host whose service addresses are not on the
            # outgoing interface (ops/natlab_scenarios.py): UDP answers must leave from SERVER
            [*PT, "--state-dir", str(self.root / "srv"), "serve", "--port", "21116"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("key: "), f"server did not start: {line!r}"
        self.key = line.split()[1]

    def start_echo(self, host: str) -> str:
        proc = self.lab.popen(host, [sys.executable, str(HERE / "echo_server.py"), "127.0.0.1", str(ECHO_PORT)],
                              stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        return f"127.0.0.1:{ECHO_PORT}"

    def agent_id(self, host: str) -> str:
        out = self.lab.run(host, [*PT, "--state-dir", str(self.state(host)), "id", "--json"], capture_output=True)
        self.ids[host] = json.loads(out.stdout)["id"]
        return self.ids[host]

    def up(self, agents: dict[str, list[str]]) -> float:
        """Start the agents (host -> extra `up` flags) in parallel; seconds until all are registered."""
        started = time.monotonic()

        def one(host: str) -> None:
            out = self.lab.run(
                host,
                [*PT, "--state-dir", str(self.state(host)), "up", "--server", SERVER, "--server-key", self.key,
                 *placement.flags(self.placement), *agents[host]],
                capture_output=True,
                timeout=240,
            )
            assert out.returncode == 0, f"{host}: {out.stderr.decode()[-2000:]}"
            self.up_hosts.append(host)

        with ThreadPoolExecutor(len(agents)) as pool:
            for f in [pool.submit(one, h) for h in agents]:
                f.result()
        return time.monotonic() - started

    def pipe(self, host: str, peer: str, target: str, data: bytes, path: str = "", timeout: float = 120
             ) -> subprocess.CompletedProcess[bytes]:
        argv = [*PT, "--state-dir", str(self.state(host)), "pipe", peer, target]
        if path:
            argv += ["--path", path]
        return self.lab.run(host, argv, input=data, capture_output=True, timeout=timeout)

    def pipe_popen(self, host: str, peer: str, target: str, path: str = "") -> subprocess.Popen[bytes]:
        """`pipe` left running with stdin/stdout/stderr as pipes (the lab ends it on teardown)."""
        argv = [*PT, "--state-dir", str(self.state(host)), "pipe", peer, target]
        if path:
            argv += ["--path", path]
        return self.lab.popen(host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def control(self, host: str, what: str, timeout: float = 5.0) -> Any:
        """Ask the agent's coordinator directly (a path-named unix socket works across namespaces): what
        `punchthrough-ops WHAT --json` prints, without a process start per query; raises if it is down."""
        reply = ctlproto.call(control_socket(self.state(host)), {"op": what}, timeout=timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"{host}: {what}: {reply.get('error')}")
        return reply

    def actors(self, host: str) -> dict[str, dict[str, Any]]:
        """name -> the actor's row in `punchthrough-ops actors --json`."""
        return {a["name"]: a for a in self.ops(host, "actors")["actors"]}

    def ops(self, host: str, what: str) -> dict[str, Any]:
        """What `punchthrough-ops WHAT --json` prints, read from the control socket: tests that poll
        an agent while a transfer runs do not start a Python process per look (the CLI itself is
        run by `ops_cli` and tested in tests/integration/test_ops_cli.py)."""
        reply = dict(self.control(host, what, timeout=30))
        reply.pop("ok", None)
        return reply

    def ops_cli(self, host: str, what: str) -> Any:
        """`punchthrough-ops WHAT --json` run in the host's namespace, as a user runs it."""
        out = self.lab.run(host, [*OPS, "--state-dir", str(self.state(host)), what, "--json"], capture_output=True,
                           timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def down(self) -> None:
        def one(host: str) -> None:
            with contextlib.suppress(Exception):
                self.lab.run(host, [*PT, "--state-dir", str(self.state(host)), "down"], capture_output=True,
                             timeout=60)

        with ThreadPoolExecutor(max(1, len(self.up_hosts))) as pool:
            list(pool.map(one, self.up_hosts))
        self.up_hosts.clear()


def last_session(agents: LabAgents, host: str) -> dict[str, Any]:
    sessions = agents.ops(host, "sessions")["sessions"]
    mine = [s for s in sessions if s.get("role") == "initiator"]
    assert mine, sessions
    return dict(mine[-1])


def winner(session: dict[str, Any]) -> str:
    won = [a["strategy"] for a in session.get("attempts", []) if a["outcome"] == "won"]
    return won[0] if won else ""


def env_with_path() -> dict[str, str]:
    return dict(os.environ)
