"""`punchthrough up` / `down`: the agent's life cycle on one machine.

`up` writes the effective config into the state directory and starts a
supervisor process (`up --foreground`, detached unless asked to stay). The
supervisor starts a private lean Ray head, creates one actor per component and
then just waits for a signal. Killing the supervisor in any way takes its Ray
head down with it (the head dies with its parent), so an agent never leaves
orphans behind; `down` signals exactly that supervisor, never a `ray stop`.
Only a SIGKILLed supervisor's head temp dir (/tmp/ptray-*, which names the
supervisor in its owner.pid) stays behind, until the next supervisor starting a
head sweeps it (actors.ray_runtime.sweep_stale_temp_dirs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from agent import ctlproto
from agent.files import private_append, private_dir
from agent.pins import SERVER_PINS_FILE
from agent.runtime_paths import control_socket, runtime_dir
from agent.stack import enabled_components, load_runtime

PID_FILE = "agent.pid"
REGISTRATION_WAIT = 15.0
"""Seconds `up` waits for the first registration once the agent answers; it returns either way."""


class RunnerError(Exception):
    """One line for the user."""


def running_pid(state_dir: Path) -> int | None:
    """The supervisor's pid if an agent runs for this state dir."""
    try:
        pid = int((state_dir / PID_FILE).read_text().split()[0])
        proc = psutil.Process(pid)
        if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and "up" in proc.cmdline():
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


def start_background(state_dir: Path, wait: float = 90.0) -> int:
    """Spawn the supervisor detached and wait until the agent is registered (or say why not)."""
    logs = private_dir(state_dir / "logs")
    cmd = [sys.executable, "-m", "agent.cli", "--state-dir", str(state_dir), "up", "--foreground", "--keep-config"]
    out = private_append(logs / "agent.log")
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        os.close(out)
    deadline = time.monotonic() + wait
    status: dict[str, Any] | None = None
    answering_since: float | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (logs / "agent.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RunnerError(f"agent exited with status {proc.returncode}: {' | '.join(tail)}")
        status = query(state_dir, "status")
        if status and status.get("registration", {}).get("state") in ("registered", "server_key_refused"):
            break
        if status and answering_since is None:
            answering_since = time.monotonic()
        if answering_since is not None and time.monotonic() - answering_since > REGISTRATION_WAIT:
            break  # the agent runs; registration keeps trying in the background (status says why)
        time.sleep(0.2)
    if not status:
        raise RunnerError(f"agent did not come up within {wait:.0f}s (see {logs / 'agent.log'})")
    registration = status.get("registration", {})
    state = registration.get("state", "unknown")
    if registration.get("server_key_problem"):
        down(state_dir, quiet=True)
        raise RunnerError(
            f"{registration['server_key_problem']}: not registering. If the server's key really changed, "
            f"remove {status['server']} from {state_dir / SERVER_PINS_FILE} (or give the right --server-key) "
            f"and run `punchthrough up` again"
        )
    print(
        f"punchthrough agent {status['id']} is up (pid {proc.pid}); server {status['server']}"
        f"{' (embedded)' if status.get('embedded') else ''}; registration: {state}",
        flush=True,
    )
    if registration.get("server_key_learned"):
        print(
            f"trusting rendezvous server {status['server']} on first contact: key {registration.get('server_key')} "
            f"(pinned in {state_dir / SERVER_PINS_FILE}; a different key from now on is refused)",
            flush=True,
        )
    if status.get("peer_spec"):
        print(f"peers allow this agent as {status['peer_spec']}", flush=True)
    return 0


def supervise(state_dir: Path) -> int:
    """The foreground agent: private Ray head + actors, until SIGTERM/SIGINT."""
    from actors.ray_runtime import start_private_head

    (state_dir / PID_FILE).write_text(f"{os.getpid()} up\n")
    shutil.rmtree(runtime_dir(state_dir) / "boots", ignore_errors=True)
    rt = load_runtime(state_dir)
    stopping = False

    def stop(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    head = start_private_head()
    head.apply_env()  # before Ray is imported here: it reads some of these at import time
    import ray

    from actors.agent_actors import ComponentActor, namespace_for

    try:
        ns = namespace_for(state_dir)
        head.init_driver(ns)
        for kind in enabled_components(rt):
            ComponentActor.options(  # type: ignore[attr-defined]
                name=kind, namespace=ns, lifetime="detached", get_if_exists=True
            ).remote(kind, str(state_dir), ns)
        print(f"agent {rt.identity.peer_id} supervising Ray head {head.address} (pid {head.pid})", flush=True)
        while not stopping:
            time.sleep(0.2)
            if not head.alive():
                print("Ray head died; stopping", flush=True)
                return 1
        return 0
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        head.stop()
        for path in (state_dir / PID_FILE, control_socket(state_dir)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def down(state_dir: Path, timeout: float = 20.0, quiet: bool = False) -> int:
    pid = running_pid(state_dir)
    if pid is None:
        if quiet:
            return 0
        raise RunnerError(f"no agent running for state dir {state_dir}")
    os.kill(pid, signal.SIGTERM)
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)  # its Ray head dies with it
    except psutil.NoSuchProcess:
        pass
    if not quiet:
        print(f"punchthrough agent (pid {pid}) stopped")
    return 0
