"""B's side: the pushes the rendezvous server signed for us, answered only for a peer we would admit.

A push says a peer (A) wants in and how: punch TCP (PunchHole), punch UDP (PunchHole with a UDP
port), connect on the LAN (FetchLocalAddr) or meet at a relay (RequestRelay). For a peer this agent
would not admit nothing happens on the network; only our own server hears why, so A learns it at
once. Every answer is recorded as a plan the sessions table shows (`agent/session/view.py` folds
the answers to one request into one session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from agent.common.stats import DropStats
from agent.config import Config
from agent.control.access import allowed, build_policy
from agent.control.plan import LAN_BUDGET, PUNCH_BUDGET, Policy
from agent.control.race import VERSION, Attempt, SessionPlan, ms_since
from agent.identity import Identity
from agent.refs import Ref
from agent.rendezvous.requests import RendezvousError, Reply, send_relay_response
from agent.session.states import Outcome
from agent.strategies.base import Answer, Result
from agent.strategies.ipv6 import Ipv6Dial, Ipv6Remote
from agent.strategies.relay import RelayDial, RelayRemote
from agent.strategies.tcp_direct import TcpDirectRemote
from agent.strategies.udp_punch import UdpPunchRemote
from agent.wire import addr as addrmod
from agent.wire.handshake import Binding, not_admitted_text
from agent.wire.peer_ids import fingerprint

log = logging.getLogger("agent.control.coordinator")  # B's answers logged as the coordinator, as always


class AnswerContext(Protocol):
    """What the answers need from the coordinator."""

    state_dir: Path
    server_addr: tuple[str, int]
    policy: Policy
    """This agent's path policy (a peer's request cannot turn on what it disables)."""

    @property
    def identity(self) -> Identity: ...

    def live_cfg(self) -> Config: ...

    def ref(self, strategy: str) -> Ref: ...

    def new_plan(self, sid: str, peer: str, role: str) -> SessionPlan: ...

    def relay_target(self, announced: str) -> str: ...

    async def our_nat_type(self) -> int: ...

    async def our_nat_behavior(self) -> bytes: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...


def push_binding(msg: Any) -> Binding | None:
    """Who the server says asks (it checked the request's signature), with the key bound to that ID."""
    peer_id, pk = str(msg.requester_id), bytes(msg.requester_pk)
    if not peer_id or len(pk) != 32:
        return None
    return Binding(peer_id, pk)


class PushAnswers:
    def __init__(self, ctx: AnswerContext) -> None:
        self.ctx = ctx
        self.pushes: Counter[str] = Counter()
        self.pushes_refused: Counter[str] = Counter()
        self._refusal_log = DropStats(60.0)
        self.lan = TcpDirectRemote(ctx.ref("lan"))
        self.tcp_punch = TcpDirectRemote(ctx.ref("tcp_punch"))
        self.udp_punch = UdpPunchRemote(ctx.ref("udp_punch"))
        self.ipv6 = Ipv6Remote(ctx.ref("ipv6"))
        self.relay = RelayRemote(ctx.ref("relay"))

    async def on_push(self, kind: str, msg: Any) -> None:
        """A push the server signed for us: act on it only for a peer we would admit."""
        self.pushes[kind] += 1
        handler: Callable[[Any, dict[str, Any]], Coroutine[Any, Any, None]] | None = {
            "request_relay": self._relay,
            "punch_hole": self._punch,
            "fetch_local_addr": self._lan,
        }.get(kind)
        if handler is None:
            return
        binding = push_binding(msg)
        try:
            policy = build_policy(self.ctx.live_cfg(), self.ctx.state_dir)
        except (OSError, ValueError) as exc:
            log.error("cannot build the access policy: %s", exc)
            policy = None
        if policy is None or not policy.would_admit(binding):
            self._refuse(kind, msg, binding, "this agent admits nobody yet" if policy is None else "")
            return
        meta: dict[str, Any] = {"peer_ip": str(addrmod.decode(bytes(msg.socket_addr)).ip)}
        if binding is not None:
            meta.update(binding_id=binding.peer_id, binding_pk=binding.public_key)
        self.ctx.spawn(handler(msg, meta))

    def status(self) -> dict[str, Any]:
        return {"pushes": dict(self.pushes), "pushes_refused": dict(self.pushes_refused)}

    # ---- refusing ---------------------------------------------------------------------------

    def _refuse(self, kind: str, msg: Any, binding: Binding | None, why: str) -> None:
        """Nothing on the network for a peer we would not admit: no punch, no connection, no relay.
        Only our own server hears (one RelayResponse with the reason, RustDesk's way of turning A
        away), so the peer learns why at once instead of waiting out its budget."""
        who = binding.peer_id if binding is not None else "an unnamed requester"
        reason = why or f"{who} is not on this agent's allow list"
        text = reason
        if binding is not None:
            typos = self._allowed_elsewhere(binding)
            text = not_admitted_text(self.ctx.identity.peer_id, binding.peer_id, binding.public_key, reason, typos)
        self.pushes_refused["not admitted" if binding is not None else "unnamed requester"] += 1
        if self._refusal_log.drop(kind, who, time.monotonic()):
            log.warning("ignored a %s push: %s", kind, text)
        self.ctx.spawn(
            _quietly(
                send_relay_response(
                    self.ctx.server_addr, Reply.to(msg, self.ctx.identity.peer_id, "", VERSION), "", refuse_reason=text
                )
            )
        )

    def _allowed_elsewhere(self, binding: Binding) -> list[str]:
        """The IDs an allow entry names for this key, other than the one it came with."""
        try:
            entries = allowed(self.ctx.live_cfg(), self.ctx.state_dir)
        except (OSError, ValueError):
            return []
        want = fingerprint(binding.public_key)
        return [pid for pid, fp in entries.items() if fp == want and pid != binding.peer_id]

    # ---- answering ----------------------------------------------------------------------------

    def _new_plan(self, meta: dict[str, Any]) -> tuple[str, SessionPlan]:
        sid = uuidlib.uuid4().hex[:12]
        return sid, self.ctx.new_plan(sid, str(meta.get("binding_id", "")), "responder")

    async def _punch(self, msg: Any, meta: dict[str, Any]) -> None:
        policy = self.ctx.policy
        if msg.udp_port > 0:
            if policy.udp:
                await self._answer("udp_punch", msg, PUNCH_BUDGET, meta)
            return
        v6 = b""
        peer_v6 = bytes(msg.socket_addr_v6)
        if addrmod.global_unicast_v6(peer_v6) and policy.ipv6:
            sid = uuidlib.uuid4().hex[:12]
            v6 = await self.ipv6.prepare(sid)
            if v6:
                plan = self.ctx.new_plan(sid, str(meta.get("binding_id", "")), "responder")
                self.ctx.spawn(self._v6(sid, plan, peer_v6, meta))
        await self._answer("tcp_punch", msg, PUNCH_BUDGET, meta, v6)

    async def _lan(self, msg: Any, meta: dict[str, Any]) -> None:
        await self._answer("lan", msg, LAN_BUDGET, meta)

    async def _v6(self, sid: str, plan: SessionPlan, peer_v6: bytes, meta: dict[str, Any]) -> None:
        plan.path = "ipv6"
        started = time.monotonic()
        res = await self.ipv6.dial(Ipv6Dial(sid, peer_v6, "responder", PUNCH_BUDGET, meta))
        self._note(plan, "ipv6", res, started)

    async def _answer(self, name: str, msg: Any, budget: float, meta: dict[str, Any], v6: bytes = b"") -> None:
        sid, plan = self._new_plan(meta)
        started = time.monotonic()
        ctx = self.ctx
        request = Answer(
            sid, msg, ctx.identity.peer_id, await ctx.our_nat_type(), msg.relay_server, budget, meta, v6,
            await ctx.our_nat_behavior(),
        )
        remotes: dict[str, TcpDirectRemote | UdpPunchRemote] = {
            "lan": self.lan,
            "tcp_punch": self.tcp_punch,
            "udp_punch": self.udp_punch,
        }
        remote = remotes[name]
        plan.path = name
        self._note(plan, name, await remote.answer(request), started)

    async def _relay(self, msg: Any, meta: dict[str, Any]) -> None:
        sid, plan = self._new_plan(meta)
        started = time.monotonic()
        ctx = self.ctx
        try:
            reply = Reply.to(msg, ctx.identity.peer_id, msg.relay_server, VERSION)
            await send_relay_response(ctx.server_addr, reply, msg.uuid)
        except RendezvousError as exc:
            self._note(plan, "relay", Result.failed(str(exc)), started)
            return
        dial = RelayDial(
            sid,
            ctx.relay_target(msg.relay_server),
            msg.uuid,
            bytes(msg.ticket),
            msg.relay_server,
            ctx.identity.peer_id,
            "responder",
            meta,
        )
        plan.path = "relay"
        self._note(plan, "relay", await self.relay.dial(dial), started)

    @staticmethod
    def _note(plan: SessionPlan, name: str, res: Result, started: float) -> None:
        outcome = Outcome.CONNECTED if res.ok else Outcome.ERROR
        plan.attempts.append(Attempt(name, outcome, res.reason, ms_since(started)))
        log.info("answered %s push (session %s): %s", name, plan.id, "connected" if res.ok else res.reason)
        if not res.ok:
            plan.error = res.reason


async def _quietly(aw: Coroutine[Any, Any, Any]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(aw, 5)
