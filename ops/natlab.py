"""NAT lab: real kernel NAT between network namespaces, for people checking their setup and for tests.

`python -m ops.natlab list | up SCENARIO [--prefix P] [--json] | down [--prefix P | --stale | --all]`

A lab is a handful of namespaces named "<prefix>-<node>" (wan, ra, rb, ha, hb, ha2) joined by veth
pairs that are created directly inside the namespaces, so nothing ever appears in the root namespace
and deleting the namespaces deletes every link. Routers get one nftables ruleset each (`nft -f`),
which keeps a build well under a second. The rules themselves are in `ops.natlab_scenarios`.

Each lab leaves a small owner file in /run/punchthrough-natlab so that a later run can tell a lab
whose creator died (a crashed test session) from one in use by a concurrent run.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ops.natlab_scenarios import (
    NAT_VARIANTS,
    NODE_NAMES,
    SCENARIOS,
    SERVER_V4,
    SERVER_V6,
    Node,
    Plan,
    PlanError,
    build_plan,
    check_prefix,
    get_scenario,
)

__all__ = ["NAT_VARIANTS", "SCENARIOS", "SERVER_V4", "SERVER_V6", "Lab", "LabError", "available", "main"]

STATE_DIR = Path("/run/punchthrough-natlab")
CLI_PREFIX = "ptlcli"  # the CLI's default: one well-known lab a person can `up` and `down`
_PROBE = "punchthrough-natlab-probe-"  # + pid: the namespace `available()` tries and deletes
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_NODE_SUFFIX = re.compile(r"^(?P<prefix>[a-z][a-z0-9]{0,11})-(?:" + "|".join(NODE_NAMES) + r")$")


class LabError(Exception):
    """A lab could not be built or removed; str() is one line naming the command and its stderr."""


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise LabError(f"natlab: `{' '.join(argv)}` failed: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"natlab: `{' '.join(argv)}` timed out after 30 s") from None
    if proc.returncode != 0:
        detail = _one_line(proc.stderr or proc.stdout) or "no output"
        where = ""
        m = re.search(r"Command failed -:(\d+)", proc.stderr)
        if m and stdin is not None:  # `ip -b -` names the failing batch line; show it
            lines = stdin.splitlines()
            idx = int(m.group(1)) - 1
            if 0 <= idx < len(lines):
                where = f" at `{lines[idx]}`"
        raise LabError(f"natlab: `{' '.join(argv)}`{where} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


@functools.cache
def available() -> tuple[bool, str]:
    """Whether this process can build labs, and if not, why (used by tests to skip cleanly).

    Root alone is not enough (a container may deny namespaces or nf_tables), so a throwaway
    namespace is created, given an empty ruleset, and deleted; the answer is kept per process.
    """
    if os.geteuid() != 0:
        return False, "natlab needs root (network namespaces and nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return False, f"natlab needs `{tool}` (apt-get install iproute2 nftables)"
    probe = f"{_PROBE}{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except LabError as e:
        return False, f"`ip netns add` does not work here: {e}"
    try:
        ruleset = "table ip probe {\n  chain c { type nat hook postrouting priority srcnat; masquerade; }\n}\n"
        _run(["ip", "netns", "exec", probe, "nft", "-f", "-"], ruleset)
    except LabError as e:
        return False, f"nftables NAT does not work in a namespace here: {e}"
    finally:
        with contextlib.suppress(LabError):
            _run(["ip", "netns", "del", probe])
    return True, ""


def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lab_namespaces(prefix: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(prefix + "-")]


def lab_prefixes() -> set[str]:
    """Prefixes of every lab on this machine (namespaces named like ours, plus owner files)."""
    found = {m.group("prefix") for n in list_namespaces() if (m := _NODE_SUFFIX.match(n))}
    if STATE_DIR.is_dir():
        found |= {p.name for p in STATE_DIR.iterdir() if _NODE_SUFFIX.match(p.name + "-wan")}
    return found


def _owner(prefix: str) -> dict[str, Any] | None:
    try:
        data = json.loads((STATE_DIR / prefix).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def is_stale(prefix: str) -> bool:
    """A lab built by a process that is gone (CLI labs, owner pid 0, are never stale)."""
    owner = _owner(prefix)
    if owner is None:
        return True
    pid = owner.get("pid")
    return isinstance(pid, int) and pid > 0 and not _pid_alive(pid)


def _kill_pids(pids: Sequence[int], grace: float = 1.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.02)
    for pid in pids:
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def namespace_pids(name: str) -> list[int]:
    """The processes inside namespace `name` (this one excluded); none when it is gone."""
    with contextlib.suppress(LabError):
        return [int(p) for p in _run(["ip", "netns", "pids", name]).split() if p.isdigit() and int(p) != os.getpid()]
    return []


def delete_namespaces(names: Sequence[str]) -> None:
    """Kill what runs inside the namespaces, then delete them. Safe on half-built labs."""
    pids = sorted({pid for name in names for pid in namespace_pids(name)})
    if pids:
        _kill_pids(pids)
    if names:
        try:
            _run(["ip", "-force", "-b", "-"], "".join(f"netns del {n}\n" for n in names))
        except LabError:
            if set(names) & set(list_namespaces()):  # not merely removed by a concurrent `down`
                raise


def remove_lab(prefix: str) -> list[str]:
    """Kill what runs inside the lab's namespaces, then delete them. Safe on half-built labs."""
    check_prefix(prefix)
    names = lab_namespaces(prefix)
    delete_namespaces(names)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / prefix).unlink()
    return names


def _setns_thread(ns_path: str, fn: Callable[[], T]) -> T:
    """Run fn() on a fresh thread that has joined the namespace: sockets it makes stay in it.

    setns(CLONE_NEWNET) changes only the calling thread, and the thread ends right after, so the
    rest of the process stays in the root namespace.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                setns = getattr(os, "setns", None)
                if setns is not None:
                    setns(fd, _CLONE_NEWNET)
                else:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=work, name="natlab-setns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


_live_labs: set[Lab] = set()


class Lab:
    """One scenario built under one prefix. Use as a context manager; `down()` is idempotent.

    Hosts are named by node: "wan", "ra", "rb", "ha", "hb", "ha2" (see `.nodes`).
    """

    def __init__(self, scenario: str, prefix: str | None = None, *, owner_pid: int | None = None) -> None:
        self.scenario = get_scenario(scenario)
        self.prefix = check_prefix(prefix) if prefix is not None else _fresh_prefix()
        self.plan: Plan = build_plan(self.scenario, self.prefix)
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.build_seconds: float | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._socks: list[socket.socket] = []
        self._up = False

    # ---- building -----------------------------------------------------------------------------
    def up(self) -> Lab:
        ok, why = available()
        if not ok:
            raise LabError(f"natlab: {why}")
        if self._up:
            return self
        existing = lab_namespaces(self.prefix)
        if existing:
            raise LabError(f"natlab: prefix {self.prefix} is in use ({', '.join(existing)}); "
                           f"run `python -m ops.natlab down --prefix {self.prefix}` first")
        t0 = time.monotonic()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        try:  # the owner file doubles as the prefix's lock: a racing lab with the same prefix fails here
            with (STATE_DIR / self.prefix).open("x") as f:
                json.dump({"pid": self.owner_pid, "scenario": self.scenario.name, "created": time.time()}, f)
        except FileExistsError:
            raise LabError(f"natlab: prefix {self.prefix} is in use ({STATE_DIR / self.prefix} exists); "
                           f"run `python -m ops.natlab down --prefix {self.prefix}` first") from None
        _live_labs.add(self)
        self._up = True
        try:
            _run(["ip", "-b", "-"], "".join(line + "\n" for line in self.plan.netns_batch))
            self._in_parallel(self._set_sysctls)
            _run(["ip", "-b", "-"], "".join(line + "\n" for line in self.plan.link_batch))
            self._in_parallel(self._configure)
            if self.scenario.ipv6:
                self._in_parallel(self._wait_link_local)
        except BaseException:
            self.down()
            raise
        self.build_seconds = time.monotonic() - t0
        return self

    def _in_parallel(self, fn: Callable[[str], None]) -> None:
        with ThreadPoolExecutor(max_workers=len(self.plan.nodes)) as pool:
            for f in [pool.submit(fn, node) for node in self.plan.nodes]:
                f.result()

    def _set_sysctls(self, node: str) -> None:
        """Written from a thread inside the namespace: /proc/sys/net shows the writer's namespace."""
        def write() -> None:
            for item in self.plan.sysctls.get(node, []):
                key, _, value = item.partition("=")
                path = Path("/proc/sys") / key.replace(".", "/")
                if key.startswith("net.bridge.") and not path.exists():
                    continue  # br_netfilter not loaded: nothing to switch off
                try:
                    path.write_text(value + "\n")
                except OSError as e:
                    raise LabError(f"natlab: sysctl {item} in {self.ns(node)} failed: {e.strerror}") from None

        _setns_thread(f"/run/netns/{self.ns(node)}", write)

    def _configure(self, node: str) -> None:
        ns = self.ns(node)
        _run(["ip", "-n", ns, "-b", "-"], "".join(line + "\n" for line in self.plan.ip_batch[node]))
        if node in self.plan.nft:
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], self.plan.nft[node])

    def _wait_link_local(self, node: str, timeout: float = 3.0) -> None:
        """Routers solicit neighbours from their link-local address; wait until every link has one.

        Bridge ports are skipped: nothing is ever sent from their own addresses.
        """
        ns = self.ns(node)
        deadline = time.monotonic() + timeout
        while True:
            links = {line.split(":")[1].strip().split("@")[0]
                     for line in _run(["ip", "-n", ns, "-o", "link", "show", "up"]).splitlines()
                     if " master " not in line}
            links.discard("lo")
            ready = {line.split()[1] for line in _run(["ip", "-n", ns, "-6", "-o", "addr", "show", "scope", "link"])
                     .splitlines() if "tentative" not in line}
            if links <= ready:
                return
            if time.monotonic() > deadline:
                raise LabError(f"natlab: {ns}: no usable IPv6 link-local address on {', '.join(sorted(links - ready))} "
                               f"after {timeout:.0f} s")
            time.sleep(0.005)

    def down(self) -> None:
        """Stop the processes this lab started, then remove every namespace with the prefix."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for sock in self._socks:
            sock.close()
        self._socks.clear()
        if self._up:
            self._up = False
            _live_labs.discard(self)
            remove_lab(self.prefix)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    # ---- looking things up ----------------------------------------------------------------------
    @property
    def nodes(self) -> dict[str, Node]:
        return self.plan.nodes

    def node(self, host: str) -> Node:
        try:
            return self.plan.nodes[host]
        except KeyError:
            raise LabError(f"natlab: scenario {self.scenario.name} has no node {host!r}; "
                           f"it has {', '.join(self.plan.nodes)}") from None

    def ns(self, host: str) -> str:
        self.node(host)
        return self.plan.ns(host)

    def addr(self, host: str, v6: bool = False) -> str:
        """The address on the host's own interface (private for hosts behind a NAT)."""
        node = self.node(host)
        if not v6:
            return node.v4
        if node.v6 is None:
            raise LabError(f"natlab: {host} has no IPv6 address in scenario {self.scenario.name}")
        return node.v6

    def public_addr(self, host: str, v6: bool = False) -> str:
        """The source address wan sees for this host (its router's, for hosts behind a NAT)."""
        node = self.node(host)
        if not v6:
            return node.public_v4
        if node.public_v6 is None:
            raise LabError(f"natlab: {host} has no IPv6 address in scenario {self.scenario.name}")
        return node.public_v6

    # ---- changing the network under running processes ---------------------------------------------
    def roam(self, host: str = "hb") -> str:
        """Move the host to its spare link, as a laptop joining another network: the old address
        goes away with the link, the public one comes up on eth1. Returns the new address."""
        new = self.node(host).roam_v4
        if new is None:
            raise LabError(f"natlab: {host} cannot roam in scenario {self.scenario.name} (no spare link)")
        lines = ["addr flush dev eth0", "link set eth0 down", f"addr add {new}/24 dev eth1", "link set eth1 up"]
        _run(["ip", "-n", self.ns(host), "-b", "-"], "".join(line + "\n" for line in lines))
        return new

    # ---- doing things inside ----------------------------------------------------------------------
    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("check", False)
        return subprocess.run(self.argv(host, argv), **kw)

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the host's namespace; `down()` ends it if it is still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def socket(self, host: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket of this process that lives in the host's namespace (no subprocess needed)."""
        sock = _setns_thread(f"/run/netns/{self.ns(host)}", lambda: socket.socket(family, type, proto))
        self._socks.append(sock)  # closed by down(): an open socket would keep the namespace alive
        return sock

    def describe(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "scenario": self.scenario.name,
            "description": self.scenario.description,
            "path": self.scenario.path,
            "build_seconds": self.build_seconds,
            "servers_v4": list(SERVER_V4),
            "servers_v6": list(SERVER_V6) if self.scenario.ipv6 else [],
            "nodes": {
                name: {"namespace": self.plan.ns(name), "role": n.role, "v4": n.v4, "v6": n.v6,
                       "public_v4": n.public_v4, "public_v6": n.public_v6, "gateway": n.gateway, "lan": n.lan,
                       "lan_v6": n.lan_v6, "nat": n.nat}
                for name, n in self.plan.nodes.items()
            },
        }


def _fresh_prefix() -> str:
    taken = lab_prefixes() if os.path.isdir("/run/netns") or STATE_DIR.is_dir() else set()
    while True:
        prefix = "ptl" + secrets.token_hex(2)
        if prefix not in taken:
            return prefix


def _down_live_labs() -> None:
    for lab in list(_live_labs):
        with contextlib.suppress(Exception):
            lab.down()


atexit.register(_down_live_labs)


# ---- CLI ----------------------------------------------------------------------------------------
def render_list() -> str:
    width = max(len(n) for n in SCENARIOS)
    lines = []
    for s in SCENARIOS.values():
        lines.append(f"{s.name.ljust(width)}  {s.description}")
        lines.append(f"{''.ljust(width)}  -> path: {s.path}")
    lines.append("")
    lines.append("NAT variants:")
    vw = max(len(n) for n in NAT_VARIANTS)
    lines += [f"  {n.ljust(vw)}  {d}" for n, d in NAT_VARIANTS.items()]
    return "\n".join(lines)


def render_up(lab: Lab) -> str:
    d = lab.describe()
    lines = [f"natlab {d['scenario']} up under prefix {d['prefix']} in {d['build_seconds']:.2f} s",
             f"  {d['description']}", f"  expected path: {d['path']}", ""]
    rows = [["namespace", "role", "address", "seen on wan as", "gateway"]]
    for name, n in d["nodes"].items():
        addr = n["v4"] if name != "wan" else ", ".join(SERVER_V4)
        if n["v6"]:
            addr += f", {n['v6']}" if name != "wan" else ", " + ", ".join(SERVER_V6)
        if n["lan"]:
            addr += f" (lan {n['lan']}" + (f", {n['lan_v6']})" if n["lan_v6"] else ")")
        rows.append([n["namespace"], n["role"], addr, n["public_v4"] if name.startswith("h") else "-",
                     n["gateway"] or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    p = d["prefix"]
    lines += ["", f"servers (rendezvous, relay) belong in {p}-wan on {SERVER_V4[0]} (second address {SERVER_V4[1]})",
              f"run a command in a namespace:  ip netns exec {p}-ha COMMAND",
              f"tear it down:                  python -m ops.natlab down --prefix {p}"]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise LabError(f"natlab: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ops.natlab", description="Real kernel NAT scenarios in network namespaces.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the scenarios, their expected connection path and the NAT variants")
    up = sub.add_parser("up", help="build a scenario")
    up.add_argument("scenario", choices=list(SCENARIOS), metavar="SCENARIO")
    up.add_argument("--prefix", default=CLI_PREFIX, help=f"namespace prefix (default {CLI_PREFIX})")
    up.add_argument("--json", action="store_true", help="print the namespaces and addresses as JSON")
    down = sub.add_parser("down", help="remove a lab (and whatever still runs inside it)")
    which = down.add_mutually_exclusive_group()
    which.add_argument("--prefix", help=f"the lab's prefix (default {CLI_PREFIX})")
    which.add_argument("--stale", action="store_true", help="every lab whose creating process is gone")
    which.add_argument("--all", action="store_true", help="every lab on this machine, in use or not")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.cmd == "list":
            print(render_list())
            return 0
        if os.geteuid() != 0:
            raise LabError("natlab: needs root (network namespaces, nftables); run it with sudo")
        if args.cmd == "up":
            lab = Lab(args.scenario, args.prefix, owner_pid=0)
            lab.up()
            _live_labs.discard(lab)  # a CLI lab outlives this process by design
            print(json.dumps(lab.describe(), indent=2) if args.json else render_up(lab))
            return 0
        if args.stale:
            prefixes = sorted(p for p in lab_prefixes() if is_stale(p))
        elif args.all:
            prefixes = sorted(lab_prefixes())
        else:
            prefixes = [args.prefix or CLI_PREFIX]
        if args.stale or args.all:  # probes of `available()` whose process died before deleting them
            for name in list_namespaces():
                pid = name.removeprefix(_PROBE)
                if name.startswith(_PROBE) and pid.isdigit() and not _pid_alive(int(pid)):
                    _run(["ip", "netns", "del", name])
        for prefix in prefixes:
            removed = remove_lab(prefix)
            names = f": {' '.join(sorted(removed))}" if removed else ""
            print(f"natlab: {prefix}: removed {len(removed)} namespace(s){names}")
        if not prefixes:
            print("natlab: nothing to remove")
        return 0
    except (LabError, PlanError) as e:
        msg = str(e)
        print(msg if msg.startswith("natlab:") else f"natlab: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
