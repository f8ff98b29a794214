"""A real multi-node Ray cluster on one machine: each node in its own network namespace.

`../shared/notes/ray-multinode-netns.md` has the recipe this follows. Node 0 (the head) holds a
bridge; every other namespace (worker nodes, and any extra hosts such as a client) hangs off it
with a veth pair, all in one /24. Ray processes started inside a namespace see only its
interfaces, so an actor placed on a node binds that node's address, as on separate machines.

A node dies the way a machine's Ray does when it crashes: every process inside its namespace
gets SIGKILL (`ip netns pids`), so its sockets close and its peers see resets. Only processes in
namespaces this lab made are ever signalled.

Namespaces are named `ptrl<owner pid>-<host>`: a lab whose owner process is gone is stale and
`remove_stale()` takes it down (a crashed test run leaves nothing behind for long).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common.procs import wait_exited
from ops.natlab import LabError, _pid_alive, _run, delete_namespaces, list_namespaces, namespace_pids

PREFIX = "ptrl"
_NAME = re.compile(rf"^{PREFIX}(?P<pid>\d+)-(?P<host>[a-z0-9]+)$")
SUBNET = "10.77.0"
RAY_PORT = 6390
RAY_START = (
    "import ray.scripts.scripts as s, ray._private.node as n; "
    "s.get_ray_client_dependency_error = lambda: 'not used by punchthrough'; "
    "n.Node.start_api_server = lambda self, **_: setattr(self, '_webui_url', None); "
    "s.main()"
)
"""`ray start` without the Ray client server and the dashboard head (as actors/ray_runtime.py)."""


@dataclass
class RayLab:
    """`nodes` Ray nodes (node 0 is the head) plus `hosts` plain namespaces on one bridge."""

    nodes: int = 3
    hosts: tuple[str, ...] = ("client",)
    owner: int = field(default_factory=os.getpid)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ptrl-", dir="/tmp")))
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        token = self.tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",
            "RAY_DEDUP_LOGS": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
        }

    # ------------------------------------------------------------------ names and addresses

    def node_name(self, i: int) -> str:
        return f"n{i}"

    @property
    def names(self) -> list[str]:
        return [self.node_name(i) for i in range(self.nodes)] + list(self.hosts)

    def ns(self, host: str) -> str:
        return f"{PREFIX}{self.owner}-{host}"

    def addr(self, host: str) -> str:
        return f"{SUBNET}.{self.names.index(host) + 1}"

    @property
    def head_address(self) -> str:
        return f"{self.addr('n0')}:{RAY_PORT}"

    def cmd(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def popen(self, host: str, argv: list[str], log: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start `argv` inside `host` with the cluster's Ray variables; output goes to tmp/`log`."""
        out = open(self.tmp / log, "wb")  # noqa: SIM115 - the child owns it; closed below
        # Only this cluster's Ray variables: a private head's (actors/ray_runtime.py lean_env, which a
        # test may have put into os.environ) would pin Ray to loopback and refuse a multi-node cluster.
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        try:
            return subprocess.Popen(
                self.cmd(host, argv), env={**base, **self.env, "PYTHONUNBUFFERED": "1"},
                stdout=kw.pop("stdout", out), stderr=out, start_new_session=True, **kw,
            )
        finally:
            out.close()

    # ------------------------------------------------------------------ life cycle

    def up(self) -> RayLab:
        try:
            self._network()
            for i in range(self.nodes):
                self._start_node(i)
            self._wait_alive()
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        head = self.ns("n0")
        batch = [f"netns add {self.ns(h)}" for h in self.names]
        _run(["ip", "-b", "-"], "".join(line + "\n" for line in batch))
        _run(["ip", "-n", head, "-b", "-"], "".join(line + "\n" for line in [
            "link set lo up", "link add br0 type bridge", "link set br0 up",
            f"addr add {self.addr('n0')}/24 dev br0",
        ]))
        for k, host in enumerate(self.names[1:], start=1):
            ns, a, b = self.ns(host), f"ptrl{k}a", f"ptrl{k}b"
            _run(["ip", "-n", head, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns])
            _run(["ip", "-n", head, "link", "set", a, "master", "br0", "up"])
            _run(["ip", "-n", ns, "-b", "-"], "".join(line + "\n" for line in [
                "link set lo up", f"link set {b} name eth0", "link set eth0 up",
                f"addr add {self.addr(host)}/24 dev eth0",
            ]))

    def _start_node(self, i: int) -> None:
        host = self.node_name(i)
        tdir = self.tmp / host
        common = [
            f"--node-ip-address={self.addr(host)}", f"--temp-dir={tdir}", "--num-cpus=0",
            "--disable-usage-stats", "--include-log-monitor=False", "--object-store-memory=78643200",
        ]
        role = (
            ["--head", f"--port={RAY_PORT}", "--include-dashboard=False", "--no-monitor"]
            if i == 0 else [f"--address={self.head_address}"]
        )
        argv = [sys.executable, "-c", RAY_START, "start", *role, *common]
        proc = self.popen(host, argv, f"ray-start-{host}.log")
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise LabError(f"raylab: `ray start` on {host} did not return within 90 s") from None
        if rc != 0:
            tail = (self.tmp / f"ray-start-{host}.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise LabError(f"raylab: `ray start` on {host} exited {rc}: {' | '.join(tail)}")

    def _wait_alive(self, timeout: float = 60.0) -> None:
        """`ray start` on a worker returns before the head lists it: wait until every node is alive
        (what places replicas reads that list once)."""
        code = (
            "import ray, time, sys\n"
            f"ray.init(address='{self.head_address}', logging_level='ERROR', log_to_driver=False)\n"
            f"deadline = time.monotonic() + {timeout}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {self.nodes}:\n"
            "    if time.monotonic() > deadline: sys.exit(f'nodes alive: {sum(n[\"Alive\"] for n in ray.nodes())}')\n"
            "    time.sleep(0.1)\n"
        )
        proc = self.popen("n0", [sys.executable, "-c", code], "wait-alive.log")
        try:
            rc = proc.wait(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -1
        if rc != 0:
            tail = (self.tmp / "wait-alive.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LabError(f"raylab: the cluster did not list {self.nodes} alive nodes: {' | '.join(tail)}")

    def kill_node(self, i: int) -> list[int]:
        """SIGKILL every process of node i (raylet, workers, actors): the node is gone at once."""
        pids = namespace_pids(self.ns(self.node_name(i)))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_exited(pids, 5.0)
        return pids

    def down(self) -> None:
        remove(self.owner)
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove(owner: int) -> list[str]:
    """Kill what runs in owner's lab namespaces, then delete them."""
    names = [n for n in list_namespaces() if (m := _NAME.match(n)) and int(m.group("pid")) == owner]
    with contextlib.suppress(LabError):
        delete_namespaces(names)
    return names


def remove_stale() -> None:
    """Take down labs whose owner process is gone."""
    owners = {int(m.group("pid")) for n in list_namespaces() if (m := _NAME.match(n))}
    for pid in owners:
        if not _pid_alive(pid):
            remove(pid)
