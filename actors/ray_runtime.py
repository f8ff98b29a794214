"""Start and stop a private, lean, loopback-only Ray head, and attach a driver to it.

DESIGN.md rule 3 and shared/notes/ray-feasibility.md: `ray start --head --block` with
no monitor, no log monitor, no dashboard, the minimum object store, zero CPUs (so no
idle workers are prestarted), usage stats off, a 1 s drain, its own temp dir and
its own free ports, and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` so every Ray port
listens on 127.0.0.1 only. Token authentication stays on with a private token file
in the temp dir (RAY_AUTH_TOKEN_PATH): the same RAY_AUTH_MODE and token must be in
the environment of every process that talks to this head, which `RayHandle.env`
carries. Stopping kills only what this head started (its process tree and anything
naming its unique temp dir), never a machine-wide `ray stop`.

A process killed outright (SIGKILL) never runs `stop`: its head dies with it, but the
temp dir stays. So the creator writes its pid into the dir (`owner.pid`), and starting
a head sweeps the dirs of dead owners first (`sweep_stale_temp_dirs`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.common.procs import wait_exited

log = logging.getLogger("punchthrough.ray")

MIN_OBJECT_STORE = 78_643_200
"""75 MiB: below this Ray refuses to start."""

_PR_SET_PDEATHSIG = 1

TEMP_BASE = Path("/tmp")
TEMP_PREFIX = "ptray-"
OWNER_FILE = "owner.pid"
"""In a head's temp dir: "PID CREATE_TIME" of the process that created the dir."""
UNOWNED_MIN_AGE = 60.0
"""Seconds a temp dir without an owner file (made by an older version) must be left alone."""


class RayStartError(RuntimeError):
    """The private head did not come up; the message carries the tail of its log."""

    def __init__(self, message: str, *, early_exit: bool = False) -> None:
        super().__init__(message)
        self.early_exit = early_exit


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the usual small race is accepted)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports: all held open together while picking, so none repeats
    (Ray refuses to start when two of its components are given the same port)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def namespace_for(state_dir: Path) -> str:
    """One Ray namespace per agent, so names never clash between agents sharing a cluster."""
    import hashlib

    return "punchthrough-" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


def lean_env(token_path: Path | None) -> dict[str, str]:
    """Variables every process that talks to a private head must share."""
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",
        "RAY_DEDUP_LOGS": "0",
    }
    if token_path is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """If our process dies without stopping the head, the head gets SIGTERM and tears itself down."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class RayHandle:
    address: str
    pid: int
    temp_dir: Path
    env: dict[str, str]
    owns_temp_dir: bool = True
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def apply_env(self) -> None:
        """Put this head's variables into os.environ (a driver must have them before ray.init)."""
        os.environ.update(self.env)

    def init_driver(self, namespace: str = "punchthrough") -> None:
        """Attach this process as a Ray driver, quietly."""
        self.apply_env()
        init_driver(self.address, namespace=namespace)

    def _ours(self) -> list[psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        # Only while our Popen has not reaped the head can its pid not belong to someone else.
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                head = psutil.Process(self.pid)
                procs[head.pid] = head
                for c in head.children(recursive=True):
                    procs[c.pid] = c
        # Anything else that names our unique temp dir was started by this head (workers
        # re-parented after a crash, agents that outlive the raylet).
        marker = str(self.temp_dir / "ray")
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                parts = p.info["cmdline"] or []
                if p.pid != os.getpid() and any(x.endswith(marker) or marker + "/" in x for x in parts):
                    procs[p.pid] = p
        return list(procs.values())

    def stop(self, timeout: float = 5.0) -> None:
        """SIGKILL every process of ours at once (twice: the second look catches workers that were
        starting while we took the first snapshot).

        Ray's orderly shutdown (SIGTERM to the head) stops its components one after another: ~2.5 s
        per agent, paid by every `down`, for nothing the agent needs. The agent keeps no state in
        Ray (its files are replaced atomically, the kernel closes its sockets), and a worker's
        SIGTERM runs none of our asyncio cleanup anyway. Killing the GCS and the raylet in the same
        instant as the workers leaves nobody to restart an actor."""
        for _ in range(2):
            procs = self._ours()
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            wait_exited([p.pid for p in procs], timeout)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1.0)
        if self.owns_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            if self.temp_dir.exists():  # a dying process wrote a last log line after the first pass
                time.sleep(0.2)
                shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_private_head(
    temp_dir: Path | None = None,
    *,
    object_store_bytes: int = MIN_OBJECT_STORE,
    startup_timeout: float = 60.0,
    auth: bool = True,
    parallel_starts: int = 1,
) -> RayHandle:
    """Start a lean loopback-only head and wait until it is up.

    `parallel_starts` > 1 lets the raylet start that many worker processes at once (it starts them
    one at a time otherwise): an agent of ten actors comes up ~2 s sooner on two cores. Ray ties
    this to the node's CPU count (min(cores, num_cpus)) and prestarts as many idle workers, which
    cost CPU while the head starts and are wasted when there are few actors to create; our actors
    ask for 0 CPUs, so the CPUs mean nothing else.

    `temp_dir` should be short (Ray puts Unix sockets under it and the path limit is
    107 bytes); by default a fresh /tmp/ptray-XXXX is created (naming this process as its
    owner, after sweeping the ones dead owners left behind) and removed on stop.
    Call this from the main thread: the head is told to die with the thread that started it.
    """
    owns = temp_dir is None
    if temp_dir is None:
        _sweep_quietly()
        tdir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=TEMP_BASE))
        write_owner(tdir)
    else:
        tdir = Path(temp_dir)
    tdir.mkdir(parents=True, exist_ok=True)
    token_path: Path | None = None
    if auth:
        token_path = tdir / "auth_token"
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
        finally:
            os.close(fd)
    env = lean_env(token_path)
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            handle = _launch(tdir, env, object_store_bytes, startup_timeout, parallel_starts)
        except RayStartError as exc:
            # An early exit is usually a port taken between picking and binding (other Ray
            # instances start on this machine too): pick new ports and try again.
            if attempt == attempts or not exc.early_exit:
                if owns:
                    shutil.rmtree(tdir, ignore_errors=True)
                raise
            log.warning("ray start failed (%s); retrying with other ports", exc)
            continue
        handle.owns_temp_dir = owns
        return handle
    raise AssertionError("unreachable")


def write_owner(tdir: Path) -> None:
    """Name this process as the owner of `tdir` (pid and start time, so a reused pid is not it)."""
    try:
        started = f" {psutil.Process().create_time():.2f}"
    except psutil.Error:
        started = ""
    (tdir / OWNER_FILE).write_text(f"{os.getpid()}{started}\n")


def _read_owner(tdir: Path) -> tuple[int, float | None] | None:
    """The owner file's pid and start time; None when there is none or it cannot be read."""
    try:
        parts = (tdir / OWNER_FILE).read_text().split()
        pid = int(parts[0])
        started = float(parts[1]) if len(parts) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    return (pid, started) if pid > 0 else None


def _owner_alive(pid: int, started: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # The same pid with another start time is a new process that reused the number.
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell: assume alive


def _named_paths(paths: list[str]) -> set[str]:
    """Those of `paths` that a live process's command line mentions (/proc/*/cmdline)."""
    patterns = {p: re.compile(re.escape(p) + r"(?![\w.-])") for p in paths}
    named: set[str] = set()
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            for arg in proc.info["cmdline"] or []:  # a zombie's is empty
                named.update(p for p, pat in patterns.items() if p in arg and pat.search(arg))
    return named


def sweep_stale_temp_dirs(
    base: Path = TEMP_BASE, *, unowned_min_age: float = UNOWNED_MIN_AGE, now: float | None = None
) -> list[Path]:
    """Remove the private-head temp dirs (`base`/ptray-*) that killed owners left behind.

    A dir goes only if it is a real directory (not a symlink) of our uid, no live process
    mentions its path on its command line (so a running Ray head is never touched), and
    either its owner file names a process that is gone, or it has no (readable) owner file
    and has not changed for `unowned_min_age` seconds (a dir of an older version, or one
    whose creator has not written the file yet). Returns the dirs removed.
    """
    now = time.time() if now is None else now
    candidates: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        path = Path(os.path.abspath(entry.path))
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        owner = _read_owner(path)
        if owner is not None:
            if _owner_alive(*owner):
                continue
        elif now - max(st.st_mtime, st.st_ctime) < unowned_min_age:
            continue
        candidates.append(path)
    if not candidates:
        return []
    named = _named_paths([str(p) for p in candidates])
    removed = []
    for path in candidates:
        if str(path) in named:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _sweep_quietly() -> None:
    """Sweep before starting a head; a failed sweep never stops the start."""
    try:
        removed = sweep_stale_temp_dirs(TEMP_BASE)
    except Exception as exc:  # best effort: leftovers only cost disk space
        log.warning("could not sweep stale Ray temp dirs: %s", exc)
        return
    for path in removed:
        log.info("removed stale Ray temp dir %s (its owner is gone)", path)


_LEAN_RAY_START = (
    "import ray.scripts.scripts as s, ray._private.node as n; "
    "s.get_ray_client_dependency_error = lambda: 'not used by punchthrough'; "
    "n.Node.start_api_server = lambda self, **_: setattr(self, '_webui_url', None); "
    "s.main()"
)
"""`ray start`, minus two processes no flag turns off and the agent never uses: the Ray client
server (~50 MiB and a port, started whenever grpc is importable) and the dashboard head
(`dashboard.py`, ~50 MiB PSS and ~0.4 s of CPU at start; with `--include-dashboard=False` it still
starts, to report usage stats, which are off). A head without a web UI is a state Ray handles
(`webui_url` None), as after a dashboard that failed to start."""


def _launch(
    tdir: Path, env: dict[str, str], object_store_bytes: int, startup_timeout: float, parallel_starts: int = 1
) -> RayHandle:
    port, dash_port, agent_port = free_ports(3)
    cmd = [
        sys.executable,
        "-c",
        _LEAN_RAY_START,
        "start",
        "--head",
        f"--port={port}",
        f"--temp-dir={tdir / 'ray'}",
        f"--num-cpus={parallel_starts if parallel_starts > 1 else 0}",
        "--include-dashboard=False",
        "--disable-usage-stats",
        "--no-monitor",
        "--include-log-monitor=False",
        f"--object-store-memory={object_store_bytes}",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        "--block",
    ]
    log_path = tdir / "head.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    handle = RayHandle(f"127.0.0.1:{port}", proc.pid, tdir, env, False, proc)
    try:
        while True:
            text = log_path.read_bytes()
            if b"Ray runtime started" in text:
                break
            if proc.poll() is not None:
                raise RayStartError(f"ray start exited with {proc.returncode}: {_tail(text)}", early_exit=True)
            if time.monotonic() - t0 > startup_timeout:
                raise RayStartError(f"ray start not up after {startup_timeout:.0f} s: {_tail(text)}")
            time.sleep(0.05)
    except BaseException:
        handle.stop()
        raise
    log.info("private Ray head up at %s (pid %d) in %.1f s", handle.address, proc.pid, time.monotonic() - t0)
    return handle


def _tail(text: bytes, lines: int = 8) -> str:
    return " | ".join(text.decode(errors="replace").strip().splitlines()[-lines:])


def init_driver(address: str, namespace: str = "punchthrough") -> None:
    """`ray.init` against an existing head with quiet logging (the caller set the environment)."""
    import ray

    _refresh_ray_env()
    ray.init(
        address=address,
        namespace=namespace,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=False,
    )


def _refresh_ray_env() -> None:
    """Make an already imported ray see the current environment.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once at import time (a driver that
    imported ray earlier would rewrite 127.0.0.1 to the host's routable IP and hang),
    caches RAY_AUTH_MODE in its C++ config, and caches the auth token (a second private
    head in the same process has another). These are private APIs, each guarded.
    """
    with contextlib.suppress(Exception):
        from ray._private import ray_constants

        flag = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        if flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = flag.lower() in ("1", "true")
    with contextlib.suppress(Exception):
        import ray._raylet as raylet

        private: Any = raylet
        private.Config.initialize("")  # what ray itself does after changing RAY_AUTH_MODE
        private.AuthenticationTokenLoader.instance().reset_cache()
