"""The A side of one session: every strategy the plan allows, raced.

`Coordinator.open_stream` builds one `Race` per stream request. Each strategy is a
coroutine that asks the rendezvous server (or dials the peer's direct port), picks
the key that vouches for the peer, and hands a transport to the session owner,
which keeps the first one whose authenticated handshake completes. The race only
records what each strategy did (`Attempt`, in the session's `SessionPlan`).

It lives apart from coordinator.py so the control plane (control socket, actor
table) and the strategy race can be read on their own; it needs only a `RaceContext`.
The built-in strategies are raced by the steps below (one PunchHoleRequest serves lan,
tcp_punch and ipv6); a plug-in strategy brings its own step (`StrategyEntry.race`), which
gets this race as its `RaceSteps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.control.pins import PinMismatch, PinStore
from agent.control.plan import DIRECT_BUDGET, LAN_BUDGET, PUNCH_BUDGET, Mode, Policy, Situation, Strategy, make_plan
from agent.proto import rendezvous_pb2 as pb
from agent.refs import Ref
from agent.rendezvous.requests import (
    PeerUnavailable,
    RelayRefused,
    RendezvousError,
    Signer,
    punch_hole_exchange,
    request_relay,
)
from agent.session.states import Outcome
from agent.strategies import registry
from agent.strategies.base import RaceSteps
from agent.strategies.ipv6 import Ipv6Dial, Ipv6Remote, global_v6
from agent.strategies.relay import RelayDial, RelayRemote
from agent.strategies.tcp_direct import TcpDial, TcpDirectRemote
from agent.strategies.udp_punch import UdpDial, UdpPunchRemote
from agent.wire import addr as addrmod
from agent.wire import signing
from agent.wire.handshake import HandshakeError
from agent.wire.nat_behavior import NatBehavior, birthday_role, predicted_ports, punch_outlook
from agent.wire.peer_ids import PeerSpec, fingerprint


class RaceContext(Protocol):
    """What a race needs from the agent around it (the coordinator provides it)."""

    state_dir: Path
    server_addr: tuple[str, int]

    def ref(self, strategy: str) -> Ref: ...

    def server_key(self) -> bytes | None: ...

    def signer(self) -> Signer: ...

    def relay_target(self, announced: str) -> str: ...

    def trusted_key(self, peer: str, signed_pk: bytes, want: str | None = None) -> tuple[bytes, str]: ...

    async def our_nat_type(self) -> int: ...

    async def our_nat_behavior(self) -> bytes: ...


T = TypeVar("T")

log = logging.getLogger("agent.control.coordinator")  # the race logged as the coordinator before it moved here

VERSION = "punchthrough-0.1"
"""The version this agent reports to the rendezvous server (and in `status`)."""
RELAY_REQUEST_WAITS = (2.0, 3.0, 30.0)
"""Seconds to wait for the peer's answer before asking the rendezvous server again."""
IPV6_HEAD_START = 0.25
"""Seconds IPv6 leads IPv4 when both are possible (RFC 8305's connection attempt delay)."""


@dataclass
class Attempt:
    strategy: str
    outcome: Outcome
    reason: str = ""
    elapsed_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "elapsed_ms": self.elapsed_ms,
        }


@dataclass
class SessionPlan:
    id: str
    peer: str
    role: str
    attempts: list[Attempt] = field(default_factory=list)
    error: str = ""
    path: str = ""
    created: float = field(default_factory=time.monotonic)


def ms_since(started: float) -> float:
    """Milliseconds since `started` (a time.monotonic() reading), rounded to 0.1."""
    return round((time.monotonic() - started) * 1000, 1)


class Race:
    """One session's strategies, as coroutines that each hand a transport to the session owner."""

    def __init__(
        self,
        coord: RaceContext,
        plan: SessionPlan,
        sid: str,
        spec: PeerSpec,
        started: float,
        deadline: float,
        keys: dict[str, tuple[bytes, str]],
    ) -> None:
        self.coord, self.plan, self.sid, self.peer = coord, plan, sid, spec.peer_id
        self.session = sid
        self.lan = TcpDirectRemote(coord.ref("lan"))
        self.tcp_punch = TcpDirectRemote(coord.ref("tcp_punch"))
        self.udp_punch = UdpPunchRemote(coord.ref("udp_punch"))
        self.ipv6 = Ipv6Remote(coord.ref("ipv6"))
        self.relay_remote = RelayRemote(coord.ref("relay"))
        self.want = spec.fingerprint
        """The fingerprint the user named for the peer's key (ID=SHA256:...), if any."""
        self.started, self.deadline, self.keys = started, deadline, keys
        self.errors: list[str] = []
        self.handed: set[str] = set()
        self.fatal = ""
        self.over = asyncio.Event()
        """Set with `fatal`: the answer holds for every path (the peer is unknown or refused us)."""
        self.direct_address = ""
        self.direct_running = 0
        self.direct_over = asyncio.Event()
        self.policy = Policy()
        self._relay_stagger = float("inf")
        self._relay_wake = asyncio.Event()
        self._v4_go = asyncio.Event()
        """Happy Eyeballs: set when IPv4 punches may go (the IPv6 attempt had its head start, or there
        is none), for the UDP punch as for the TCP one."""
        self._v4_gate: asyncio.Future[None] | None = None
        self._v6_here = False
        """The policy allows IPv6 and this host has a global IPv6 address (looked up once per race)."""

    def coroutines(self, policy: Policy) -> list[Any]:
        """The race as the plan allows it, planned before the peer has answered (optimistic about
        UDP and IPv6; each rendezvous coroutine re-plans with the peer's answer)."""
        self.direct_over = asyncio.Event()
        self.policy = policy
        if self.direct_address:
            return [self.direct()]
        plan = make_plan(Situation(our_udp=True, peer_udp=True, v6_both=True), policy)
        steps = {step.strategy: step for step in plan.steps}
        for strategy, why in plan.skipped:
            if strategy in (Strategy.TCP_PUNCH, Strategy.UDP_PUNCH, Strategy.RELAY):
                self._record(str(strategy), Outcome.SKIPPED, why)
        coros: list[Any] = []
        if Strategy.TCP_PUNCH in steps or Strategy.LAN in steps or Strategy.IPV6 in steps:
            coros.append(self._direct())
        self._v6_here = policy.ipv6 and global_v6() is not None
        if Strategy.IPV6 not in steps or not self._v6_here:
            self._v4_go.set()
        if Strategy.UDP_PUNCH in steps:
            coros.append(self.udp_rendezvous())
        for extra in registry.entries():
            if extra.race is None:
                continue
            if policy.mode is Mode.RELAY_ONLY:
                self._record(extra.name, Outcome.SKIPPED, "relay-only policy")
            else:
                coros.append(self._plugin(extra.race))
        if not coros:
            self.direct_over.set()
        if Strategy.RELAY in steps:
            coros.append(self.relay(steps[Strategy.RELAY].delay))
        return coros

    async def _direct(self) -> None:
        self.direct_running += 1
        try:
            await self.tcp_rendezvous()
        finally:
            self._direct_done()

    async def _plugin(self, step: Callable[[RaceSteps], Awaitable[None]]) -> None:
        """A plug-in strategy's own step: a direct path like the others (the relay waits for it)."""
        self.direct_running += 1
        try:
            await step(self)
        finally:
            self._direct_done()

    # ---- RaceSteps: what a plug-in strategy's step may use ----------------------------------

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def ref(self, name: str) -> Ref:
        return self.coord.ref(name)

    def pinned_key(self) -> bytes | None:
        pinned = PinStore(self.coord.state_dir).get(self.peer)
        if pinned is not None and self.want is not None and fingerprint(pinned) != self.want:
            return None
        return pinned

    def use_key(self, strategy: str, peer_pk: bytes, source: str) -> None:
        self.keys[strategy] = (peer_pk, source)

    def running(self, strategy: str) -> None:
        self._record(strategy, Outcome.RUNNING)

    def connected(self, strategy: str) -> None:
        self.handed.add(strategy)
        self._record(strategy, Outcome.CONNECTED)

    def error(self, strategy: str, reason: str) -> None:
        self._record(strategy, Outcome.ERROR, reason)

    def skipped(self, strategy: str, reason: str) -> None:
        self._record(strategy, Outcome.SKIPPED, reason)

    # ---- the built-in steps -----------------------------------------------------------------

    def _direct_done(self) -> None:
        self.direct_running -= 1
        if self.direct_running <= 0 and not self.handed:
            self.direct_over.set()

    async def direct(self) -> None:
        """The peer's direct port: no rendezvous, so only a key pinned earlier can vouch for the peer."""
        pinned = PinStore(self.coord.state_dir).get(self.peer)
        if pinned is None:
            self._record(
                "direct",
                Outcome.ERROR,
                f"no key pinned for peer {self.peer}: reach it once through the rendezvous server first",
            )
            return
        if self.want is not None and fingerprint(pinned) != self.want:
            self._record(
                "direct", Outcome.ERROR, f"peer {self.peer} is pinned to key {fingerprint(pinned)}, not {self.want}"
            )
            return
        self.keys["direct"] = (pinned, "pinned")
        self._record("direct", Outcome.RUNNING)
        meta = {"peer_pk": pinned, "key_source": "pinned"}
        res = await self.lan.dial(TcpDial(self.sid, self.direct_address, None, DIRECT_BUDGET, meta, "direct"))
        if res.ok:
            self.handed.add("direct")
            self._record("direct", Outcome.CONNECTED)
        else:
            self._record("direct", Outcome.ERROR, res.reason)

    async def _asked(self, strategy: str, request: Awaitable[T]) -> T | None:
        """The rendezvous server's answer to `request`, or None once its failure is recorded: a refusal
        ends the race (the peer said no, on every path), any other error only `strategy`."""
        try:
            return await request
        except RelayRefused as exc:
            self._fail(strategy, str(exc))
        except RendezvousError as exc:
            self._record(strategy, Outcome.ERROR, str(exc))
        return None

    async def udp_rendezvous(self) -> None:
        """PunchHoleRequest with our UDP mapping: B answers from its own UDP socket (the server tells
        us its mapping, is_udp), both punch, and KCP runs on the punched socket."""
        self.direct_running += 1
        coord = self.coord
        self._record("udp_punch", Outcome.RUNNING)
        try:
            port = await self.udp_punch.prepare(self.sid)
            if not port:
                self._record("udp_punch", Outcome.SKIPPED, "no UDP mapping (UDP blocked or the server did not answer)")
                return
            res = await self._asked(
                "udp_punch",
                punch_hole_exchange(
                    coord.server_addr,
                    self.peer,
                    await coord.our_nat_type(),
                    timeout=max(0.5, self.deadline - time.monotonic()),
                    version=VERSION,
                    udp_port=port,
                    signer=coord.signer(),
                    nat_behavior=await coord.our_nat_behavior(),
                    direct_only=self.policy.mode is Mode.DIRECT_ONLY,
                ),
            )
            if res is None:
                return
            resp = res.response
            if isinstance(resp, pb.RelayResponse) or not resp.is_udp:
                self._record("udp_punch", Outcome.SKIPPED, "the server did not offer a UDP path (same LAN or relay)")
                return
            try:
                pk, source = coord.trusted_key(self.peer, bytes(resp.pk), self.want)
            except (HandshakeError, PinMismatch) as exc:
                self._record("udp_punch", Outcome.ERROR, str(exc))
                return
            self.keys["udp_punch"] = (pk, source)
            peer_sockaddr = addrmod.decode(bytes(resp.socket_addr))
            # a sequential NAT on the peer's side: punch where it will map the peer's socket next too
            ours = NatBehavior.from_wire(await coord.our_nat_behavior())
            theirs = NatBehavior.from_pb(resp.nat_behavior)
            predict = predicted_ports(peer_sockaddr.port, theirs, ours)
            # the server asked the peer for birthday probing (a direct-only request: a link on the relay
            # looking for a direct path, and NATs that call for it): we take our part in it
            birthday = (birthday_role(ours, theirs) or "") if resp.birthday else ""
            outlook = punch_outlook(ours, theirs)
            if not birthday and not outlook.possible:  # the server did not know: the peer's answer tells us
                self._record("udp_punch", Outcome.SKIPPED, f"cannot meet: {outlook.how}")
                return
            meta = {"peer_pk": pk, "key_source": source}
            with contextlib.suppress(TimeoutError):  # the TCP answer says whether an IPv6 attempt runs
                await asyncio.wait_for(self._v4_go.wait(), IPV6_HEAD_START)
            dial = await self.udp_punch.dial(
                UdpDial(self.sid, str(peer_sockaddr), PUNCH_BUDGET, meta, tuple(predict), birthday)
            )
            if dial.ok:
                self.handed.add("udp_punch")
                self._record("udp_punch", Outcome.CONNECTED)
            else:
                self._record("udp_punch", Outcome.ERROR, dial.reason)
        finally:
            with contextlib.suppress(Exception):
                await self.udp_punch.release(self.sid)
            self._direct_done()

    async def tcp_rendezvous(self) -> None:
        """PunchHoleRequest over TCP: the server answers with B's LAN address (same LAN), B's public
        address after B opened its NAT (TCP punch), or a relay (B or the server chose it)."""
        try:
            await self._tcp_rendezvous()
        finally:
            if self._v4_gate is None:  # no answer, or no IPv6 attempt: nothing to wait for
                self._v4_go.set()

    def _v4_after(self, v6_task: asyncio.Future[None]) -> None:
        """IPv4 punches go once the IPv6 attempt has had IPV6_HEAD_START seconds, or sooner if it failed.
        One that got through keeps the whole head start: its handshake is under way, and IPv4 attempts
        started beside it only took CPU from it (ipv6 first byte 34 -> 46-53 ms in the lab)."""

        async def gate() -> None:
            loop = asyncio.get_running_loop()
            until = loop.time() + IPV6_HEAD_START
            await asyncio.wait({v6_task}, timeout=IPV6_HEAD_START)
            if "ipv6" in self.handed:
                await asyncio.sleep(max(0.0, until - loop.time()))
            self._v4_go.set()

        self._v4_gate = asyncio.ensure_future(gate())

    async def _tcp_rendezvous(self) -> None:
        coord = self.coord
        self._record("tcp_punch", Outcome.RUNNING)
        our_nat = await coord.our_nat_type()
        our_behavior = await coord.our_nat_behavior()
        our_v6: bytes = await self.ipv6.prepare(self.sid) if self._v6_here else b""
        try:
            res = await punch_hole_exchange(
                coord.server_addr,
                self.peer,
                our_nat,
                timeout=max(0.5, self.deadline - time.monotonic()),
                version=VERSION,
                socket_addr_v6=our_v6,
                signer=coord.signer(),
                nat_behavior=our_behavior,
                direct_only=self.policy.mode is Mode.DIRECT_ONLY,
            )
        except (PeerUnavailable, RelayRefused) as exc:
            self._fail("tcp_punch", str(exc))
            return
        except RendezvousError as exc:
            self._record("tcp_punch", Outcome.ERROR, str(exc))
            return
        resp = res.response
        if isinstance(resp, pb.RelayResponse):
            self._record("tcp_punch", Outcome.SKIPPED, "the rendezvous server or the peer chose the relay")
            await self._dial_relay(resp)
            return
        try:
            pk, source = coord.trusted_key(self.peer, bytes(resp.pk), self.want)
        except (HandshakeError, PinMismatch) as exc:
            self._record("tcp_punch", Outcome.ERROR, str(exc))
            return
        is_local = resp.WhichOneof("union") == "is_local" and resp.is_local
        name = "lan" if is_local else "tcp_punch"
        peer_sockaddr = addrmod.decode(bytes(resp.socket_addr))
        if not dialable(peer_sockaddr):
            self._record(name, Outcome.ERROR, f"the peer's address {peer_sockaddr} is not one to connect to")
            return
        peer_addr = str(peer_sockaddr)
        meta = {"peer_pk": pk, "key_source": source}
        v6_task = None
        peer_v6 = bytes(resp.socket_addr_v6)
        if our_v6 and addrmod.global_unicast_v6(peer_v6) and not is_local:
            self.keys["ipv6"] = (pk, source)
            v6_task = asyncio.ensure_future(self._ipv6(peer_v6, meta))
            self._v4_after(v6_task)
        else:
            self._v4_go.set()  # the peer offers no IPv6 (or is on our LAN): IPv4 goes now
            if our_v6:
                await self.ipv6.release(self.sid)
        try:
            skip = ""
            if not is_local:
                peer_nat = resp.nat_type if resp.WhichOneof("union") == "nat_type" else pb.UNKNOWN_NAT
                # Re-planned with what the peer's answer told us: TCP punching may be pointless, and
                # the relay may be due sooner than planned before anything was known.
                sit = Situation(
                    our_nat,
                    peer_nat,
                    our_udp=True,
                    peer_udp=True,
                    v6_both=v6_task is not None,
                    our_behavior=NatBehavior.from_wire(our_behavior),
                    peer_behavior=NatBehavior.from_pb(resp.nat_behavior),
                )
                replan = make_plan(sit, self.policy)
                skip = dict(replan.skipped).get(Strategy.TCP_PUNCH, "")
                for step in replan.steps:
                    if step.strategy is Strategy.RELAY:
                        self.relay_sooner(step.delay)
            if skip:
                self._record("tcp_punch", Outcome.SKIPPED, skip)
                return
            self.keys[name] = (pk, source)
            if is_local:  # the server found both behind one public address: a LAN connection, not a punch
                for attempt in self.plan.attempts:
                    if attempt.strategy == "tcp_punch" and attempt.outcome == Outcome.RUNNING:
                        attempt.strategy = "lan"
            await self._v4_go.wait()  # Happy Eyeballs: v6 first, v4 a moment later
            budget = LAN_BUDGET if is_local else PUNCH_BUDGET
            bind = None if is_local else res.local_address.as_tuple()
            remote = self.lan if is_local else self.tcp_punch
            dial = await remote.dial(TcpDial(self.sid, peer_addr, bind, budget, meta))
            if dial.ok:
                self.handed.add(name)
                self._record(name, Outcome.CONNECTED)
            else:
                self._record(name, Outcome.ERROR, dial.reason)
        finally:
            if v6_task is not None:
                await v6_task

    async def _ipv6(self, peer_v6: bytes, meta: dict[str, Any]) -> None:
        self._record("ipv6", Outcome.RUNNING)
        res = await self.ipv6.dial(Ipv6Dial(self.sid, peer_v6, "initiator", PUNCH_BUDGET, meta))
        if res.ok:
            self.handed.add("ipv6")
            self._record("ipv6", Outcome.CONNECTED)
        else:
            self._record("ipv6", Outcome.ERROR, res.reason)

    def _fail(self, strategy: str, reason: str) -> None:
        """An answer that holds for every path: record it and end the race now."""
        self._record(strategy, Outcome.ERROR, reason)
        self.fatal = self.fatal or reason
        self.over.set()

    def _record(self, strategy: str, outcome: Outcome, reason: str = "") -> None:
        """An attempt's outcome; a "running" entry of the same strategy is updated in place."""
        for attempt in self.plan.attempts:
            if attempt.strategy == strategy and attempt.outcome == Outcome.RUNNING:
                attempt.outcome, attempt.reason, attempt.elapsed_ms = outcome, reason, ms_since(self.started)
                break
            skip_again = outcome in (Outcome.SKIPPED, Outcome.RUNNING) and attempt.outcome == Outcome.SKIPPED
            if attempt.strategy == strategy and skip_again:
                return  # decided already (planned before and after the peer answered)
        else:
            self.plan.attempts.append(Attempt(strategy, outcome, reason, ms_since(self.started)))
        log.info("session %s to %s: %s %s%s", self.sid, self.peer, strategy, outcome, f" ({reason})" if reason else "")
        if outcome == Outcome.ERROR:
            self.errors.append(reason)

    def settle(self, transports: list[dict[str, Any]]) -> None:
        """Fold the session owner's per-transport outcomes (won / lost the race / failed) into the attempts."""
        for t in transports:
            for attempt in self.plan.attempts:
                # "running": the winner's transport can reach the session owner before its
                # strategy call has returned to us
                if attempt.strategy == t.get("path") and attempt.outcome in (Outcome.CONNECTED, Outcome.RUNNING):
                    attempt.outcome = Outcome(str(t.get("outcome")))
                    attempt.reason = str(t.get("reason", ""))
                    attempt.elapsed_ms = ms_since(self.started)
                    break
        won = any(t.get("outcome") == Outcome.WON for t in transports)
        for attempt in self.plan.attempts:
            if attempt.outcome in (Outcome.CONNECTED, Outcome.RUNNING):
                attempt.outcome = Outcome.CANCELLED
                attempt.reason = attempt.reason or ("another path won first" if won else "stopped: no path won")
                attempt.elapsed_ms = ms_since(self.started)

    def relay_sooner(self, stagger: float) -> None:
        """The peer's answer says the direct paths are a long shot: the relay joins `stagger` s after
        the race began instead of the stagger planned before anything was known."""
        self._relay_stagger = min(self._relay_stagger, stagger)
        self._relay_wake.set()

    async def relay(self, stagger: float) -> None:
        """After the stagger (or once every direct attempt failed), ask for the relay."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        self._relay_stagger = min(self._relay_stagger, stagger)
        while not self.direct_over.is_set():
            left = began + self._relay_stagger - loop.time()
            if left <= 0:
                break
            self._relay_wake.clear()
            waits = [asyncio.ensure_future(self.direct_over.wait()), asyncio.ensure_future(self._relay_wake.wait())]
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        if self.fatal:
            return
        self._record("relay", Outcome.RUNNING)
        rr = await self._asked("relay", self._request_relay())
        if rr is None:
            return
        await self._dial_relay(rr)

    async def _request_relay(self) -> Any:
        """RequestRelay, asked again on silence: a push lost in flight (UDP, or the peer's registrar
        restarting) costs one short wait, not the whole budget. RustDesk also asks three times.
        The server picks the relay and a fresh uuid each time (a late answer never pairs with a retry)."""
        peer, deadline = self.peer, self.deadline
        waits = RELAY_REQUEST_WAITS
        for i, wait in enumerate(waits):
            left = deadline - time.monotonic()
            last = i == len(waits) - 1 or left <= wait
            try:
                return await request_relay(
                    self.coord.server_addr,
                    peer,
                    timeout=max(0.5, left if last else wait),
                    signer=self.coord.signer(),
                )
            except RelayRefused:
                raise
            except RendezvousError:
                if last:
                    raise
        raise RendezvousError(f"no relay answer from peer {peer}")  # pragma: no cover - loop returns or raises

    async def _dial_relay(self, rr: Any) -> None:
        """Join the relay the server named, with its ticket: both checked with the server's key first,
        so nobody but the server chooses where we connect."""
        coord = self.coord
        try:
            pk, source = coord.trusted_key(self.peer, rr.pk if rr.WhichOneof("union") == "pk" else b"", self.want)
        except (HandshakeError, PinMismatch) as exc:
            self._record("relay", Outcome.ERROR, str(exc))
            return
        server_key = coord.server_key()
        try:
            if server_key is None:
                raise signing.SignatureError("the rendezvous server's key is not known yet")
            signing.check_ticket((server_key,), bytes(rr.ticket), rr.uuid, rr.relay_server, time.time())
        except signing.SignatureError as exc:
            self._record("relay", Outcome.ERROR, f"relay ticket from the rendezvous server: {exc}")
            return
        self.keys["relay"] = (pk, source)
        self._record("relay", Outcome.RUNNING)  # its transport may win before the dial returns here
        dial = await self.relay_remote.dial(
            RelayDial(
                self.sid,
                coord.relay_target(rr.relay_server),
                rr.uuid,
                bytes(rr.ticket),
                rr.relay_server,
                self.peer,
                "initiator",
                {"peer_pk": pk, "key_source": source},
            )
        )
        if dial.ok:
            self._record("relay", Outcome.CONNECTED)
        else:
            self._record("relay", Outcome.ERROR, dial.reason)


def dialable(a: addrmod.SockAddr) -> bool:
    """An address from a peer's answer (its LAN or public address) that we may connect to: a unicast
    address with a port, never unspecified, multicast or broadcast."""
    ip = a.ip
    return bool(a.port) and not (ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255")
