"""Assembling an agent from its components: all in one process (tests), or spread over Ray actors
as the placement says (agent/placement.py).

`load_runtime` reads everything a component needs from the state directory (the
effective config written by `punchthrough up`, the identity, the embedded
server's key), so each Ray actor can rebuild its components on its own after a
restart. `build_component` makes one component given references to the others;
`ComponentHost` runs some of them in one event loop (a Ray actor's, or all of
them for `LocalAgent`, the agent without Ray).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import identity as identitymod
from agent.common.keyfile import load_or_create_signing_key
from agent.config import Config
from agent.control.access import ALLOWED_PEERS_FILE, build_policy, load_state_config
from agent.control.coordinator import Coordinator
from agent.control.live_config import CONFIG_FILE, LiveConfig
from agent.control.pins import PINS_FILE, PinMismatch, PinnedKeys, PinStore, ServerPins
from agent.identity import Identity
from agent.nat.watch_core import REMOTE_JITTER, NetworkChanged
from agent.refs import LocalRef, Ref
from agent.runtime_paths import control_socket, sessions_socket, take_udp_blocked_hint
from agent.session.seen import SeenPeers
from agent.strategies import registry
from agent.strategies.base import StrategyEnv
from agent.wire.addr import split_host_port
from agent.wire.nat_behavior import NatBehavior
from agent.wire.ports import RENDEZVOUS_PORT

log = logging.getLogger(__name__)

def components() -> tuple[str, ...]:
    """Every component, in start order (each may call the ones before it): the strategies are the
    registry's (agent/strategies/registry.py)."""
    return ("servers", "sessions", *registry.names(), "nat_probe", "registrar", "coordinator")




@dataclass
class Runtime:
    state_dir: Path
    cfg: Config
    identity: Identity
    server: str
    fixed_server_key: bytes | None
    """The rendezvous server's key as configured (`agent.server_key`), or the embedded server's own."""
    embedded: bool

    def __post_init__(self) -> None:
        self.live = LiveConfig(self.state_dir, self.cfg)
        """The config as edited since the start (`punchthrough allow` ...): who may connect, live."""

    @property
    def server_addr(self) -> tuple[str, int]:
        return split_host_port(self.server, RENDEZVOUS_PORT)

    @property
    def embedded_dir(self) -> Path:
        return self.state_dir / "server"

    def server_key(self) -> bytes | None:
        """The key the rendezvous server must sign with: configured or embedded, else the one pinned on
        first contact (known_servers.json; None until the registrar has met the server)."""
        if self.fixed_server_key is not None:
            return self.fixed_server_key
        return ServerPins(self.state_dir).get(self.server)

    def pin_server_key(self, key: bytes) -> None:
        with contextlib.suppress(PinMismatch):  # the registrar only learns a key when none is pinned
            ServerPins(self.state_dir).check_and_pin(self.server, key)


def load_runtime(state_dir: Path) -> Runtime:
    cfg = load_state_config(state_dir)
    ident = identitymod.load_or_create(state_dir)
    embedded = not cfg.agent.server
    server = cfg.agent.server or f"127.0.0.1:{cfg.embedded.rendezvous_port}"
    key: bytes | None = None
    if cfg.agent.server_key:
        key = base64.b64decode(cfg.agent.server_key)  # checked by config.validate
    elif embedded:
        key = bytes(load_or_create_signing_key(state_dir / "server" / "id_ed25519").verify_key)
    return Runtime(state_dir, cfg, ident, server, key, embedded)


def embedded_relays(cfg: Config) -> list[str]:
    """What the embedded rendezvous server names as its relay: nothing when the relay is on port + 1
    (RustDesk's default, which every client assumes), else ":PORT" on the server's own host."""
    emb = cfg.embedded
    return [] if emb.relay_port == emb.rendezvous_port + 1 else [f":{emb.relay_port}"]


class EmbeddedServers:
    """The zero-configuration default: a rendezvous and a relay server inside the agent."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.rendezvous: Any = None
        self.relay: Any = None

    async def start(self) -> None:
        from agent.servers.relay_server import RelayConfig, start_relay
        from agent.servers.rendezvous_server import RendezvousConfig, start_rendezvous

        emb = self.rt.cfg.embedded
        self.rendezvous = await start_rendezvous(
            RendezvousConfig(
                binds=[emb.bind],
                port=emb.rendezvous_port,
                db_path=self.rt.embedded_dir / "rendezvous.sqlite3",
                key_file=self.rt.embedded_dir / "id_ed25519",
                relays=embedded_relays(self.rt.cfg),
            )
        )
        self.relay = await start_relay(
            RelayConfig(binds=[emb.bind], port=emb.relay_port, server_keys=[self.rendezvous.core.public_key])
        )

    async def close(self) -> None:
        for server in (self.relay, self.rendezvous):
            if server is not None:
                await server.close()

    def status(self) -> dict[str, Any]:
        return {
            "rendezvous": self.rendezvous.stats() if self.rendezvous else None,
            "relay": self.relay.stats() if self.relay else None,
        }


class RegistrarComponent:
    """The registrar plus what it needs from its neighbours: the NAT type, and where pushes go."""

    def __init__(self, rt: Runtime, coordinator: Ref, nat_probe: Ref) -> None:
        from agent.rendezvous.registrar import Registrar

        self.rt = rt
        self.coordinator = coordinator
        self.nat_probe = nat_probe
        self.nat_type = 0
        self.nat_behavior = NatBehavior()
        self._measured = False
        self.registrar = Registrar(
            rt.server_addr,
            rt.identity,
            self._push,
            lambda: self.nat_type,
            nat_behavior_getter=lambda: self.nat_behavior.to_pb(),
            on_id_taken=self._id_taken,
            on_network_change=self._network_changed,
            server_key=rt.server_key(),
            on_server_key=rt.pin_server_key,
        )
        self._task: asyncio.Task[None] | None = None
        self._remeasuring = False
        self._again: NetworkChanged | None = None

    async def _network_changed(self, change: NetworkChanged | None) -> None:
        """Re-measure the NAT now (a local change) or soon (a server hint, spread: see REMOTE_JITTER);
        the new type goes out with the next RegisterPeer at once, and new sessions plan with it."""
        if self._remeasuring:  # a flapping link: one more measurement after this one covers them all
            self._again = change
            return
        if change is not None and change.local:
            with contextlib.suppress(Exception):  # links first: they need no NAT verdict to be probed
                await self.coordinator.call("network_changed", change.reason)
        self._remeasuring = True
        try:
            while change is not None:
                self._again = None
                delay = 0.0 if change.local else random.uniform(0.0, REMOTE_JITTER)
                status = await self.nat_probe.call("remeasure", change.reason, delay)
                self._follow(status)
                self.registrar.nat_type_changed()
                change = self._again
        finally:
            self._remeasuring = False

    async def _push(self, kind: str, msg: Any, source: tuple[str, int]) -> None:
        await self.coordinator.call("on_push", kind, msg, source)

    def _id_taken(self, ident: Any) -> Identity:
        new = identitymod.next_id(self.rt.state_dir, self.rt.identity)
        log.warning("ID %s is bound to another machine; now registering as %s", self.rt.identity.peer_id, new.peer_id)
        self.rt.identity = new
        return new

    def _follow(self, status: dict[str, Any]) -> None:
        self.nat_type = int(status["nat_type"])
        self.nat_behavior = NatBehavior(**status.get("nat_behavior") or {})
        self._measured = self._measured or bool(status.get("measurements"))

    async def _follow_nat(self) -> None:
        """Every 5 s; every 0.5 s until the probe has measured once, so the server has our behaviour (it
        sends a pair that no punch can meet to the relay at once) a moment after the first measurement.
        (Not until the behaviour is known: against a server that cannot measure it, never.)"""
        while True:
            with contextlib.suppress(Exception):
                self._follow(await self.nat_probe.call("status"))
            await asyncio.sleep(5 if self._measured else 0.5)

    async def start(self) -> None:
        hint = take_udp_blocked_hint(self.rt.state_dir)
        if hint:  # `up` just found UDP blocked: register over TCP from the start
            self.registrar.path.prefer_tcp(f"UDP blocked at start: {hint}")
        await self.registrar.start()
        self._task = asyncio.get_running_loop().create_task(self._follow_nat())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.registrar.close()

    def status(self) -> dict[str, Any]:
        return self.registrar.status()


def strategy_env(rt: Runtime) -> StrategyEnv:
    return StrategyEnv(
        state_dir=rt.state_dir,
        sessions_socket=sessions_socket(rt.state_dir),
        server=rt.server_addr,
        relay_key=rt.cfg.agent.relay_key,
        direct_port=rt.cfg.agent.direct_port,
        bind=rt.cfg.embedded.bind,
        birthday=rt.cfg.birthday_budget(),
        birthday_interval=rt.cfg.agent.birthday_interval,
    )


def enabled_components(rt: Runtime) -> list[str]:
    """The components this agent runs: embedded servers only without --server, and each strategy that
    runs here (the direct port only when configured)."""
    env = strategy_env(rt)
    skip = {"servers"} if not rt.embedded else set()
    skip |= {e.name for e in registry.entries() if not e.runs(env)}
    return [kind for kind in components() if kind not in skip]


def _policy_factory(rt: Runtime) -> Any:
    """The policy as it is now, built again only when a file it is built from changed: config.toml,
    allowed_peers, the pins or the password file. Every stream on a link asks; rebuilding each time
    cost ~0.4 ms of file reads."""
    cache: dict[str, Any] = {}

    def stamp(path: Path) -> tuple[int, int, int]:
        """mtime, size and inode: an edit within one timestamp tick still shows (a new inode: state
        files are replaced whole)."""
        try:
            st = path.stat()
        except OSError:
            return (-1, -1, -1)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def factory() -> Any:
        cfg = rt.live.get()
        files = [rt.state_dir / CONFIG_FILE, rt.state_dir / ALLOWED_PEERS_FILE, rt.state_dir / PINS_FILE]
        if cfg.access.password_file:
            files.append(Path(cfg.access.password_file))
        key = tuple(map(stamp, files))
        if cache.get("key") != key:
            cache.update(key=key, policy=build_policy(cfg, rt.state_dir))
        return cache["policy"]

    return factory


def _relink_via_coordinator(rt: Runtime) -> Any:
    """The session owner's way to ask for a race that a running link moves onto (coordinator "relink")."""

    async def relink(request: dict[str, Any]) -> Any:
        from agent.common import ctlproto

        timeout = rt.cfg.agent.connect_timeout + 20
        return await ctlproto.acall(control_socket(rt.state_dir), {"op": "relink", **request}, timeout=timeout)

    return relink


def _open_via_coordinator(rt: Runtime) -> Any:
    """A forward's connection that no running link may take: the coordinator's "open", as the
    `connect` client's own call would have been (agent/session/forwards.py)."""

    async def open_raced(request: dict[str, Any], fd: int) -> Any:
        from agent.common import ctlproto

        timeout = rt.cfg.agent.connect_timeout + 20
        return await ctlproto.acall(control_socket(rt.state_dir), request, [fd], timeout=timeout)

    return open_raced


def _pin_admitted(rt: Runtime) -> Any:
    def pin(peer: str, key: bytes, how: str) -> None:
        with contextlib.suppress(PinMismatch):
            PinStore(rt.state_dir).check_and_pin(peer, key)

    return pin


async def build_component(kind: str, rt: Runtime, refs: dict[str, Ref]) -> Any:
    """Construct and start one component; `refs` reach the others."""
    from agent.nat.probe import NatProbe
    from agent.session.owner import SessionOwner

    comp: Any
    if kind in registry.names():
        comp = registry.entry(kind).build(strategy_env(rt))
    elif kind == "servers":
        comp = EmbeddedServers(rt)
    elif kind == "sessions":
        comp = SessionOwner(
            sessions_socket(rt.state_dir),
            identitymod.IdentityCache(rt.state_dir, rt.identity).get,
            _policy_factory(rt),
            on_admitted=_pin_admitted(rt),
            seen=SeenPeers(rt.state_dir),
            link_idle=rt.cfg.agent.link_idle,
            relink=_relink_via_coordinator(rt),
            open_raced=_open_via_coordinator(rt),
            pinned=PinnedKeys(rt.state_dir).get,
        )
    elif kind == "nat_probe":
        comp = NatProbe(rt.server_addr, rt.cfg.agent.nat_test_port or None)
    elif kind == "registrar":
        comp = RegistrarComponent(rt, refs["coordinator"], refs["nat_probe"])
    elif kind == "coordinator":
        comp = Coordinator(
            state_dir=rt.state_dir,
            cfg=rt.cfg,
            identity=rt.identity,
            server=rt.server,
            server_key=rt.server_key,
            live_cfg=rt.live.get,
            control_socket=control_socket(rt.state_dir),
            sessions_socket=sessions_socket(rt.state_dir),
            registrar=refs["registrar"],
            nat_probe=refs["nat_probe"],
            strategies={name: refs[name] for name in registry.names()},
            embedded=rt.embedded,
        )
    else:
        raise ValueError(f"unknown component {kind!r}")
    if hasattr(comp, "start"):
        await comp.start()
    return comp


class NotRunning(LookupError):
    """A call to a component this agent does not run (a strategy that runs nowhere here, say)."""


class ComponentHost:
    """Some of the agent's components in one event loop: a Ray actor's (actors.agent_actors.HostActor),
    or all of them for LocalAgent. Calls between the components it carries are plain awaits; `remote`
    reaches the others. A call waits until its component is built, so the start order only matters
    for what a component does while it starts."""

    def __init__(self, kinds: list[str], remote: Callable[[str], Ref] | None = None) -> None:
        self.kinds = kinds
        self.components: dict[str, Any] = {}
        self._remote = remote
        self._built: dict[str, asyncio.Future[Any]] = {}

    def ref(self, kind: str) -> Ref:
        if kind in self.kinds:
            return _HostedRef(self, kind)
        if self._remote is None:
            return _Absent(kind)
        return self._remote(kind)

    async def start(self, rt: Runtime) -> None:
        loop = asyncio.get_running_loop()
        for kind in self.kinds:
            self._built.setdefault(kind, loop.create_future())
        refs = {kind: self.ref(kind) for kind in components()}
        for kind in self.kinds:
            try:
                comp = await build_component(kind, rt, refs)
            except BaseException as exc:  # callers waiting for this or a later component hear why
                for future in self._built.values():
                    if not future.done():
                        future.set_exception(NotRunning(f"component {kind!r} failed to start: {exc!r}"))
                        future.exception()  # retrieved: no "never retrieved" noise when nobody was waiting
                raise
            self.components[kind] = comp
            self._built[kind].set_result(comp)

    async def component(self, kind: str) -> Any:
        if kind not in self.kinds:
            raise NotRunning(f"component {kind!r} does not run here")
        if kind not in self._built:
            self._built[kind] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._built[kind])

    async def call(self, kind: str, method: str, *args: Any) -> Any:
        if method.startswith("_"):
            raise AttributeError(f"{method} is private")
        return await LocalRef(await self.component(kind)).call(method, *args)

    async def close(self) -> None:
        for kind in reversed(self.kinds):
            comp = self.components.pop(kind, None)
            if comp is not None and hasattr(comp, "close"):
                with contextlib.suppress(Exception):
                    await comp.close()


class _HostedRef:
    def __init__(self, host: ComponentHost, kind: str) -> None:
        self.host, self.kind = host, kind

    async def call(self, method: str, *args: Any) -> Any:
        return await self.host.call(self.kind, method, *args)


class _Absent:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def call(self, method: str, *args: Any) -> Any:
        raise NotRunning(f"component {self.kind!r} does not run in this agent")


class LocalAgent:
    """Every component in this process and event loop: the agent without Ray, for tests."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.host = ComponentHost([])

    @property
    def components(self) -> dict[str, Any]:
        return self.host.components

    async def start(self) -> LocalAgent:
        rt = load_runtime(self.state_dir)
        self.host.kinds = enabled_components(rt)
        await self.host.start(rt)
        coordinator = self.components["coordinator"]
        for kind in self.host.kinds:
            coordinator.register_actor(kind, os.getpid(), actor="local")
        return self

    async def close(self) -> None:
        await self.host.close()

