"""Issue 4: unmodified real clients (OpenSSH, iperf3, curl) through agents behind real kernel NAT.

One both-cone lab, shared by the module: agent A on ha, agent B on hb. ssh uses `punchthrough pipe` as its
ProxyCommand; iperf3 and curl go through `punchthrough connect -L`. Speeds are printed, never asserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.natlab.agents import LabAgents, last_session, winner
from tests.natlab.clients import ssh_argv, start_forward, start_http, start_sshd, wait_listening
from tests.natlab.conftest import LabFactory

pytestmark = [pytest.mark.natlab, pytest.mark.ray, pytest.mark.timeout(120)]
PLACEMENT = "grouped"
"""CI runs this module's agents grouped (tests/placement.py): the NAT matrix in the small-machine placement."""

A, B = "ha", "hb"
SSH_TARGET = "127.0.0.1:2222"
IPERF_PORT, IPERF_LOCAL = 5201, 15201
HTTP_PORT, HTTP_LOCAL = 8080, 18080


@dataclass
class Pair:
    agents: LabAgents
    b_id: str
    work: Path


@pytest.fixture(scope="module")
def pair(natlab_module: LabFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    lab = natlab_module("both-cone")
    work = tmp_path_factory.mktemp("real_clients")
    agents = LabAgents(lab, work, PLACEMENT)
    try:
        agents.start_server()
        a_id, b_id = agents.agent_id(A), agents.agent_id(B)
        targets = [SSH_TARGET, f"127.0.0.1:{IPERF_PORT}", f"127.0.0.1:{HTTP_PORT}"]
        agents.up({B: ["--allow", a_id, *[x for t in targets for x in ("--allow-target", t)]], A: []})
        yield Pair(agents, b_id, work)
    finally:
        agents.down()


def test_openssh_over_pipe(pair: Pair) -> None:
    lab, agents = pair.agents.lab, pair.agents
    key = start_sshd(lab, B, pair.work / "sshd")

    out = lab.run(A, ssh_argv(agents, A, key, pair.b_id, SSH_TARGET, "echo hello from $(hostname) as $(id -un)"),
                  capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().startswith("hello from ") and out.stdout.decode().strip().endswith(" as root")
    print(f"\nssh: {out.stdout.decode().strip()} via {winner(last_session(agents, A))}")

    payload = os.urandom(5 * 1024 * 1024)
    dest = pair.work / "received.bin"
    out = lab.run(A, ssh_argv(agents, A, key, pair.b_id, SSH_TARGET, f"cat > {dest} && sha256sum {dest}"),
                  input=payload, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    want = hashlib.sha256(payload).hexdigest()
    assert out.stdout.decode().split()[0] == want  # the hash as sshd's side computed it
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == want

    # and back down, with scp (sftp subsystem) over the same ProxyCommand
    back = pair.work / "back.bin"
    scp = ssh_argv(agents, A, key, pair.b_id, SSH_TARGET)
    scp[0] = "scp"
    scp = [x for x in scp if x not in ("-l", "root", pair.b_id)] + [f"root@{pair.b_id}:{dest}", str(back)]
    out = lab.run(A, scp, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == want


def _iperf(pair: Pair, reverse: bool) -> dict[str, float]:
    lab = pair.agents.lab
    server = lab.popen(B, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT), "-B", "127.0.0.1"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(lab, B, IPERF_PORT, server)
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(IPERF_LOCAL), "-t", "3", "-J", *(["-R"] if reverse else [])]
    out = lab.run(A, argv, capture_output=True, timeout=40)
    assert out.returncode == 0, out.stdout.decode()[-2000:] + out.stderr.decode()[-2000:]
    server.wait(timeout=10)
    end = json.loads(out.stdout)["end"]
    return {"sent": end["sum_sent"]["bytes"], "received": end["sum_received"]["bytes"],
            "mbps": end["sum_received"]["bits_per_second"] / 1e6}


def test_iperf3_over_forward(pair: Pair) -> None:
    fwd = start_forward(pair.agents, A, pair.b_id, f"127.0.0.1:{IPERF_LOCAL}:127.0.0.1:{IPERF_PORT}")
    try:
        up = _iperf(pair, reverse=False)
        down = _iperf(pair, reverse=True)
    finally:
        fwd.terminate()
        fwd.wait(timeout=10)
    print(f"\niperf3 through connect -L (both-cone): A->B {up['mbps']:.0f} Mbit/s ({up['received'] / 1e6:.0f} MB), "
          f"B->A {down['mbps']:.0f} Mbit/s ({down['received'] / 1e6:.0f} MB)")
    for r in (up, down):
        assert r["sent"] > 0 and r["received"] > 0
    # the bytes really crossed the tunnel: A's sessions to the iperf3 target carried them
    streams = [s for s in pair.agents.ops(A, "sessions")["sessions"]
               if s.get("role") == "initiator" and s.get("target") == f"127.0.0.1:{IPERF_PORT}"]
    print("iperf3 sessions:", [(s.get("path"), s.get("bytes_out"), s.get("bytes_in")) for s in streams])
    assert sum(s.get("bytes_out", 0) for s in streams) >= up["received"]
    assert sum(s.get("bytes_in", 0) for s in streams) >= down["received"]


def test_curl_over_forward(pair: Pair) -> None:
    lab = pair.agents.lab
    root = pair.work / "www"
    root.mkdir()
    body = os.urandom(1024 * 1024)
    (root / "blob.bin").write_bytes(body)
    start_http(lab, B, root, HTTP_PORT)
    fwd = start_forward(pair.agents, A, pair.b_id, f"127.0.0.1:{HTTP_LOCAL}:127.0.0.1:{HTTP_PORT}")
    try:
        for _ in range(3):  # each request is a new TCP connection, so a new stream through the tunnel
            out = lab.run(A, ["curl", "-sS", "--fail", "--max-time", "30", f"http://127.0.0.1:{HTTP_LOCAL}/blob.bin"],
                          capture_output=True, timeout=40)
            assert out.returncode == 0, out.stderr.decode()
            assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(body).digest()
    finally:
        fwd.terminate()
        fwd.wait(timeout=10)
