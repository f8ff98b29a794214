"""The coordinator: the agent's control plane.

It answers the control socket (ops queries, and stream requests from `pipe` and
`connect`), asks the rendezvous server for a path to a peer, starts the strategy
that can reach it, and tells the session owner what to expect. It receives the
server's pushes from the registrar and answers them. It keeps the table of
actors (pid, restarts, CPU, memory) and the outcome of every strategy attempt.
It never touches session bytes: local stream sockets pass through it by fd.
The strategies raced for one outgoing stream are in agent/race.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent import addr as addrmod
from agent import ctlproto
from agent.addr import AddressError, split_host_port
from agent.config import Config
from agent.handshake import HandshakeError, trusted_peer_key
from agent.handshake import Policy as AccessPolicy
from agent.identity import Identity
from agent.pins import PinMismatch, PinStore
from agent.plan import LAN_BUDGET, PUNCH_BUDGET, Policy
from agent.proto import rendezvous_pb2 as pb
from agent.race import VERSION, Attempt, Race, SessionPlan, ms_since
from agent.refs import Ref
from agent.rendezvous_client import RendezvousError, send_relay_response

log = logging.getLogger(__name__)

DEFAULT_DIRECT_PORT = 21118
MAX_ATTEMPT_RECORDS = 256


@dataclass
class ActorInfo:
    name: str
    pid: int
    registered: float
    restarts: int = 0
    proc: psutil.Process | None = None

    def as_dict(self) -> dict[str, Any]:
        state, cpu, rss = "dead", 0.0, 0
        try:
            if self.proc is None or self.proc.pid != self.pid:
                self.proc = psutil.Process(self.pid)
            if self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE:
                state = "alive"
                cpu = self.proc.cpu_percent(interval=None)
                rss = self.proc.memory_info().rss
        except psutil.Error:
            pass
        return {
            "name": self.name,
            "pid": self.pid,
            "state": state,
            "restarts": self.restarts,
            "cpu_percent": cpu,
            "rss": rss,
            "since": round(time.time() - self.registered, 1),
        }


def read_password(cfg: Config) -> str | None:
    """PUNCHTHROUGH_PASSWORD, else the configured password file; never a command-line argument."""
    env = os.environ.get("PUNCHTHROUGH_PASSWORD")
    if env:
        return env
    if cfg.access.password_file:
        text = Path(cfg.access.password_file).read_text().strip()
        return text or None
    return None


def build_policy(cfg: Config, pins: PinStore) -> AccessPolicy | None:
    """Who may connect to us, from the config; None when nobody is admitted."""
    password = read_password(cfg)
    allowed = set(cfg.access.allow)
    if not allowed and password is None:
        return None
    pinned = {pid: key for pid in allowed if (key := pins.get(pid)) is not None}
    return AccessPolicy.of(allowed, pinned, password, cfg.access.allow_targets)


class Coordinator:
    def __init__(
        self,
        *,
        state_dir: Path,
        cfg: Config,
        identity: Identity,
        server: str,
        server_key: bytes | None,
        control_socket: Path,
        sessions_socket: Path,
        registrar: Ref,
        nat_probe: Ref,
        relay: Ref,
        lan: Ref,
        tcp_punch: Ref,
        ipv6: Ref,
        udp_punch: Ref,
        embedded: bool = False,
    ) -> None:
        self.state_dir = state_dir
        self.cfg = cfg
        self.identity = identity
        self.server = server
        self.server_addr = split_host_port(server, 21116)
        self.server_key = server_key
        self.sessions_socket = sessions_socket
        self.registrar = registrar
        self.nat_probe = nat_probe
        self.relay = relay
        self.lan = lan
        self.tcp_punch = tcp_punch
        self.ipv6 = ipv6
        self.udp_punch = udp_punch
        self.embedded = embedded
        self.started = time.monotonic()
        self.actors: dict[str, ActorInfo] = {}
        self.plans: dict[str, SessionPlan] = {}
        self.pushes: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctl = ctlproto.ControlServer(control_socket, self._handle)

    async def start(self) -> None:
        await self._ctl.start()

    async def close(self) -> None:
        await self._ctl.close()
        for task in list(self._tasks):
            task.cancel()

    # ---- actors -------------------------------------------------------------------------

    def register_actor(self, name: str, pid: int, restarts: int | None = None) -> None:
        """Called by every actor when it (re)starts; a new pid for a known name is a restart."""
        info = self.actors.get(name)
        if info is None:
            self.actors[name] = ActorInfo(name, pid, time.time(), restarts or 0)
        elif info.pid != pid:
            info.pid, info.registered, info.proc = pid, time.time(), None
            info.restarts = restarts if restarts is not None else info.restarts + 1
        log.info("actor %s is up (pid %d)", name, pid)

    # ---- control socket -----------------------------------------------------------------

    async def _handle(self, req: dict[str, Any], fds: list[int]) -> Any:
        op = req.get("op")
        if op != "open":
            for fd in fds:
                os.close(fd)
        if op == "status":
            return await self.status()
        if op == "actors":
            return {"ok": True, "actors": [a.as_dict() for a in self.actors.values()]}
        if op == "sessions":
            return await self.sessions()
        if op == "netcheck":
            verdict = await self.nat_probe.call("measure")
            return {"ok": True, "nat": verdict.as_dict()}
        if op == "open":
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return {"ok": False, "error": "open needs exactly one stream socket"}
            try:
                return await self.open_stream(req, fds[0])
            finally:
                os.close(fds[0])
        return {"ok": False, "error": f"unknown request {op!r}"}

    async def status(self) -> dict[str, Any]:
        registration = await self._safe(self.registrar, "status")
        nat_status = await self._safe(self.nat_probe, "status")
        nat = nat_status.get("latest") or nat_status
        sessions = await self._session_list()
        return {
            "ok": True,
            "id": self.identity.peer_id,
            "fingerprint": self.identity.fingerprint,
            "server": self.server,
            "embedded": self.embedded,
            "registration": registration,
            "nat": nat,
            "sessions_active": sum(s.get("state") in ("handshake", "open") for s in sessions),
            "sessions_total": len(sessions),
            "pushes": dict(self.pushes),
            "uptime": round(time.monotonic() - self.started, 1),
            "version": VERSION,
        }

    async def _safe(self, ref: Ref, method: str) -> Any:
        try:
            return await asyncio.wait_for(ref.call(method), 3)
        except Exception as exc:  # a sick actor must not break status
            return {"error": f"{method} unavailable: {exc or type(exc).__name__}"}

    async def _session_list(self) -> list[dict[str, Any]]:
        try:
            reply = await ctlproto.acall(self.sessions_socket, {"op": "list"}, timeout=3)
            return list(reply.get("sessions", []))
        except (OSError, TimeoutError, ctlproto.ControlError):
            return []

    async def sessions(self) -> dict[str, Any]:
        live = {s["id"]: s for s in await self._session_list()}
        out = []
        for sid, plan in self.plans.items():
            entry = live.pop(sid, None) or {
                "id": sid,
                "peer": plan.peer,
                "role": plan.role,
                "path": plan.path,
                "state": "failed",
                "bytes_out": 0,
                "bytes_in": 0,
                "age": round(time.monotonic() - plan.created, 3),
                # the session owner does not know it: it never opened, or the owner restarted
                "error": plan.error or ("lost: the session owner restarted" if plan.path else ""),
            }
            entry["attempts"] = [a.as_dict() for a in plan.attempts]
            if plan.error and not entry.get("error"):
                entry["error"] = plan.error
            out.append(entry)
        out.extend(dict(s, attempts=[]) for s in live.values())
        return {"ok": True, "sessions": out}

    def _plan(self, sid: str, peer: str, role: str) -> SessionPlan:
        plan = self.plans[sid] = SessionPlan(sid, peer, role)
        while len(self.plans) > MAX_ATTEMPT_RECORDS:
            del self.plans[next(iter(self.plans))]
        return plan

    # ---- A side: open a stream to a peer --------------------------------------------------

    def relay_address(self) -> str:
        if self.cfg.agent.relay:
            return self.cfg.agent.relay
        host, port = self.server_addr
        return f"[{host}]:{port + 1}" if ":" in host else f"{host}:{port + 1}"

    def trusted_key(self, peer: str, signed_pk: bytes) -> tuple[bytes, str]:
        pins = PinStore(self.state_dir)
        pinned = pins.get(peer)
        if self.server_key is None and signed_pk and pinned is None:
            # No server key configured: trust on first use of what the server vouches for.
            return _unverified_idpk(peer, signed_pk), "first use"
        if self.server_key is None:
            return trusted_peer_key(peer, pinned=pinned)
        return trusted_peer_key(peer, server_key=self.server_key, signed_id_pk=signed_pk or None, pinned=pinned)

    async def open_stream(self, req: dict[str, Any], local_fd: int) -> dict[str, Any]:
        """A's side: race every strategy the plan allows; the session owner keeps the first
        transport whose authenticated handshake completes."""
        peer = str(req.get("peer", ""))
        target = str(req.get("target", ""))
        sid = uuidlib.uuid4().hex[:12]
        plan = self._plan(sid, peer, "initiator")
        timeout = float(self.cfg.agent.connect_timeout)

        def fail(reason: str) -> dict[str, Any]:
            plan.error = reason
            return {"ok": False, "error": reason, "session": sid}

        try:
            policy = Policy.parse(str(req.get("path") or self.cfg.agent.path))
        except ValueError as exc:
            return fail(str(exc))
        direct = ""
        if "@" in peer:  # ID@HOST[:PORT]: the peer's direct port, no rendezvous server
            peer, _, where = peer.partition("@")
            plan.peer = peer
            try:
                direct = await _resolve(where, DEFAULT_DIRECT_PORT)
            except (AddressError, OSError) as exc:
                return fail(f"direct address {where!r}: {exc}")
        if not peer:
            return fail("no peer ID given")
        if peer == self.identity.peer_id:
            return fail("that is this agent's own ID")
        started = time.monotonic()
        deadline = started + timeout
        keys: dict[str, tuple[bytes, str]] = {}
        race = Race(self, plan, sid, peer, started, deadline, keys)
        race.direct_address = direct
        initiate = asyncio.ensure_future(
            ctlproto.acall(
                self.sessions_socket,
                {
                    "op": "initiate",
                    "session": sid,
                    "peer": peer,
                    "target": target,
                    "password": req.get("password"),
                    "wait": timeout,
                },
                [local_fd],
                timeout=timeout + 15,
                patience=5,
            )
        )
        strategies = [asyncio.ensure_future(c) for c in race.coroutines(policy)]
        all_done = asyncio.ensure_future(asyncio.gather(*strategies, return_exceptions=True))
        all_done.add_done_callback(_consume)
        try:
            done, _ = await asyncio.wait({initiate, all_done}, return_when=asyncio.FIRST_COMPLETED)
            if initiate not in done:
                with contextlib.suppress(OSError, TimeoutError, ctlproto.ControlError):
                    await ctlproto.acall(self.sessions_socket, {"op": "transports_done", "session": sid}, timeout=5)
            reply = await initiate
        except (OSError, TimeoutError, ctlproto.ControlError) as exc:
            reply = {"ok": False, "error": f"session owner unavailable: {exc or type(exc).__name__}"}
        finally:
            for task in strategies:
                task.cancel()
            all_done.cancel()
            # Ray keeps running a call its caller stopped awaiting: tell the strategy actors to stop.
            for ref in (self.lan, self.tcp_punch, self.udp_punch, self.ipv6, self.relay):
                self._spawn(_quietly(ref.call("cancel", sid)))
        race.settle(reply.get("transports", []))
        if not reply.get("ok"):
            error = str(reply.get("error"))
            if race.fatal:
                error = race.fatal
            elif error == "no path to the peer" and race.errors:
                error = race.errors[0]
            return fail(error)
        plan.path = str(reply.get("path", ""))
        pk, source = keys.get(plan.path, (b"", "pinned"))
        if pk and source != "pinned":  # remember the key, so a later server cannot swap it (like known_hosts)
            with contextlib.suppress(PinMismatch):
                PinStore(self.state_dir).check_and_pin(peer, pk)
        return {"ok": True, "session": sid, "path": plan.path, "elapsed_ms": ms_since(started)}

    # ---- B side: pushes from the rendezvous server ----------------------------------------------

    async def our_nat_type(self) -> int:
        status = await self._safe(self.nat_probe, "status")
        return int(status.get("nat_type", pb.UNKNOWN_NAT)) if isinstance(status, dict) else pb.UNKNOWN_NAT

    async def on_push(self, kind: str, msg: Any, source: Any = None) -> None:
        self.pushes[kind] = self.pushes.get(kind, 0) + 1
        handler = {
            "request_relay": self._answer_relay,
            "punch_hole": self._answer_punch,
            "fetch_local_addr": self._answer_lan,
        }.get(kind)
        if handler is not None:
            task = asyncio.get_running_loop().create_task(handler(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer_punch(self, msg: Any) -> None:
        if msg.udp_port > 0:
            if Policy.parse(self.cfg.agent.path).udp:
                await self._answer_direct("udp_punch", self.udp_punch, msg, PUNCH_BUDGET)
            return
        v6 = b""
        if addrmod.decode(bytes(msg.socket_addr_v6)).port and Policy.parse(self.cfg.agent.path).ipv6:
            sid = uuidlib.uuid4().hex[:12]
            v6 = await self.ipv6.call("prepare", sid)
            if v6:
                self._spawn(self._answer_v6(sid, bytes(msg.socket_addr_v6)))
        await self._answer_direct("tcp_punch", self.tcp_punch, msg, PUNCH_BUDGET, v6)

    async def _answer_v6(self, sid: str, peer_v6: bytes) -> None:
        plan = self._plan(sid, "", "responder")
        plan.path = "ipv6"
        started = time.monotonic()
        res = await self.ipv6.call("connect", sid, peer_v6, "responder", PUNCH_BUDGET, {})
        ok = bool(res.get("ok"))
        plan.attempts.append(
            Attempt("ipv6", "connected" if ok else "error", str(res.get("reason", "")), ms_since(started))
        )
        log.info("answered ipv6 (session %s): %s", sid, "connected" if ok else res.get("reason"))
        if not ok:
            plan.error = str(res.get("reason"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_lan(self, msg: Any) -> None:
        await self._answer_direct("lan", self.lan, msg, LAN_BUDGET)

    async def _answer_direct(self, name: str, ref: Ref, msg: Any, budget: float, v6: bytes = b"") -> None:
        sid = uuidlib.uuid4().hex[:12]
        plan = self._plan(sid, "", "responder")
        started = time.monotonic()
        relay = msg.relay_server or self.relay_address()
        nat = await self.our_nat_type()
        args = (sid, msg, self.identity.peer_id, nat, relay, budget) + ((v6,) if v6 else ())
        res = await ref.call("answer", *args)
        plan.path = name
        ok = bool(res.get("ok"))
        log.info("answered %s push (session %s): %s", name, sid, "connected" if ok else res.get("reason"))
        plan.attempts.append(
            Attempt(name, "connected" if ok else "error", str(res.get("reason", "")), ms_since(started))
        )
        if not ok:
            plan.error = str(res.get("reason"))

    async def _answer_relay(self, msg: Any) -> None:
        sid = uuidlib.uuid4().hex[:12]
        plan = self._plan(sid, str(msg.id) if msg.id != self.identity.peer_id else "", "responder")
        started = time.monotonic()
        relay = msg.relay_server or self.relay_address()
        try:
            await send_relay_response(
                self.server_addr, bytes(msg.socket_addr), self.identity.peer_id, msg.uuid, relay, VERSION
            )
        except RendezvousError as exc:
            plan.attempts.append(Attempt("relay", "error", str(exc), ms_since(started)))
            plan.error = str(exc)
            return
        dial = await self.relay.call("dial", sid, relay, msg.uuid, self.identity.peer_id, "responder")
        outcome = "won" if dial.get("ok") else "error"
        plan.path = "relay"
        plan.attempts.append(Attempt("relay", outcome, str(dial.get("reason", "")), ms_since(started)))
        if not dial.get("ok"):
            plan.error = str(dial.get("reason"))


async def _resolve(where: str, default_port: int) -> str:
    """HOST[:PORT] -> "IP:PORT" (first address), for strategies that take IP literals."""
    host, port = split_host_port(where, default_port)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ip = str(infos[0][4][0])
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def _quietly(aw: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(aw, 5)


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a background future's outcome so a cancelled race logs nothing."""
    if not fut.cancelled():
        fut.exception()


def _unverified_idpk(peer: str, signed: bytes) -> bytes:
    """The key inside a signed IdPk whose signature we cannot check (no server key configured)."""
    from agent.proto import message_pb2

    idpk = message_pb2.IdPk()
    try:
        idpk.ParseFromString(signed[64:])
    except Exception:
        raise HandshakeError(f"rendezvous server sent a malformed key for peer {peer}") from None
    if idpk.id != peer or len(idpk.pk) != 32:
        raise HandshakeError(f"rendezvous server sent a key for the wrong peer (asked for {peer})")
    return bytes(idpk.pk)


def server_key_from(cfg: Config, embedded_key_file: Path | None) -> bytes | None:
    """The rendezvous server's verify key: configured, else the embedded server's, else None (TOFU)."""
    text = cfg.agent.server_key
    if not text and embedded_key_file is not None and embedded_key_file.exists():
        text = embedded_key_file.with_name(embedded_key_file.name + ".pub").read_text().strip()
    if not text:
        return None
    key = base64.b64decode(text)
    if len(key) != 32:
        raise ValueError("agent.server_key must be a base64 32-byte ed25519 public key")
    return key
