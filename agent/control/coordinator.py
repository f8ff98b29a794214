"""The coordinator: the agent's control plane.

It answers the control socket (ops queries, and stream requests from `pipe` and
`connect`), asks the rendezvous server for a path to a peer, starts the strategy
that can reach it, and tells the session owner what to expect. It receives the
server's pushes from the registrar and answers them. It keeps the table of
actors (pid, restarts, CPU, memory) and the outcome of every strategy attempt.
It never touches session bytes: local stream sockets pass through it by fd.
The strategies raced for one outgoing stream are in agent/control/race.py.
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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.core import Metric

from agent.common import ctlproto
from agent.common.metrics import MetricsServer, parse_listen
from agent.common.netutil import tcp_round_trip
from agent.common.tasks import TaskSet
from agent.config import Config
from agent.control.access import build_policy, known_peers
from agent.control.agent_metrics import AgentCounters, agent_families
from agent.control.answers import PushAnswers
from agent.control.pins import PinMismatch, PinnedKeys, PinStore
from agent.control.plan import Policy, Strategy
from agent.control.race import VERSION, Race, SessionPlan, ms_since
from agent.identity import Identity, IdentityCache
from agent.nat.watch import interface_addresses
from agent.nat.watch_core import usable_addresses
from agent.proto import rendezvous_pb2 as pb
from agent.refs import Ref
from agent.rendezvous.requests import Signer
from agent.session import view as session_view
from agent.strategies.base import Remote
from agent.wire import addr as addrmod
from agent.wire.addr import AddressError, split_host_port
from agent.wire.handshake import HandshakeError, trusted_peer_key
from agent.wire.nat_behavior import NatBehavior
from agent.wire.peer_ids import fingerprint, parse_peer_spec, spec_for
from agent.wire.ports import DIRECT_PORT, RENDEZVOUS_PORT

log = logging.getLogger(__name__)

MAX_ATTEMPT_RECORDS = 256
NAT_STATUS_TTL = 1.0
"""Seconds a NAT probe status is reused for new sessions."""
NAT_STATUS_STALE = 30.0
"""An answer up to this old is used while a fresh one is asked for; an older one is waited for."""


def nat_cache_use(age: float, measured: bool) -> str:
    """How a cached NAT probe status `age` seconds old serves a request: "fresh" (as it is), "stale"
    (as it is, with a fresh one asked for in the background) or "ask" (wait for the probe: too old,
    or cached before the first measurement, when a plan made with it would be made blind)."""
    if age <= NAT_STATUS_TTL:
        return "fresh"
    return "stale" if measured and age <= NAT_STATUS_STALE else "ask"


@dataclass
class ActorInfo:
    name: str
    pid: int
    registered: float
    restarts: int = 0
    actor: str = ""
    """The Ray actor (or "local") that carries this component: itself, or its group when grouped."""
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
            "actor": self.actor or self.name,
            "pid": self.pid,
            "state": state,
            "restarts": self.restarts,
            "cpu_percent": cpu,
            "rss": rss,
            "since": round(time.time() - self.registered, 1),
        }


class Coordinator:
    def __init__(
        self,
        *,
        state_dir: Path,
        cfg: Config,
        identity: Identity,
        server: str,
        server_key: Callable[[], bytes | None],
        control_socket: Path,
        sessions_socket: Path,
        registrar: Ref,
        nat_probe: Ref,
        strategies: dict[str, Ref],
        embedded: bool = False,
        live_cfg: Callable[[], Config] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.cfg = cfg
        self.live_cfg = live_cfg or (lambda: cfg)
        """The config as edited on disk since the start: [access] (who may connect) acts live."""
        self.identities = IdentityCache(state_dir, identity)
        self.server = server
        self.server_addr = split_host_port(server, RENDEZVOUS_PORT)
        self.server_key = server_key
        """The rendezvous server's key as trusted now (configured, embedded, or pinned at registration)."""
        self.sessions_socket = sessions_socket
        self.registrar = registrar
        self.nat_probe = nat_probe
        self._nat_cache: tuple[float, dict[str, Any]] | None = None
        self._nat_refresh: asyncio.Future[dict[str, Any]] | None = None
        self.counters = AgentCounters()
        self._metrics: MetricsServer | None = None
        self.strategies = strategies
        """Every strategy's component, by name (agent/strategies/registry.py)."""
        self.policy = Policy.parse(cfg.agent.path)
        """This agent's path policy (checked when the config was read); a request may name another."""
        self.embedded = embedded
        self.started = time.monotonic()
        self.actors: dict[str, ActorInfo] = {}
        self.plans: dict[str, SessionPlan] = {}
        self._dialing: dict[str, asyncio.Lock] = {}
        """Peer -> held while a race for a link to it runs: streams that find no link wait for that
        race's link instead of each starting a race of their own (20 clients at once, one race)."""
        self._dial_failed: dict[str, tuple[float, str]] = {}
        self._pins = PinnedKeys(state_dir)
        """The pinned peer keys as last read, with the file's mtime (read again when it changes)."""
        """Peer -> (when, why) its last race failed: the streams that waited for it fail with it."""
        self._tasks = TaskSet()
        self.answers = PushAnswers(self)
        self._ctl = ctlproto.ControlServer(control_socket, self._handle)

    async def start(self) -> None:
        await self._ctl.start()
        listen = self.cfg.agent.metrics
        if listen:
            try:
                self._metrics = await MetricsServer(parse_listen(listen), self.metric_families).start()
            except OSError as exc:  # the agent still works without them: say so once
                log.error("metrics on %s: %s; not serving metrics", listen, exc.strerror or exc)

    async def close(self) -> None:
        if self._metrics is not None:
            await self._metrics.close()
        await self._ctl.close()
        await self._tasks.close()

    async def metric_families(self) -> list[Metric]:
        """What a Prometheus scrape gets (agent/control/agent_metrics.py)."""
        registration = await self._safe(self.registrar, "status")
        try:
            reply = await ctlproto.acall(self.sessions_socket, {"op": "links"}, timeout=3)
            links = reply.get("links", []) if isinstance(reply, dict) else []
        except (OSError, TimeoutError, ctlproto.ControlError):
            links = []
        return agent_families(
            self.counters,
            {name: info.restarts for name, info in self.actors.items()},
            links,
            registration.get("state") == "registered",
            await self.our_nat_type(),
        )

    def ref(self, strategy: str) -> Ref:
        return self.strategies[strategy]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)

    # ---- actors -------------------------------------------------------------------------

    def register_actor(self, name: str, pid: int, restarts: int | None = None, actor: str = "") -> None:
        """Called by every actor for each component it carries when it (re)starts; a new pid for a known
        component is a restart."""
        info = self.actors.get(name)
        if info is None:
            self.actors[name] = ActorInfo(name, pid, time.time(), restarts or 0, actor)
        elif info.pid != pid:
            info.pid, info.registered, info.proc, info.actor = pid, time.time(), None, actor or info.actor
            info.restarts = restarts if restarts is not None else info.restarts + 1
        log.info("component %s is up (actor %s, pid %d)", name, actor or name, pid)

    # ---- control socket -----------------------------------------------------------------

    async def _handle(self, req: dict[str, Any], fds: list[int]) -> Any:
        op = req.get("op")
        if op == "forward":
            try:
                return await self.forward(req, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        if op != "open":
            for fd in fds:
                os.close(fd)
        if op == "ping":
            return {"ok": True, "id": self.identity.peer_id}
        if op == "status":
            return await self.status()
        if op == "actors":
            return {
                "ok": True,
                "placement": self.cfg.ray.placement,
                "actors": [a.as_dict() for a in self.actors.values()],
            }
        if op == "sessions":
            return await self.sessions()
        if op == "relink":
            return await self.relink(req)
        if op == "links":
            try:
                return await ctlproto.acall(self.sessions_socket, {"op": "links"}, timeout=3)
            except (OSError, TimeoutError, ctlproto.ControlError) as exc:
                return {"ok": False, "error": f"session owner unavailable: {exc or type(exc).__name__}"}
        if op == "netcheck":
            return await self.netcheck()
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

    async def netcheck(self) -> dict[str, Any]:
        """A fresh NAT measurement, the relay's round trip and the addresses peers could use on our LAN."""
        relay = self.relay_target("")
        verdict, (relay_ms, relay_error) = await asyncio.gather(
            self.nat_probe.call("measure"), tcp_round_trip(relay, timeout=3.0)
        )
        return {
            "ok": True,
            "nat": verdict.as_dict(),
            "server": self.server,
            "relay": {"address": relay, "rtt_ms": relay_ms, "error": relay_error},
            "addresses": sorted(usable_addresses(interface_addresses())),
        }

    async def status(self) -> dict[str, Any]:
        registration = await self._safe(self.registrar, "status")
        nat_status = await self._safe(self.nat_probe, "status")
        nat = nat_status.get("latest") or nat_status
        sessions = await self._session_rows()
        ident = self.identity
        server_key = self.server_key()
        return {
            "ok": True,
            "id": ident.peer_id,
            "fingerprint": ident.fingerprint,
            "peer_spec": spec_for(ident.peer_id, ident.public_key),
            "server": self.server,
            "server_key": fingerprint(server_key) if server_key else "",
            "server_key_b64": base64.b64encode(server_key).decode() if server_key else "",
            "admits_anyone": self._admits_anyone(),
            "embedded": self.embedded,
            "registration": registration,
            "nat": nat,
            "peers": session_view.peer_view(self._known_peers(), sessions),
            "sessions_active": session_view.counts(sessions)[0],
            "sessions_total": session_view.counts(sessions)[1],
            **self.answers.status(),
            "uptime": round(time.monotonic() - self.started, 1),
            "version": VERSION,
        }

    def _known_peers(self) -> list[dict[str, Any]]:
        try:
            return known_peers(self.state_dir)
        except (OSError, ValueError) as exc:  # a config.toml being edited by hand must not break status
            log.warning("cannot list known peers: %s", exc)
            return []

    def _admits_anyone(self) -> bool:
        try:
            return build_policy(self.live_cfg(), self.state_dir) is not None
        except (OSError, ValueError):
            return False

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
        return {"ok": True, "sessions": await self._session_rows()}

    async def _session_rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        plans = [
            {
                "id": sid,
                "peer": plan.peer,
                "role": plan.role,
                "path": plan.path,
                "error": plan.error,
                "age": round(now - plan.created, 3),
                "attempts": [a.as_dict() for a in plan.attempts],
            }
            for sid, plan in self.plans.items()
        ]
        return session_view.join(plans, await self._session_list())

    def new_plan(self, sid: str, peer: str, role: str) -> SessionPlan:
        plan = self.plans[sid] = SessionPlan(sid, peer, role)
        while len(self.plans) > MAX_ATTEMPT_RECORDS:
            del self.plans[next(iter(self.plans))]
        return plan

    # ---- A side: open a stream to a peer --------------------------------------------------

    @property
    def identity(self) -> Identity:
        """This agent's identity as it is now (the registrar may have moved to a new ID)."""
        return self.identities.get()

    def signer(self) -> Signer:
        ident = self.identity
        return Signer(ident.peer_id, ident.signing_key, ident.salt)

    def relay_target(self, announced: str) -> str:
        """Where to dial the relay the rendezvous server named: as named; ":PORT" is the server's own
        host; none is our configured relay, else RustDesk's default (the server's host, port + 1)."""
        host, port = self.server_addr
        if announced.startswith(":"):
            return addrmod.join_host_port(host, int(announced[1:]))
        if announced:
            return announced
        if self.cfg.agent.relay:
            return self.cfg.agent.relay
        return addrmod.join_host_port(host, port + 1)

    def trusted_key(self, peer: str, signed_pk: bytes, want: str | None = None) -> tuple[bytes, str]:
        """B's key: vouched for by the rendezvous server (its signature checked with the key we trust),
        pinned from an earlier session, and of the fingerprint the user named, as far as each is given."""
        pinned = PinStore(self.state_dir).get(peer)
        server_key = self.server_key()
        if signed_pk and server_key is None:
            raise HandshakeError(
                "cannot check the key the rendezvous server gave for peer "
                f"{peer}: its own key is not known yet (this agent has not registered with it)"
            )
        return trusted_peer_key(
            peer, server_key=server_key, signed_id_pk=signed_pk or None, pinned=pinned, want_fingerprint=want
        )

    async def open_stream(self, req: dict[str, Any], local_fd: int) -> dict[str, Any]:
        """A's side: a stream on the running link to the peer if there is one (one round trip), else a
        race for a new link (one race per peer at a time)."""
        peer = str(req.get("peer", ""))
        target = str(req.get("target", ""))
        sid = uuidlib.uuid4().hex[:12]
        plan = self.new_plan(sid, peer, "initiator")

        def fail(reason: str) -> dict[str, Any]:
            plan.error = reason
            return {"ok": False, "error": reason, "session": sid}

        try:
            policy = Policy.parse(str(req["policy"])) if req.get("policy") else self.policy
        except ValueError as exc:
            return fail(str(exc))
        direct = ""
        if "@" in peer:  # ID@HOST[:PORT]: the peer's direct port, no rendezvous server
            peer, _, where = peer.partition("@")
            try:
                direct = await _resolve(where, DIRECT_PORT)
            except (AddressError, OSError) as exc:
                return fail(f"direct address {where!r}: {exc}")
        if not peer:
            return fail("no peer ID given")
        try:
            spec = parse_peer_spec(peer)  # ID, or ID=SHA256:... naming the only key to accept
        except ValueError as exc:
            return fail(str(exc))
        peer = plan.peer = spec.peer_id
        if peer == self.identity.peer_id:
            return fail("that is this agent's own ID")
        started = time.monotonic()
        pinned = self._pinned(peer)
        want = spec.fingerprint or (fingerprint(pinned) if pinned else "")  # a link is only as good as its key
        stream: dict[str, Any] = {"session": sid, "peer": peer, "target": target, "want_key": want}
        stream["paths"] = [s.value for s in Strategy if policy.allows_path(s)]
        if direct:
            stream["paths"] = []  # ID@HOST names the path: a race, not a link found by ID
        lock = self._dialing.setdefault(peer, asyncio.Lock())
        while True:
            reply = await self._on_link(stream, local_fd)
            if reply is not None:
                return self._linked(plan, reply, started)
            if not lock.locked():
                break
            async with lock:
                pass  # another stream's race for a link to this peer: wait for its link (or its failure)
            failed = self._dial_failed.get(peer)
            if failed is not None and failed[0] > started:
                return fail(failed[1])
        async with lock:
            result = await self._race(req, plan, sid, peer, target, spec, policy, direct, local_fd, started)
        if not result.get("ok"):
            self._dial_failed[peer] = (time.monotonic(), str(result.get("error")))
        return result

    async def forward(self, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """`connect -L`: the session owner accepts on the client's listening socket from now on
        (agent/session/forwards.py); fds are the listener and the client's notice socket. The peer
        and policy are checked here, once, as `open` checks them per stream."""
        if len(fds) != 2:
            return {"ok": False, "error": "forward needs a listening socket and a notice socket"}
        peer, target = str(req.get("peer", "")), str(req.get("target", ""))
        if "@" in peer:
            return {"ok": False, "error": "ID@HOST is served per connection", "per_connection": True}
        try:
            policy = Policy.parse(str(req["policy"])) if req.get("policy") else self.policy
            spec = parse_peer_spec(peer)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        if spec.peer_id == self.identity.peer_id:
            return {"ok": False, "error": "that is this agent's own ID"}
        request = {
            "op": "listen",
            "peer": spec.peer_id,
            "target": target,
            "want_spec": spec.fingerprint or "",
            "paths": [s.value for s in Strategy if policy.allows_path(s)],
            "open": {key: req.get(key) for key in ("op", "peer", "target", "policy", "password")} | {"op": "open"},
        }
        try:
            reply = await ctlproto.acall(self.sessions_socket, request, fds, timeout=10)
        except (OSError, TimeoutError, ctlproto.ControlError) as exc:
            return {"ok": False, "error": f"session owner unavailable: {exc or type(exc).__name__}"}
        return reply if isinstance(reply, dict) else {"ok": False, "error": "bad answer from the session owner"}

    async def network_changed(self, reason: str) -> None:
        """The registrar saw this host's network change: the session owner probes its links now."""
        self._nat_cache = None  # the next request waits for the probe's answer, not the old network's
        with contextlib.suppress(OSError, TimeoutError, ctlproto.ControlError):
            await ctlproto.acall(self.sessions_socket, {"op": "network_changed", "reason": reason}, timeout=5)

    async def relink(self, req: dict[str, Any]) -> dict[str, Any]:
        """The session owner asks for a new transport under a running link (a better path, or the old
        one lost): a race as for a new link, whose winner the owner moves the link onto."""
        peer, link = str(req.get("peer", "")), str(req.get("link", ""))
        sid = uuidlib.uuid4().hex[:12]
        plan = self.new_plan(sid, peer, "relink")  # not a session of its own: a race for a link's transport
        try:
            spec = parse_peer_spec(peer)
            policy = Policy.parse(str(req["policy"])) if req.get("policy") else self.policy
        except ValueError as exc:
            plan.error = str(exc)
            return {"ok": False, "error": plan.error}
        pinned = PinStore(self.state_dir).get(peer)
        if pinned is not None:  # the link's key, and no other
            spec = parse_peer_spec(f"{peer}={fingerprint(pinned)}")
        target = str(req.get("target", ""))
        return await self._race({}, plan, sid, peer, target, spec, policy, "", None, time.monotonic(), resume=link)

    def _pinned(self, peer: str) -> bytes | None:
        return self._pins.get(peer)

    async def _on_link(self, stream: dict[str, Any], local_fd: int) -> dict[str, Any] | None:
        """The stream opened on a running link to the peer; None if there is none it may take."""
        if not stream["paths"]:
            return None
        try:
            reply = await ctlproto.acall(self.sessions_socket, {"op": "stream", **stream}, [local_fd], timeout=20)
        except (OSError, TimeoutError, ctlproto.ControlError):
            return None
        if not isinstance(reply, dict) or reply.get("no_link"):
            return None
        return reply

    def _linked(self, plan: SessionPlan, reply: dict[str, Any], started: float) -> dict[str, Any]:
        if not reply.get("ok"):
            plan.error = str(reply.get("error"))
            self.counters.stream("", False)
            return {"ok": False, "error": plan.error, "session": plan.id}
        plan.path = str(reply.get("path", ""))
        self.counters.stream(plan.path, True)
        return {
            "ok": True,
            "session": plan.id,
            "path": plan.path,
            "link": reply.get("link", ""),
            "elapsed_ms": ms_since(started),
        }

    async def _race(
        self,
        req: dict[str, Any],
        plan: SessionPlan,
        sid: str,
        peer: str,
        target: str,
        spec: Any,
        policy: Policy,
        direct: str,
        local_fd: int | None,
        started: float,
        resume: str = "",
    ) -> dict[str, Any]:
        """Race every strategy the plan allows for a new link; the session owner keeps the first transport
        whose authenticated handshake completes and opens this stream on it (`local_fd`), or moves the
        running link `resume` onto it."""
        timeout = float(self.cfg.agent.connect_timeout)

        def fail(reason: str) -> dict[str, Any]:
            plan.error = reason
            return {"ok": False, "error": reason, "session": sid}

        deadline = started + timeout
        keys: dict[str, tuple[bytes, str]] = {}
        race = Race(self, plan, sid, spec, started, deadline, keys)
        race.direct_address = direct
        request = {
            "op": "resume" if resume else "initiate",
            "session": sid,
            "peer": peer,
            "target": target,
            "password": req.get("password"),
            "wait": timeout,
            "link": resume,
            "policy": str(req.get("policy") or ""),
        }
        initiate = asyncio.ensure_future(
            ctlproto.acall(
                self.sessions_socket,
                request,
                [local_fd] if local_fd is not None else [],
                timeout=timeout + 15,
                patience=5,
            )
        )
        strategies = [asyncio.ensure_future(c) for c in race.coroutines(policy)]
        all_done = asyncio.ensure_future(asyncio.gather(*strategies, return_exceptions=True))
        all_done.add_done_callback(_consume)
        over = asyncio.ensure_future(race.over.wait())
        try:
            done, _ = await asyncio.wait({initiate, all_done, over}, return_when=asyncio.FIRST_COMPLETED)
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
            over.cancel()
            # Ray keeps running a call its caller stopped awaiting: tell the strategy actors to stop.
            for name, ref in self.strategies.items():
                if name != "direct":
                    self.spawn(_quietly(Remote(ref).cancel(sid)))
        race.settle(reply.get("transports", []))
        won, ok = str(reply.get("path", "")), bool(reply.get("ok"))
        self.counters.race("relink" if resume else "link", won, ok, plan.attempts)
        if not resume:
            self.counters.stream(won, ok)
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
        return {
            "ok": True,
            "session": sid,
            "path": plan.path,
            "link": reply.get("link", ""),
            "elapsed_ms": ms_since(started),
        }

    # ---- B side: pushes from the rendezvous server ----------------------------------------------

    async def _nat_status(self) -> dict[str, Any]:
        """The NAT probe's status, asked at most once a second: a session asks for the type and the
        behaviour, each rendezvous request again, and the answer changes every few minutes at most.
        Once known, an answer older than that is used while a fresh one is asked for in the
        background: the call to the probe's actor (2-6 ms) used to sit in front of every request."""
        cache = self._nat_cache
        if cache is None:
            return await self._ask_nat_status()
        use = nat_cache_use(time.monotonic() - cache[0], bool(cache[1].get("measurements")))
        if use == "ask":
            return await self._ask_nat_status()
        if use == "stale" and (self._nat_refresh is None or self._nat_refresh.done()):
            self._nat_refresh = asyncio.ensure_future(self._ask_nat_status())
        return cache[1]

    async def _ask_nat_status(self) -> dict[str, Any]:
        status = await self._safe(self.nat_probe, "status")
        if not isinstance(status, dict):
            return {}
        self._nat_cache = (time.monotonic(), status)
        return status

    async def our_nat_type(self) -> int:
        return int((await self._nat_status()).get("nat_type", pb.UNKNOWN_NAT))

    async def our_nat_behavior(self) -> bytes:
        """Our UDP NAT behaviour, serialized for a request or an answer (empty: not measured)."""
        behavior = (await self._nat_status()).get("nat_behavior")
        return NatBehavior(**behavior).to_pb().SerializeToString() if behavior else b""

    async def on_push(self, kind: str, msg: Any, source: Any = None) -> None:
        """A push the registrar received, signed by the server for us: B's side (agent/control/answers.py)."""
        await self.answers.on_push(kind, msg)


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
