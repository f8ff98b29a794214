"""`punchthrough up` / `down`: the agent's life cycle on one machine.

`up` writes the effective config into the state directory and starts a
supervisor process (`up --foreground`, detached unless asked to stay). The
supervisor starts a private lean Ray head and a short-lived bootstrap driver
(actors/bootstrap.py) that creates the agent's actors (one per component, or
two groups: agent/placement.py), then just waits for a signal; it never
imports Ray itself. Killing the supervisor in any way takes its Ray
head down with it (the head dies with its parent), so an agent never leaves
orphans behind; `down` signals exactly that supervisor, never a `ray stop`.
Only a SIGKILLed supervisor's head temp dir (/tmp/ptray-*, which names the
supervisor in its owner.pid) stays behind, until the next supervisor starting a
head sweeps it (actors.ray_runtime.sweep_stale_temp_dirs).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from agent.common import ctlproto
from agent.common.files import private_append, private_dir
from agent.common.logfiles import rotate_if_full
from agent.common.procs import wait_exited
from agent.config import Config
from agent.control.pins import SERVER_PINS_FILE, ServerPins
from agent.rendezvous.preflight import no_answer
from agent.runtime_paths import calls_dir, control_socket, runtime_dir
from agent.wire.addr import split_host_port
from agent.wire.ports import RENDEZVOUS_PORT

PID_FILE = "agent.pid"
REGISTRATION_WAIT = 15.0
"""Seconds `up` waits for the first registration once the agent answers; then it fails and says why."""
NAT_WAIT = 5.0
"""Seconds `up` waits, once registered, for the first NAT measurement (about one second): a session
opened before it plans blind (every punch tried, the relay after a full stagger)."""


class RunnerError(Exception):
    """One line for the user."""


def running_pid(state_dir: Path) -> int | None:
    """The supervisor's pid if an agent runs for this state dir."""
    try:
        pid = int((state_dir / PID_FILE).read_text().split()[0])
        proc = _living(pid)
        if proc is not None and "up" in proc.cmdline():
            return pid
    except (FileNotFoundError, ValueError, IndexError, psutil.Error):
        pass
    return None


def query(state_dir: Path, op: str, timeout: float = 3.0) -> dict[str, Any] | None:
    try:
        reply = ctlproto.call(control_socket(state_dir), {"op": op}, timeout=timeout)
    except (OSError, ctlproto.ControlError):
        return None
    return reply if isinstance(reply, dict) else None


def start_background(state_dir: Path, wait: float = 90.0, udp_blocked: str = "") -> int:
    """Spawn the supervisor detached and wait until the agent is registered, or say why not and stop it
    (`udp_blocked`: the preflight's reason why UDP does not get through; the agent registers over TCP)."""
    logs = private_dir(state_dir / "logs")
    cmd = [sys.executable, "-m", "agent.cli", "--state-dir", str(state_dir), "up", "--foreground", "--keep-config"]
    rotate_if_full(logs / "agent.log")
    out = private_append(logs / "agent.log")
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        os.close(out)
    try:
        status = wait_until_registered(state_dir, wait, lambda: proc.poll())
    except RunnerError:
        down(state_dir, quiet=True)
        raise
    for line in up_report(state_dir, status, proc.pid, udp_blocked):
        print(line, flush=True)
    return 0


def wait_until_registered(state_dir: Path, wait: float, exited: Any = lambda: None) -> dict[str, Any]:
    """The agent's status once it is registered; RunnerError with the reason and what to check when it
    cannot register (its server does not answer, refuses it, or signs with a key we do not trust)."""
    logs = state_dir / "logs" / "agent.log"
    deadline = time.monotonic() + wait
    status: dict[str, Any] | None = None
    answering_since: float | None = None
    while time.monotonic() < deadline:
        code = exited()
        if code is not None:
            tail = logs.read_text(errors="replace").strip().splitlines()[-5:] if logs.exists() else []
            raise RunnerError(f"agent exited with status {code}: {' | '.join(tail)}")
        status = query(state_dir, "status")
        if status and "state" in (status.get("registration") or {}):  # the registrar itself answers
            if answering_since is None:
                answering_since = time.monotonic()
            problem = registration_problem(state_dir, status, time.monotonic() - answering_since)
            if problem == "":
                return _after_first_nat_measurement(state_dir, status, min(deadline, time.monotonic() + NAT_WAIT))
            if problem is not None:
                raise RunnerError(problem)
        time.sleep(0.2)
    raise RunnerError(f"agent did not come up within {wait:.0f}s (see {logs})")


def _after_first_nat_measurement(state_dir: Path, status: dict[str, Any], until: float) -> dict[str, Any]:
    """The status once the NAT probe has measured once (or `until` passed: then as it is)."""
    while not (status.get("nat") or {}).get("measured_at") and time.monotonic() < until:
        time.sleep(0.1)
        status = query(state_dir, "status") or status
    return status


def registration_problem(state_dir: Path, status: dict[str, Any], waited: float) -> str | None:
    """ "" when registered, a one-line reason (with what to check) when it will not be, None to keep waiting."""
    reg = status.get("registration") or {}
    state = str(reg.get("state", ""))
    server = str(status.get("server", "?"))
    if state == "registered":
        return ""
    if reg.get("server_key_problem"):
        return key_problem(reg["server_key_problem"], server, state_dir)
    if state == "unreachable" or (waited > REGISTRATION_WAIT and not reg.get("replies")):
        sent = reg.get("registrations_sent", 0)
        return f"{no_answer(server, f'{sent} registrations sent, no reply')} (logs: {state_dir / 'logs'})"
    if state.startswith("error:"):
        return f"rendezvous server {server} refused the registration ({state[7:]}); see {state_dir / 'logs'}"
    if waited > REGISTRATION_WAIT:
        return f"not registered with {server} after {waited:.0f}s (state: {state}); see {state_dir / 'logs'}"
    return None


def key_problem(problem: str, server: str, state_dir: Path, configured: bool = False) -> str:
    """A server that signs with another key than the trusted one, and how to set that right: the key came
    from --server-key (kept in config.toml) or was pinned on first contact (known_servers.json)."""
    if configured:
        return (
            f"{problem}: not registering. That key came from --server-key (or agent.server_key in "
            f"{state_dir / 'config.toml'}); "
            "if this is the right server, give the key `punchthrough up` (or `serve`) prints on its machine: "
            "`punchthrough up --server-key KEY`"
        )
    return (
        f"{problem}: not registering. The server's machine prints its key when it starts (`punchthrough up` with "
        f"embedded servers, or `serve`); give that with --server-key, or if the key really changed, remove {server} "
        f"from {state_dir / SERVER_PINS_FILE}, then `punchthrough up` again"
    )


def preflight(state_dir: Path, cfg: Config) -> str:
    """RunnerError unless `cfg`'s rendezvous server answers, signing with the key we trust (or may learn).
    Returns why UDP does not get through when only TCP does ("" when it does): then the agent registers
    over TCP, and `up` says what that means instead of failing."""
    from agent import identity
    from agent.rendezvous.preflight import check_server

    trusted = (
        base64.b64decode(cfg.agent.server_key) if cfg.agent.server_key else ServerPins(state_dir).get(cfg.agent.server)
    )
    ident = identity.load_or_create(state_dir)
    check = check_server(cfg.agent.server, split_host_port(cfg.agent.server, RENDEZVOUS_PORT), ident, trusted)
    if "signs with key" in check.problem:
        raise RunnerError(key_problem(check.problem, cfg.agent.server, state_dir, bool(cfg.agent.server_key)))
    if check.problem:
        raise RunnerError(check.problem)
    return check.udp_blocked


def host_address_hint(addresses: list[str] | None = None) -> str:
    """This host's address as peers would dial it, when there is one to name (one IPv4, or a choice)."""
    from agent.nat.watch import interface_addresses
    from agent.nat.watch_core import usable_addresses

    found = sorted(usable_addresses(interface_addresses() if addresses is None else addresses))
    v4 = [a for a in found if ":" not in a]
    if len(v4) == 1:
        return v4[0]
    if v4:
        return f"<one of {', '.join(v4[:4])}{', ...' if len(v4) > 4 else ''}>"
    return "<this host's address>"


def up_report(state_dir: Path, status: dict[str, Any], pid: int, udp_blocked: str = "") -> list[str]:
    """What `up` tells its user: the agent is up, what to give peers, and what still needs doing."""
    reg = status.get("registration") or {}
    lines = [
        f"punchthrough agent {status['id']} is up (pid {pid}); server {status['server']}"
        f"{' (embedded)' if status.get('embedded') else ''}; registration: {reg.get('state', 'unknown')}"
    ]
    if status.get("peer_spec"):
        lines.append(f"peers allow this agent as {status['peer_spec']}")
    if status.get("embedded") and status.get("server_key_b64"):
        port = str(status.get("server", "")).rpartition(":")[2]
        where = host_address_hint() + (f":{port}" if port and port != str(RENDEZVOUS_PORT) else "")
        lines.append(
            f"peers use this machine's rendezvous server with: up --server {where} --server-key "
            f"{status['server_key_b64']}  (key {status.get('server_key') or '?'})"
        )
    if reg.get("server_key_learned"):
        lines.append(
            f"trusting rendezvous server {status['server']} on first contact: key {reg.get('server_key')} "
            f"(pinned in {state_dir / SERVER_PINS_FILE}; a different key from now on is refused)"
        )
    if udp_blocked or reg.get("transport") == "tcp":
        why = udp_blocked or reg.get("why_tcp") or "no answer over UDP"
        lines.append(
            f"note: UDP to the rendezvous server does not get through ({why}), so this agent registers over TCP: "
            "peers reach it over TCP paths (TCP hole punch or the relay), not over UDP"
        )
    if not status.get("admits_anyone", True):
        lines.append(
            "note: no peer may connect to this agent yet (fine if it only connects out); to let one in, run "
            "`punchthrough allow ID=SHA256:...` here with what `punchthrough id` prints on the peer"
        )
    return lines


def _parallel_starts(state_dir: Path) -> int:
    """Worker processes Ray may start at once: one per core for the ten actors of the isolated placement
    (measured on 2 cores: `up` 6.0-6.7 s instead of 7.4-10.4), one for the two of grouped (3.7-4.4 s;
    with two, the idle workers Ray prestarts only compete with the head: 4.6-7.4 s)."""
    from agent.control.access import load_state_config

    return (os.cpu_count() or 1) if load_state_config(state_dir).ray.placement == "isolated" else 1


def supervise(state_dir: Path, announce: bool = False, udp_blocked: str = "") -> int:
    """The foreground agent: private Ray head + actors, until SIGTERM/SIGINT. With `announce` (a user's
    `up --foreground`) it says, as `up` does, when the agent is registered, or why it cannot be and stops."""
    from actors.ray_runtime import lean_env, namespace_for, start_private_head

    (state_dir / PID_FILE).write_text(f"{os.getpid()} up\n")
    for leftover in (runtime_dir(state_dir) / "boots", calls_dir(state_dir)):  # a crashed run's boot counts
        shutil.rmtree(leftover, ignore_errors=True)  # and direct-call sockets
    stopping = failed = False

    def stop(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bootstrap = subprocess.Popen(  # importing Ray and the agent there overlaps the head's start here
        [sys.executable, "-m", "actors.bootstrap", namespace_for(state_dir), str(state_dir)],
        env={**os.environ, **lean_env(None)},
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        head = start_private_head(parallel_starts=_parallel_starts(state_dir))
    except BaseException:
        bootstrap.kill()
        bootstrap.wait()
        raise
    try:
        assert bootstrap.stdin is not None
        bootstrap.stdin.write(json.dumps({"address": head.address, "env": head.env}) + "\n")
        bootstrap.stdin.close()
        if bootstrap.wait(timeout=180) != 0:
            print(f"could not start the agent's actors (bootstrap exited with {bootstrap.returncode})", flush=True)
            return 1
        print(f"agent supervising Ray head {head.address} (pid {head.pid})", flush=True)
        if announce:

            def report() -> None:
                nonlocal stopping, failed
                try:
                    status = wait_until_registered(state_dir, 90.0)
                except RunnerError as exc:
                    print(f"punchthrough: {exc}", file=sys.stderr, flush=True)
                    stopping = failed = True
                    return
                for line in up_report(state_dir, status, os.getpid(), udp_blocked):
                    print(line, flush=True)

            threading.Thread(target=report, daemon=True).start()
        while not stopping:
            time.sleep(0.2)
            if not head.alive():
                print("Ray head died; stopping", flush=True)
                return 1
        return 1 if failed else 0
    finally:
        stopping_at = time.monotonic()
        head.stop()
        print(f"Ray head and actors stopped in {time.monotonic() - stopping_at:.1f} s", flush=True)
        for path in (state_dir / PID_FILE, control_socket(state_dir)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shutil.rmtree(calls_dir(state_dir), ignore_errors=True)


def _living(pid: int) -> psutil.Process | None:
    """`pid`'s process while it runs; None once it has exited (a zombie has: agent/common/procs.py)."""
    try:
        proc = psutil.Process(pid)
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def down(state_dir: Path, timeout: float = 20.0, quiet: bool = False) -> int:
    """Stop this state dir's agent; nothing running is not an error (`down` is idempotent)."""
    pid = running_pid(state_dir)
    if pid is None:
        return 0
    os.kill(pid, signal.SIGTERM)
    if not wait_exited([pid], timeout, poll=0.05):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # its Ray head dies with it
    if not quiet:
        print(f"punchthrough agent (pid {pid}) stopped")
    return 0
