"""`punchthrough pipe` and `punchthrough connect -L`: user-side ends of a stream.

Both ask the local agent's coordinator (control socket) to open a stream to a
peer and hand it the local socket by fd; the agent's session owner pumps the
encrypted session. `pipe` joins stdin/stdout to its end of a socketpair;
`connect` hands over each accepted TCP connection directly, so its bytes never
pass through this process at all.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from agent.common import ctlwire
from agent.runtime_paths import control_socket
from agent.wire.addr import AddressError, parse_port, split_host_port

RESTART_PATIENCE = 5.0
"""Seconds `pipe`/`connect` wait for a restarting coordinator of a running agent."""
PID_FILE = "agent.pid"


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets over 127.0.0.1 (blocking).

    Used instead of socketpair() for a stream handed to the agent: the session owner
    resets the stream when the session fails, and only TCP can carry a reset (an
    AF_UNIX socketpair would show the application a clean end of a truncated stream).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        mine = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    mine.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    theirs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return mine, theirs


class ClientError(Exception):
    """One line for the user; the CLI exits non-zero."""


class ForwardSpec(NamedTuple):
    bind_host: str
    bind_port: int
    target: str


def parse_forward(text: str) -> ForwardSpec:
    """`[BIND:]PORT:HOST:HOSTPORT` as ssh -L takes it (IPv6 hosts in brackets)."""
    parts: list[str] = []
    cur = ""
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == ":" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if len(parts) == 3:
        parts.insert(0, "127.0.0.1")
    if len(parts) != 4 or depth != 0:
        raise AddressError(f"-L wants [BIND:]PORT:HOST:HOSTPORT, got {text!r}")
    bind, port, host, hostport = parts
    bind = bind.strip("[]") or "127.0.0.1"
    target = f"{host}:{hostport}"  # an IPv6 host keeps its brackets
    split_host_port(target)
    split_host_port(f"[{bind}]:1" if ":" in bind else f"{bind}:1")
    return ForwardSpec(bind, parse_port(port, "local port"), target)


def _open(state_dir: Path, peer: str, target: str, fd: int, path: str, password: str | None, timeout: float) -> Any:
    request = {"op": "open", "peer": peer, "target": target, "policy": path, "password": password}
    ctl = control_socket(state_dir)
    patience = time.monotonic() + RESTART_PATIENCE
    while True:
        try:
            reply = ctlwire.call(ctl, request, [fd], timeout=timeout)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            # The coordinator restarts within a second or so after a crash; wait while the agent runs.
            if time.monotonic() > patience or not (state_dir / PID_FILE).exists():
                raise ClientError(
                    f"no agent running for state dir {state_dir} (start it with `punchthrough up`)"
                ) from None
            time.sleep(0.1)
        except TimeoutError:
            raise ClientError(f"the agent did not open the stream within {timeout:.0f}s") from None
        except (OSError, ctlwire.ControlError) as exc:
            raise ClientError(f"agent control socket: {exc}") from None
    if not reply.get("ok"):
        raise ClientError(str(reply.get("error", "the agent refused")))
    return reply


def _session_failure(state_dir: Path, sid: str) -> str:
    """The session's error if it failed, "" if it ended cleanly (or cannot be asked)."""
    with contextlib.suppress(Exception):
        reply = ctlwire.call(control_socket(state_dir), {"op": "sessions"}, timeout=5)
        for s in reply.get("sessions", []):
            if s.get("id") == sid and (s.get("state") == "failed" or s.get("error")):
                return str(s.get("error") or "session failed")
    return ""


def _session_error(state_dir: Path, sid: str) -> str:
    with contextlib.suppress(Exception):
        reply = ctlwire.call(control_socket(state_dir), {"op": "sessions"}, timeout=3)
        for s in reply.get("sessions", []):
            if s.get("id") == sid and s.get("error"):
                return str(s["error"])
    return "connection reset"


def run_pipe(state_dir: Path, peer: str, target: str, path: str, password: str | None, timeout: float) -> int:
    """stdin -> peer's target, target -> stdout. Exit 0 when the far side closed cleanly."""
    mine, theirs = loopback_pair()  # TCP, not a socketpair: a failed session must reach us as a reset
    try:
        reply = _open(state_dir, peer, target, theirs.fileno(), path, password, timeout)
    finally:
        theirs.close()
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()

    def upstream() -> None:
        try:
            while data := os.read(stdin_fd, 256 * 1024):
                mine.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            mine.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    sid = str(reply.get("session", ""))
    try:
        while data := mine.recv(256 * 1024):
            view = memoryview(data)
            while view:
                view = view[os.write(stdout_fd, view) :]
    except ConnectionResetError:
        raise ClientError(f"stream to {peer} failed: {_session_error(state_dir, sid)}") from None
    except BrokenPipeError:
        return 0
    finally:
        mine.close()
    # A socketpair cannot carry a reset: an end of stream is only clean if the session says so
    # (a cut or tampered session must never look like a complete transfer).
    failure = _session_failure(state_dir, sid)
    if failure:
        raise ClientError(f"stream to {peer} failed: {failure}")
    return 0


def ensure_agent(state_dir: Path) -> None:
    """ClientError unless this state dir's agent answers (so `connect` does not listen for nothing)."""
    try:
        reply = ctlwire.call(control_socket(state_dir), {"op": "ping"}, timeout=5)
    except (OSError, ctlwire.ControlError):
        raise ClientError(f"no agent running for state dir {state_dir} (start it with `punchthrough up`)") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        why = reply.get("error") if isinstance(reply, dict) else f"a {type(reply).__name__}, not a map"
        raise ClientError(
            f"the agent for state dir {state_dir} does not answer properly ({str(why)[:200]}): an older version? "
            "`punchthrough down && punchthrough up` restarts it"
        )


def _listen(spec: ForwardSpec) -> socket.socket:
    family = socket.AF_INET6 if ":" in spec.bind_host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((spec.bind_host, spec.bind_port))
    except OSError as exc:
        listener.close()
        raise ClientError(f"cannot listen on {spec.bind_host}:{spec.bind_port}: {exc.strerror}") from None
    listener.listen(128)
    return listener


def _forward_in_agent(
    state_dir: Path, peer: str, spec: ForwardSpec, listener: socket.socket, path: str, password: str | None
) -> socket.socket | None:
    """Hand `listener` to the agent, which accepts on it from now on (agent/session/forwards.py):
    our end of the notice socket, or None if the agent serves this peer per connection (ID@HOST,
    or an agent from before forwards)."""
    mine, theirs = socket.socketpair()
    request = {"op": "forward", "peer": peer, "target": spec.target, "policy": path, "password": password}
    try:
        reply = ctlwire.call(control_socket(state_dir), request, [listener.fileno(), theirs.fileno()], timeout=15)
    except (OSError, ctlwire.ControlError) as exc:
        mine.close()
        raise ClientError(f"agent control socket: {exc}") from None
    finally:
        theirs.close()
    if isinstance(reply, dict) and reply.get("ok"):
        return mine
    mine.close()
    error = str(reply.get("error", "")) if isinstance(reply, dict) else ""
    if not isinstance(reply, dict) or reply.get("per_connection") or error.startswith("unknown request"):
        return None
    raise ClientError(error or "the agent refused the forward")


def run_forward(
    state_dir: Path, peer: str, specs: list[ForwardSpec], path: str, password: str | None, timeout: float
) -> int:
    """Listen on every spec's bind and let the agent accept there (each connection a stream; failures
    are printed here); runs until interrupted. Checks first that the agent runs, and binds every port
    before forwarding any (one fails, none listen). For ID@HOST (no link by ID) this process accepts
    and hands each connection over, as before forwards existed."""
    ensure_agent(state_dir)
    listeners: list[socket.socket] = []
    try:
        for spec in specs:
            listeners.append(_listen(spec))
    except ClientError:
        for listener in listeners:
            listener.close()
        raise
    failures: list[str] = []

    def serve(conn: socket.socket, spec: ForwardSpec) -> None:
        try:
            _open(state_dir, peer, spec.target, conn.fileno(), path, password, timeout)
        except ClientError as exc:
            print(f"punchthrough: {exc}", file=sys.stderr, flush=True)
        finally:
            conn.close()

    def accept_loop(listener: socket.socket, spec: ForwardSpec) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn, spec), daemon=True).start()

    def hand_over(listener: socket.socket, spec: ForwardSpec) -> socket.socket | None:
        """The notice socket of a forward the agent accepts for; None: accept here. Waits for a
        restarting agent; a failure ends the command."""
        patience = time.monotonic() + RESTART_PATIENCE
        while True:
            try:
                return _forward_in_agent(state_dir, peer, spec, listener, path, password)
            except ClientError as exc:
                gone = not (state_dir / PID_FILE).exists()
                if time.monotonic() > patience or gone or not str(exc).startswith("agent control socket"):
                    raise
                time.sleep(0.2)

    def in_agent(listener: socket.socket, spec: ForwardSpec, notices: socket.socket) -> None:
        """Print the agent's notices for this forward; when the agent stops forwarding (it restarted),
        hand the port over again."""
        buf = b""
        while True:
            try:
                data = notices.recv(65536)
            except OSError:
                data = b""
            if data:
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    print(f"punchthrough: {line.decode(errors='replace')}", file=sys.stderr, flush=True)
                continue
            notices.close()
            try:
                again = hand_over(listener, spec)
            except ClientError as exc:
                failures.append(f"the agent stopped forwarding {spec.bind_host}:{spec.bind_port}: {exc}")
                return
            if again is None:
                accept_loop(listener, spec)
                return
            notices, buf = again, b""

    loops: list[threading.Thread] = []
    try:
        for listener, spec in zip(listeners, specs, strict=True):
            notices = hand_over(listener, spec)
            if notices is None:
                loops.append(threading.Thread(target=accept_loop, args=(listener, spec), daemon=True))
            else:
                loops.append(threading.Thread(target=in_agent, args=(listener, spec, notices), daemon=True))
            print(
                f"forwarding {spec.bind_host}:{listener.getsockname()[1]} -> {spec.target} via peer {peer}",
                file=sys.stderr,
                flush=True,
            )
        for t in loops:
            t.start()
        while all(t.is_alive() for t in loops):
            loops[0].join(0.5)
    finally:
        for listener in listeners:
            listener.close()
    if failures:
        raise ClientError(failures[0])
    return 0
