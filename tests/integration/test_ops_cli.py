"""Both CLIs against a real control socket: canned agent replies render as tables and stable JSON;
dead, wrong or hostile sockets end in one line on stderr.

The "agent" here is a real agent.common.ctlproto.ControlServer with a canned handler (no Ray,
no actors), at the path the CLIs derive from --state-dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent import cli
from agent.common import ctlproto
from agent.common.ctlproto import ControlServer
from agent.runtime_paths import control_socket
from ops import cli as ops_cli

NOW = time.time()

STATUS: dict[str, Any] = {
    "ok": True,
    "id": "1234567890",
    "fingerprint": "SHA256:q0PmJ0bLd1rQ6w5o0fTj3g2xXq8oXlqKk1Ue2xJb3aY",
    "server": "127.0.0.1:21116",
    "embedded": True,
    "registration": {"state": "registered", "last_reply_age": 1.5, "id": "1234567890"},
    "nat": {"nat_type": 1, "nat_name": "ASYMMETRIC", "measured_at": NOW - 30, "error": "", "port1": 40001},
    "sessions_active": 1,
    "sessions_total": 3,
    "pushes": {"punch": 2},
    "pushes_refused": {"not admitted": 1},
    "server_key": "SHA256:kkkkJ0bLd1rQ6w5o0fTj3g2xXq8oXlqKk1Ue2xJb3aY",
    "peer_spec": "1234567890=SHA256:q0PmJ0bLd1rQ6w5o0fTj3g2xXq8oXlqKk1Ue2xJb3aY",
    "uptime": 4000.0,
    "version": "0.1.0",
}
ACTORS: dict[str, Any] = {
    "ok": True,
    "actors": [
        {
            "name": "coordinator",
            "pid": 4242,
            "state": "alive",
            "restarts": 0,
            "cpu_percent": 1.5,
            "rss": 50 * 1024 * 1024,
            "since": 12.0,
        },
        {
            "name": "registrar",
            "pid": 4243,
            "state": "dead",
            "restarts": 2,
            "cpu_percent": 0.0,
            "rss": 512,
            "since": 3.0,
        },
    ],
}
SESSIONS: dict[str, Any] = {
    "ok": True,
    "sessions": [
        {
            "id": "s-1",
            "role": "initiator",
            "peer": "2345678901",
            "target": "127.0.0.1:22",
            "path": "relay",
            "state": "open",
            "error": "",
            "admitted_by": "rendezvous-signed",
            "peer_key": "SHA256:bbbbJ0bLd1rQ6w5o0fTj3g2xXq8oXlqKk1Ue2xJb3aY",
            "id_verified": True,
            "bytes_out": 2048,
            "bytes_in": 3 * 1024**3,
            "age": 5.0,
            "attempts": [
                {"strategy": "direct_tcp", "outcome": "failed", "reason": "timed out", "elapsed_ms": 1000.0},
                {"strategy": "relay", "outcome": "ok", "reason": "", "elapsed_ms": 30.0},
            ],
        },
        {"id": "s-2", "peer": "3456789012", "role": "responder", "state": "failed", "attempts": []},
        {
            "id": "s-3",
            "peer": "4567890123",
            "role": "responder",
            "state": "failed",
            "path": "relay",
            "admitted_by": "",
            "peer_key": "SHA256:ccccJ0bLd1rQ6w5o0fTj3g2xXq8oXlqKk1Ue2xJb3aY",
            "id_verified": False,
            "error": "peer 4567890123 is not allowed (not listed, no password set)",
            "attempts": [],
        },
    ],
}
LINKS: dict[str, Any] = {
    "ok": True,
    "links": [
        {
            "id": "5b56402e",
            "role": "dialer",
            "peer": "2345678901",
            "peer_key": "SHA256:bbbbJ0bLd1rQ6w5o0fTj3g2xXq8oXlqKk1Ue2xJb3aY",
            "path": "tcp_punch",
            "state": "up",
            "error": "",
            "admitted_by": "rendezvous-signed",
            "streams": 3,
            "streams_total": 41,
            "bytes_out": 4096,
            "bytes_in": 2 * 1024**2,
            "age": 300.0,
            "history": [
                {"at": NOW - 300, "path": "relay", "why": "won the race"},
                {"at": NOW - 290, "path": "tcp_punch", "why": "direct path authenticated"},
            ],
        },
        {
            "id": "0a1b2c3d",
            "role": "acceptor",
            "peer": "3456789012",
            "path": "relay",
            "state": "failed",
            "error": "link to the peer lost: cut",
            "history": [],
        },
    ],
}
NETCHECK: dict[str, Any] = {
    "ok": True,
    "nat": {
        "nat_type": 2,
        "nat_name": "SYMMETRIC",
        "port1": 40001,
        "port2": 40009,
        "local_tcp_port": 5000,
        "udp_mapped_port": 41000,
        "udp_local_port": 6000,
        "measured_at": NOW,
        "error": "",
        "udp_error": "",
        "public_ip": "198.51.100.7",
        "udp_public_ip": "198.51.100.7",
        "server_rtt_ms": 12.25,
    },
    "server": "198.51.100.1:21116",
    "relay": {"address": "198.51.100.1:21117", "rtt_ms": None, "error": "connection refused"},
    "addresses": ["10.0.0.2", "2001:db8::2"],
}
CANNED = {
    "status": STATUS,
    "actors": ACTORS,
    "sessions": SESSIONS,
    "links": LINKS,
    "netcheck": NETCHECK,
    "ping": {"ok": True, "id": "1234567890"},
}

Main = Callable[[Sequence[str] | None], int]


class CannedAgent:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.replies: dict[str, Any] = copy.deepcopy(CANNED)
        self.requests: list[Any] = []
        self.server = ControlServer(control_socket(state_dir), self._handle)
        self._tasks: set[asyncio.Task[None]] = set()

    async def _handle(self, req: Any, fds: list[int]) -> Any:
        self.requests.append(req)
        if req.get("op") == "open" and len(fds) == 1:
            return await self._open(req, fds[0])
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        return self.replies.get(req.get("op"), {"ok": False, "error": f"unknown request {req.get('op')!r}"})

    async def _open(self, req: dict[str, Any], fd: int) -> Any:
        reply = self.replies.get("open", {"ok": True, "session": "s-9"})
        sock = socket.socket(fileno=fd)
        if not reply.get("ok"):
            sock.close()
            return reply
        sock.setblocking(False)
        if self.replies.get("open_closes"):
            sock.close()  # an agent whose peer does not echo an empty target
            return reply

        async def echo_upper() -> None:
            """The target's answer (upper case); with no target, the peer's echo as it is."""
            loop = asyncio.get_running_loop()
            try:
                while data := await loop.sock_recv(sock, 65536):
                    await loop.sock_sendall(sock, data.upper() if req.get("target") else data)
            finally:
                sock.close()

        task = asyncio.get_running_loop().create_task(echo_upper())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return reply

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.server.close()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[CannedAgent]:
    canned = CannedAgent(tmp_path / "st")
    await canned.server.start()
    yield canned
    await canned.close()


async def run(main: Main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, prog: str) -> str:
    assert rc in (1, 2), (rc, err)
    assert err.endswith("\n") and err.count("\n") == 1, f"want one line on stderr, got {err!r}"
    assert err.startswith(prog + ": ")
    return err.strip()


# ---- rendering ---------------------------------------------------------------------------------------


async def test_status_table(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "status"], capsys)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    heads = ["id", "server", "registration", "nat", "sessions", "pushes", "uptime"]
    assert [line.split()[0] for line in lines] == heads
    assert lines[0] == f"id            {STATUS['peer_spec']}"
    assert lines[1] == f"server        127.0.0.1:21116  (embedded)  key {STATUS['server_key']}"
    assert lines[2] == "registration  registered  last reply 1.5s ago"
    # NOW is taken at import: in a long suite run the age may have grown past a minute
    pattern = r"nat           endpoint-independent mapping \[RustDesk: ASYMMETRIC\]  measured \d+(\.\d)?[smh] ago"
    assert re.fullmatch(pattern, lines[3]), lines[3]
    assert lines[4] == "sessions      1 active, 3 total"
    assert lines[5] == "pushes        2 received, 1 refused (a peer this agent does not admit)"
    assert lines[6] == "uptime        67m"
    assert agent.requests == [{"op": "status"}]


PEERS = [
    {
        "id": "2345678901",
        "allowed": "by key",
        "key": "SHA256:bbbbJ0bLd1rQ6w5o0fTj3g2xXq8oXlqKk1Ue2xJb3aY",
        "pinned": True,
        "last_seen": NOW - 300,
        "last_path": "tcp_punch",
        "active": 2,
        "paths": ["relay", "tcp_punch"],
    },
    {"id": "3456789012", "allowed": "by ID", "key": "", "pinned": False, "last_seen": NOW - 600, "last_path": "lan"},
    {"id": "4567890123", "allowed": "by key", "key": "SHA256:cccc", "pinned": False, "last_seen": None},
]


async def test_status_shows_peers_like_tailscale_status(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["status"] = dict(STATUS, peers=PEERS)
    rc, out, _ = await run(ops_cli.main, ["status", "--state-dir", str(agent.state_dir)], capsys)
    table = out.split("\n\n", 1)[1].splitlines()
    assert rc == 0 and table[0].split() == ["PEER", "KEY", "ALLOWED", "IN", "NOW"]
    assert table[1].split(None, 4) == [
        "2345678901",
        "SHA256:bbbbJ0bLd1r...",
        "by",
        "key",
        "active: 2 sessions via relay, tcp_punch",
    ]
    assert re.search(r"3456789012\s+-\s+by ID\s+idle, last seen \d+m ago via lan$", table[2]), table[2]
    assert table[3].endswith("never seen")
    agent.replies["status"] = dict(STATUS, peers=[])
    rc, out, _ = await run(ops_cli.main, ["status", "--state-dir", str(agent.state_dir)], capsys)
    assert out.rstrip().endswith("`punchthrough-ops ping ID` tries one)")


async def test_status_says_when_the_server_stopped_answering(
    agent: CannedAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    """Registered a moment ago, but the last heartbeat has had no answer: say so before it turns unreachable."""
    agent.replies["status"] = dict(STATUS, registration=dict(STATUS["registration"], unanswered_for=4.5))
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "status"], capsys)
    assert rc == 0
    assert "registration  registered  last reply 1.5s ago  (no answer for 4.5s: the server may be down)" in out


async def test_ping_times_round_trips_through_a_session(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["open"] = {"ok": True, "session": "s-9", "path": "tcp_punch", "elapsed_ms": 12.5}
    rc, out, err = await run(
        ops_cli.main, ["ping", "2345678901", "-c", "2", "--state-dir", str(agent.state_dir)], capsys
    )
    assert rc == 0, err
    lines = out.splitlines()
    assert re.fullmatch(r"session to 2345678901 via tcp_punch \(direct\) in \d+\.\d ms", lines[0]), lines[0]
    assert re.fullmatch(r"pong from 2345678901 via tcp_punch: seq=1 time=\d+\.\d\d ms", lines[2]), lines[2]
    assert lines[3].startswith("2 pings, round trip min/avg/max = ")
    assert agent.requests[0] == {"op": "open", "peer": "2345678901", "target": "", "policy": "", "password": None}
    agent.replies["open"] = {"ok": True, "session": "s-10", "path": "relay"}
    rc, out, _ = await run(ops_cli.main, ["--json", "--state-dir", str(agent.state_dir), "ping", "2345678901"], capsys)
    result = json.loads(out)
    assert rc == 0 and (result["path"], result["direct"], len(result["rtt_ms"])) == ("relay", False, 3)


@pytest.mark.parametrize(
    ("argv", "replies", "wanted"),
    [
        (["-c", "0"], {}, "must be within 1-1000"),
        (["-c", "x"], {}, "not a number"),
        (["--timeout", "nan"], {}, "must be within 0-3600 seconds"),
        (["--timeout", "-1"], {}, "must be within 0-3600 seconds"),
        ([], {"open": {"ok": False, "error": "peer 2345678901 is not registered"}}, "cannot reach 2345678901: peer"),
        ([], {"open": {"ok": True, "path": "lan"}, "open_closes": True}, "closed the session after 0 of 3 pings"),
    ],
)
async def test_ping_failures_are_one_line(
    agent: CannedAgent, capsys: pytest.CaptureFixture[str], argv: list[str], replies: dict[str, Any], wanted: str
) -> None:
    agent.replies.update(replies)
    rc, _, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "ping", "2345678901", *argv], capsys)
    assert wanted in one_line_error(rc, err, "punchthrough-ops")


async def test_ping_without_an_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = await run(ops_cli.main, ["ping", "2345678901", "--state-dir", str(tmp_path)], capsys)
    assert "no agent running" in one_line_error(rc, err, "punchthrough-ops")


async def test_status_table_sparse_reply(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """An agent that is still starting has no registration, no NAT verdict: placeholders, not errors."""
    agent.replies["status"] = {"ok": True, "id": "1234567890", "nat": None}
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "status"], capsys)
    assert rc == 0
    assert "registration  -  last reply - ago" in out and "nat           unknown" in out
    assert "0 active, 0 total" in out and "uptime        -" in out


async def test_status_nat_error_is_shown(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["status"] = dict(STATUS, nat={"nat_name": "UNKNOWN_NAT", "error": "nat test port unreachable"})
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "status"], capsys)
    assert rc == 0 and "UNKNOWN_NAT  error: nat test port unreachable" in out


async def test_actors_table(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "actors"], capsys)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "placement: ?, 2 actors"  # an agent from before placements: says nothing of one
    rows = [line.split() for line in lines[1:]]
    assert rows[0] == ["COMPONENT", "ACTOR", "PID", "STATE", "RESTARTS", "CPU", "RSS"]
    assert rows[1] == ["coordinator", "coordinator", "4242", "alive", "0", "1.5%", "50.0", "MiB"]
    assert rows[2] == ["registrar", "registrar", "4243", "dead", "2", "0.0%", "512", "B"]
    # columns line up
    header = lines[1]
    assert all(line.index(p) == header.index("PID") for line, p in zip(lines[2:], ("4242", "4243"), strict=True))


ROWS = [("coordinator", "control", 7), ("registrar", "control", 7), ("sessions", "data", 8)]


async def test_actors_table_grouped(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["actors"] = {
        "ok": True,
        "placement": "grouped",
        "actors": [
            {"name": kind, "actor": actor, "pid": pid, "state": "alive", "restarts": 1} for kind, actor, pid in ROWS
        ],
    }
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "actors"], capsys)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "placement: grouped, 2 actors"
    assert [line.split()[:3] for line in lines[2:]] == [
        ["coordinator", "control", "7"],
        ["registrar", "control", "7"],
        ["sessions", "data", "8"],
    ]


async def test_sessions_table(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "sessions"], capsys)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == [
        "SESSION",
        "PEER",
        "ROLE",
        "PATH",
        "STATE",
        "KEY",
        "/",
        "TRUSTED",
        "BY",
        "OUT",
        "IN",
        "AGE",
        "ATTEMPTS",
        "/",
        "ERROR",
    ]
    assert lines[1].split()[:5] == ["s-1", "2345678901", "initiator", "relay", "open"]
    assert "SHA256:bbbbJ0bLd1r... rendezvous-signed" in lines[1]
    assert "2.0 KiB" in lines[1] and "3.0 GiB" in lines[1] and "5.0s" in lines[1]
    assert lines[1].endswith("direct_tcp:failed(timed out), relay:ok")
    assert lines[2].split() == ["s-2", "3456789012", "responder", "-", "failed", "-", "0", "B", "0", "B", "-", "-"]
    # a refusal shows who (the key it proved) and why
    assert "SHA256:ccccJ0bLd1r... ? (ID unverified)" in lines[3]
    assert lines[3].endswith("peer 4567890123 is not allowed (not listed, no password set)")


async def test_links_table(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "links"], capsys)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:7] == ["LINK", "PEER", "ROLE", "PATH", "STATE", "PEER", "KEY"]
    assert lines[1].split()[:5] == ["5b56402e", "2345678901", "dialer", "tcp_punch", "up"]
    assert "3/41" in lines[1] and "2.0 MiB" in lines[1] and "5m" in lines[1]
    assert "relay " in lines[1] and "(won the race) -> tcp_punch " in lines[1]
    assert lines[2].split()[:5] == ["0a1b2c3d", "3456789012", "acceptor", "relay", "failed"]
    assert lines[2].endswith("link to the peer lost: cut")
    agent.replies["links"] = {"ok": True, "links": []}
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "links"], capsys)
    assert (rc, out) == (0, "no links\n")


async def test_sessions_empty(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["sessions"] = {"ok": True, "sessions": []}
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "sessions"], capsys)
    assert (rc, out) == (0, "no sessions\n")


async def test_netcheck_table(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "netcheck"], capsys)
    assert rc == 0 and err == ""
    fields = {line[:14].strip(): line[14:] for line in out.splitlines()}
    assert fields["UDP"] == "works (the server saw 198.51.100.7:41000 from local port 6000)"
    assert fields["mapping"].startswith("endpoint-dependent (symmetric NAT)") and "SYMMETRIC" in fields["mapping"]
    assert fields["filtering"].startswith("not measured")
    assert fields["udp mapping"].startswith("not measured")
    nat = agent.replies["netcheck"]["nat"]
    nat["behavior"] = {"mapping": "ENDPOINT_DEPENDENT", "allocation": "SEQUENTIAL", "step": 2,
                       "filtering": "PORT_DEPENDENT", "udp_blocked": False}
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "netcheck"], capsys)
    fields = {line[:14].strip(): line[14:] for line in out.splitlines()}
    assert fields["udp mapping"] == (
        "endpoint-dependent (a new public port per destination: symmetric); new ports in sequence, step 2 "
        "(the next ones can be predicted)"
    )
    assert fields["filtering"].startswith("port-dependent: only from the exact address and port")
    assert fields["public IP"] == "198.51.100.7 (behind a NAT: this host's addresses are 10.0.0.2, 2001:db8::2)"
    assert fields["IPv6"] == "2001:db8::2"
    assert fields["server"] == "198.51.100.1:21116  TCP handshake 12.2 ms"
    assert fields["relay"] == "198.51.100.1:21117  unreachable: connection refused"
    assert "measured_at" not in out  # the raw fields are for --json


async def test_netcheck_in_words_without_udp_or_nat(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    nat = agent.replies["netcheck"]["nat"]
    nat.update(nat_name="ASYMMETRIC", port1=5000, udp_mapped_port=None, udp_error="no UDP answer within 2 s")
    nat.update(public_ip="10.0.0.2")
    agent.replies["netcheck"]["relay"] = {"address": "198.51.100.1:21117", "rtt_ms": 3.0, "error": ""}
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "netcheck"], capsys)
    fields = {line[:14].strip(): line[14:] for line in out.splitlines()}
    assert rc == 0 and fields["UDP"].startswith("does not get through: no UDP answer within 2 s")
    assert fields["mapping"].startswith("endpoint-independent")
    assert fields["public IP"] == "10.0.0.2 (on this host: no NAT between here and the server), TCP port preserved"
    assert fields["relay"] == "198.51.100.1:21117  TCP handshake 3.0 ms"
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "netcheck", "--json"], capsys)
    assert rc == 0 and json.loads(out)["nat"]["udp_error"] == "no UDP answer within 2 s"


@pytest.mark.parametrize("command", list(ops_cli.COMMANDS))
async def test_json_output_is_the_reply_with_stable_keys(
    command: str, agent: CannedAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), command, "--json"], capsys)
    assert rc == 0 and err == ""
    data = json.loads(out)
    expected = {k: v for k, v in CANNED[command].items() if k != "ok"}
    assert data == expected
    assert list(data) == sorted(data)  # sorted keys: diffs between runs stay small
    assert agent.requests == [{"op": command}]


async def test_json_survives_bytes_in_reply(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["status"] = dict(STATUS, pushes={"raw": b"\x00\xff"})
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "status", "--json"], capsys)
    assert rc == 0 and json.loads(out)["id"] == "1234567890"


async def test_agent_refusal_is_one_line(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["netcheck"] = {"ok": False, "error": "nat probe unavailable: actor died"}
    rc, out, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "netcheck"], capsys)
    assert one_line_error(rc, err, "punchthrough-ops") == "punchthrough-ops: nat probe unavailable: actor died"
    assert out == ""


async def test_agent_refusal_without_reason(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["status"] = {"ok": False}
    rc, _, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "status"], capsys)
    one_line_error(rc, err, "punchthrough-ops")


async def test_multiline_agent_error_is_one_line(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["status"] = {"ok": False, "error": "actor died\nTraceback (most recent call last):\n  ..."}
    rc, _, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "status"], capsys)
    one_line_error(rc, err, "punchthrough-ops")


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("status", [1, 2]),
        ("status", "text"),
        ("status", None),
        ("status", {"ok": True, "registration": "junk"}),
        ("status", {"ok": True, "nat": {"measured_at": "yesterday"}}),
        ("status", {"ok": True, "uptime": "long"}),
        ("actors", {"ok": True, "actors": "junk"}),
        ("actors", {"ok": True, "actors": [{}]}),
        ("actors", {"ok": True, "actors": [{"name": "x", "cpu_percent": "hot"}]}),
        ("sessions", {"ok": True, "sessions": [{}]}),
        ("sessions", {"ok": True, "sessions": [{"id": "s", "attempts": [{}]}]}),
        ("links", {"ok": True, "links": [{}]}),
        ("links", {"ok": True, "links": [{"id": "l", "history": [{"at": "noon"}]}]}),
        ("links", {"ok": True, "links": "junk"}),
        ("netcheck", {"ok": True, "nat": [1, 2]}),
    ],
)
async def test_malformed_reply_is_one_line(
    command: str, reply: Any, agent: CannedAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.replies[command] = reply
    rc, _, err = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), command], capsys)
    one_line_error(rc, err, "punchthrough-ops")


# ---- sockets that are not a working agent ------------------------------------------------------------


def _prepare(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "st"
    state.mkdir()
    return state, control_socket(state)


async def test_socket_path_is_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, path = _prepare(tmp_path)
    path.write_text("not a socket")
    rc, _, err = await run(ops_cli.main, ["--state-dir", str(state), "status"], capsys)
    one_line_error(rc, err, "punchthrough-ops")
    assert path.read_text() == "not a socket"  # left alone


async def test_socket_path_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, path = _prepare(tmp_path)
    path.mkdir()
    rc, _, err = await run(ops_cli.main, ["--state-dir", str(state), "actors"], capsys)
    one_line_error(rc, err, "punchthrough-ops")


async def test_stale_socket_nobody_listens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What a crashed agent leaves behind: the socket file exists, connect is refused."""
    state, path = _prepare(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    rc, _, err = await run(ops_cli.main, ["--state-dir", str(state), "status"], capsys)
    assert "no agent running" in one_line_error(rc, err, "punchthrough-ops")


@contextlib.asynccontextmanager
async def raw_server(path: Path, payload: bytes, read_request: bool = True) -> AsyncIterator[None]:
    """A Unix socket server that answers every connection with `payload` and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if read_request:
                head = await reader.readexactly(4)
                await reader.readexactly(struct.unpack(">I", head)[0])
            writer.write(payload)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


GARBAGE = [
    pytest.param(b"", id="hangs-up"),
    pytest.param(b"\x00\x00", id="truncated-header"),
    pytest.param(b"\x00\x00\x00\x10\x81", id="truncated-body"),
    pytest.param(b"\xff\xff\xff\xff", id="oversized-length"),
    pytest.param(b"HTTP/1.1 400 Bad Request\r\n\r\n", id="http"),
    pytest.param(b"\x00\x00\x00\x03\xc1\xc1\xc1", id="bad-msgpack"),
    pytest.param(struct.pack(">I", 5) + b"\x92\x01\x02\x00\x00", id="extra-bytes"),
]


@pytest.mark.parametrize("payload", GARBAGE)
async def test_ops_against_garbage_server(payload: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, path = _prepare(tmp_path)
    async with raw_server(path, payload):
        rc, out, err = await run(ops_cli.main, ["--state-dir", str(state), "status"], capsys)
    one_line_error(rc, err, "punchthrough-ops")
    assert out == ""


async def test_ops_against_server_that_does_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, path = _prepare(tmp_path)
    async with raw_server(path, b"\x00\x00\x00\x01", read_request=False):
        rc, _, err = await run(ops_cli.main, ["--state-dir", str(state), "sessions", "--json"], capsys)
    one_line_error(rc, err, "punchthrough-ops")


# ---- punchthrough pipe against the canned agent --------------------------------------------------------


async def test_pipe_moves_bytes(
    agent: CannedAgent, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real `pipe` path: the socket is handed over by fd; stdin goes up, the agent's answer comes out."""
    stdin_file = tmp_path / "stdin"
    stdin_file.write_bytes(b"hello through the pipe\n" * 1000)
    with open(stdin_file, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        rc = await asyncio.to_thread(
            cli.main, ["--state-dir", str(agent.state_dir), "pipe", "2345678901", "127.0.0.1:22"]
        )
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert out == "HELLO THROUGH THE PIPE\n" * 1000
    req, *after = agent.requests
    assert req == {"op": "open", "peer": "2345678901", "target": "127.0.0.1:22", "policy": "", "password": None}
    assert after == [{"op": "sessions"}]  # at EOF pipe asks whether the session ended cleanly


async def test_pipe_sends_password_from_file_never_argv(
    agent: CannedAgent, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("  s3cret \n")
    monkeypatch.delenv("PUNCHTHROUGH_PASSWORD", raising=False)
    with open(tmp_path / "empty", "wb+") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        rc = await asyncio.to_thread(
            cli.main,
            [
                "--state-dir",
                str(agent.state_dir),
                "pipe",
                "1",
                "[::1]:22",
                "--password-file",
                str(pw),
                "--path",
                "relay",
            ],
        )
    assert rc == 0, capfd.readouterr()
    assert agent.requests[0]["password"] == "s3cret" and agent.requests[0]["policy"] == "relay"


async def test_pipe_refused_by_agent(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.replies["open"] = {"ok": False, "error": "peer 2345678901 is not registered"}
    rc, out, err = await run(cli.main, ["--state-dir", str(agent.state_dir), "pipe", "2345678901", "h:22"], capsys)
    assert one_line_error(rc, err, "punchthrough") == "punchthrough: peer 2345678901 is not registered"
    assert out == ""


@pytest.mark.parametrize("payload", GARBAGE)
async def test_pipe_against_garbage_server(payload: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, path = _prepare(tmp_path)
    async with raw_server(path, payload):
        rc, _, err = await run(cli.main, ["--state-dir", str(state), "pipe", "1", "h:22"], capsys)
    one_line_error(rc, err, "punchthrough")


async def test_pipe_stale_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, path = _prepare(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    rc, _, err = await run(cli.main, ["--state-dir", str(state), "pipe", "1", "h:22"], capsys)
    assert "no agent running" in one_line_error(rc, err, "punchthrough")


async def test_ctlproto_reply_too_large_is_refused_client_side(tmp_path: Path) -> None:
    """The length check happens before reading: a hostile server cannot make the CLI buffer 4 GiB."""
    _, path = _prepare(tmp_path)
    async with raw_server(path, struct.pack(">I", ctlproto.MAX_MESSAGE + 1)):
        with pytest.raises(ctlproto.ControlError, match="too large"):
            await asyncio.to_thread(ctlproto.call, path, {"op": "status"}, (), 5.0)


# ---- punchthrough serve when the relay port is taken ----------------------------------------------------


def _free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


async def test_serve_relay_port_taken_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rendezvous binds port P and P-1, the relay's P+1 is held here: one line, and the rendezvous is closed."""
    holders: list[socket.socket] = []
    try:
        for _ in range(50):
            holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            holders.append(holder)
            holder.bind(("127.0.0.1", 0))
            taken = holder.getsockname()[1]
            if taken > 2 and _free(taken - 1) and _free(taken - 2):
                break
        else:
            pytest.skip("no free pair of ports below a bound one")
        holder.listen()
        port = taken - 1
        argv = ["--state-dir", str(tmp_path / "s"), "serve", "--bind", "127.0.0.1", "--port", str(port)]
        try:
            rc = await asyncio.to_thread(cli.main, argv)
        except SystemExit as exc:
            assert isinstance(exc.code, str)
            print(exc.code, file=sys.stderr)
            rc = 1
        _, err = capsys.readouterr()
        message = one_line_error(rc, err, "punchthrough")
        assert f"port {taken}" in message and "127.0.0.1" in message
        assert _free(port)  # the rendezvous that did start was closed again
    finally:
        for holder in holders:
            holder.close()


async def test_netcheck_with_the_server_on_this_host(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's own setup: the embedded server sees loopback; a unique-local IPv6 is not offered to peers."""
    agent.replies["netcheck"]["nat"].update(public_ip="127.0.0.1")
    agent.replies["netcheck"]["addresses"] = ["192.0.2.2", "fd00::2"]
    rc, out, _ = await run(ops_cli.main, ["--state-dir", str(agent.state_dir), "netcheck"], capsys)
    fields = {line[:14].strip(): line[14:] for line in out.splitlines()}
    assert rc == 0 and fields["public IP"].startswith("127.0.0.1 (the server is on this host")
    assert fields["IPv6"] == "no global address on this host (only fd00::2, which peers elsewhere cannot reach)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connect_forwards_several_ports_at_once(agent: CannedAgent) -> None:
    """`connect -L A -L B` (ssh takes many): each accepted connection is opened to its own target."""
    ports = [_free_port(), _free_port()]
    targets = ["127.0.0.1:22", "[::1]:80"]
    argv = [sys.executable, "-m", "agent.cli", "--state-dir", str(agent.state_dir), "connect", "2345678901"]
    for port, target in zip(ports, targets, strict=True):
        argv += ["-L", f"{port}:{target}"]
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        banner = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"forwarding" in banner, banner
        for port in ports:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"HELLO\n"
            writer.close()
        opened = [r["target"] for r in agent.requests if r.get("op") == "open"]
        assert opened == targets
    finally:
        proc.terminate()
        await proc.wait()


async def test_connect_binds_every_port_or_none(agent: CannedAgent, capsys: pytest.CaptureFixture[str]) -> None:
    free = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        argv = ["--state-dir", str(agent.state_dir), "connect", "1", "-L", f"{free}:h:22", "-L", f"{busy}:h:80"]
        rc, _, err = await run(cli.main, argv, capsys)
    assert f"cannot listen on 127.0.0.1:{busy}" in one_line_error(rc, err, "punchthrough")
    with socket.socket() as again:
        again.bind(("127.0.0.1", free))  # the first port was let go


async def test_connect_to_an_agent_that_does_not_know_ping(
    agent: CannedAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    del agent.replies["ping"]  # an agent from before `ping` existed
    rc, _, err = await run(cli.main, ["--state-dir", str(agent.state_dir), "connect", "1", "-L", "1:h:22"], capsys)
    message = one_line_error(rc, err, "punchthrough")
    assert "does not answer properly (unknown request 'ping')" in message and "punchthrough down" in message
