"""Fixtures for agent tests: real servers on loopback and agents with their own state dirs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.client import loopback_pair
from agent.common import ctlproto
from agent.config import Config
from agent.control.access import save_state_config
from agent.identity import load_or_create
from agent.runtime_paths import control_socket
from agent.servers.relay_server import RelayConfig, start_relay
from agent.servers.rendezvous_core import Limits
from agent.servers.rendezvous_server import RendezvousConfig, start_rendezvous
from agent.stack import LocalAgent


@dataclass
class Servers:
    rendezvous: Any
    relay: Any
    server: str
    relay_addr: str
    key_b64: str


def rendezvous_config(
    srv_dir: Path, port: int = 0, nat_test_port: int | None = None, limits: Limits | None = None
) -> RendezvousConfig:
    """A loopback rendezvous server keeping its database and key in `srv_dir` (so a restart with
    the same dir and ports is the same server)."""
    return RendezvousConfig(
        binds=["127.0.0.1"],
        port=port,
        nat_test_port=nat_test_port,
        db_path=srv_dir / "rv.sqlite3",
        key_file=srv_dir / "rv_key",
        limits=limits or Limits(),
    )


def relay_config(port: int = 0, **options: Any) -> RelayConfig:
    """A loopback relay (ephemeral port by default); `options` set other RelayConfig fields (limits, key...)."""
    return RelayConfig(binds=["127.0.0.1"], port=port, **options)


async def start_servers(
    tmp: Path, rendezvous: RendezvousConfig | None = None, relay: RelayConfig | None = None
) -> Servers:
    """Rendezvous + relay on loopback; by default ephemeral ports and files under `tmp`. The relay
    honours the rendezvous server's tickets unless its config names other servers (or is open)."""
    rv = await start_rendezvous(rendezvous or rendezvous_config(tmp))
    relay = relay or relay_config()
    if not relay.server_keys and not relay.open:
        relay.server_keys = [rv.core.public_key]
    try:
        rl = await start_relay(relay)
    except BaseException:
        await rv.close()
        raise
    return Servers(rv, rl, f"127.0.0.1:{rv.ports['tcp']}", f"127.0.0.1:{rl.port}", rv.public_key_b64)


def agent_config(servers: Servers, **access: Any) -> Config:
    cfg = Config()
    cfg.agent.server = servers.server
    cfg.agent.server_key = servers.key_b64
    cfg.agent.relay = servers.relay_addr
    cfg.agent.nat_test_port = servers.rendezvous.ports["nat_test"]
    cfg.agent.connect_timeout = 8.0
    for key, value in access.items():
        setattr(cfg.access, key, value)
    return cfg


def prepare_state(state_dir: Path, cfg: Config) -> str:
    """Write config and identity; returns the agent's ID."""
    state_dir.mkdir(parents=True, exist_ok=True)
    save_state_config(state_dir, cfg)
    return load_or_create(state_dir).peer_id


async def open_stream(
    state_dir: Path, peer: str, target: str, password: str | None = None, path: str = "auto"
) -> tuple[socket.socket | None, dict[str, Any]]:
    """What `punchthrough pipe` does, in-loop: our end of a socketpair, or None and the error."""
    mine, theirs = loopback_pair()  # as `punchthrough pipe` does: TCP carries the reset of a failed session
    try:
        reply = await ctlproto.acall(
            control_socket(state_dir),
            {"op": "open", "peer": peer, "target": target, "password": password, "policy": path},
            [theirs.fileno()],
            timeout=30,
        )
    finally:
        theirs.close()
    if not reply.get("ok"):
        mine.close()
        return None, reply
    mine.setblocking(False)
    return mine, reply


async def echo_server() -> tuple[asyncio.Server, str]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"


async def wait_registered(agent: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not agent.components["registrar"].registrar.registered.is_set():
            await asyncio.sleep(0.05)


@dataclass
class AgentPair:
    """What `two_agents` runs: A may open streams to B, and B forwards them to `echo`."""

    servers: Servers
    """Replace `servers.rendezvous` / `servers.relay` after restarting one: teardown closes these."""
    a: LocalAgent
    b: LocalAgent
    a_dir: Path
    b_dir: Path
    a_id: str
    b_id: str
    echo: str
    """The echo target's "127.0.0.1:PORT" (in B's allow_targets by default)."""
    a_cfg: Config
    b_cfg: Config
    srv_dir: Path
    """Where the rendezvous server keeps its database and key (for a restart: `rendezvous_config`)."""
    tmp: Path


@contextlib.asynccontextmanager
async def two_agents(
    tmp: Path,
    *,
    limits: Limits | None = None,
    rendezvous: RendezvousConfig | None = None,
    relay: RelayConfig | None = None,
    a_connect_timeout: float | None = None,
    a_link_idle: float | None = None,
    a_relay: Callable[[Servers], Awaitable[str]] | None = None,
    a_server_key: str | None = None,
    b_allow: list[str] | None = None,
    b_allow_targets: list[str] | None = None,
    b_password: str | None = None,
    b_direct_port: int | None = None,
    a_metrics: str = "",
) -> AsyncIterator[AgentPair]:
    """Rendezvous + relay servers on loopback, an echo target, and two registered in-process agents.

    Servers keep their files in `tmp / "srv"`, A and B their state in `tmp / "a"` and `tmp / "b"`.
    By default B admits only A (`b_allow`) and forwards only to the echo target (`b_allow_targets`).
    Options:
      limits            the rendezvous server's limits (with `rendezvous`, set them in it instead)
      rendezvous        the whole rendezvous config (ports, files, limits), e.g. from `rendezvous_config`
      relay             the whole relay config, e.g. `relay_config(max_waiting=10)`
      a_connect_timeout A's agent.connect_timeout (default 8 s, from `agent_config`)
      a_link_idle       A's agent.link_idle (0: every stream races for a link of its own)
      a_relay           called with the running servers before A's state is written; returns the relay
                        A names (a proxy in front of the real one, another relay...)
      a_server_key      the rendezvous key A trusts instead of the real one (base64)
      b_allow           peer IDs B admits (default [A's ID]; [] admits only by password)
      b_allow_targets   targets B forwards to (default [the echo target])
      b_password        a password that also admits a peer to B (written to B's password file)
      b_direct_port     B's agent.direct_port
      a_metrics         A's agent.metrics ([HOST:]PORT of its Prometheus endpoint)
    Everything started is stopped on the way out, whatever the servers are by then.
    """
    if rendezvous is not None and limits is not None:
        raise ValueError("give the limits inside the rendezvous config")
    srv_dir = tmp / "srv" if rendezvous is None else rendezvous.db_path.parent
    servers = await start_servers(srv_dir, rendezvous or rendezvous_config(srv_dir, limits=limits), relay)
    echo: asyncio.Server | None = None
    a: LocalAgent | None = None
    b: LocalAgent | None = None
    try:
        echo, echo_addr = await echo_server()
        a_dir, b_dir = tmp / "a", tmp / "b"
        a_cfg = agent_config(servers)
        if a_connect_timeout is not None:
            a_cfg.agent.connect_timeout = a_connect_timeout
        if a_link_idle is not None:
            a_cfg.agent.link_idle = a_link_idle
        if a_relay is not None:
            a_cfg.agent.relay = await a_relay(servers)
        if a_server_key is not None:
            a_cfg.agent.server_key = a_server_key
        a_cfg.agent.metrics = a_metrics
        a_id = prepare_state(a_dir, a_cfg)
        b_cfg = agent_config(
            servers,
            allow=[a_id] if b_allow is None else list(b_allow),
            allow_targets=[echo_addr] if b_allow_targets is None else list(b_allow_targets),
        )
        if b_direct_port is not None:
            b_cfg.agent.direct_port = b_direct_port
        if b_password is not None:
            tmp.mkdir(parents=True, exist_ok=True)
            password_file = tmp / "b_password"
            password_file.write_text(b_password + "\n")
            b_cfg.access.password_file = str(password_file)
        b_id = prepare_state(b_dir, b_cfg)
        a = await LocalAgent(a_dir).start()
        b = await LocalAgent(b_dir).start()
        await wait_registered(a)
        await wait_registered(b)
        yield AgentPair(servers, a, b, a_dir, b_dir, a_id, b_id, echo_addr, a_cfg, b_cfg, srv_dir, tmp)
    finally:
        if a is not None:
            await a.close()
        if b is not None:
            await b.close()
        if echo is not None:
            echo.close()
        await servers.rendezvous.close()
        await servers.relay.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def transfer(sock: socket.socket, payload: bytes) -> bytes:
    """Send `payload` then EOF while reading everything back (the echo target's answer)."""
    loop = asyncio.get_running_loop()

    async def send() -> None:
        await loop.sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send())
    chunks = []
    try:
        while data := await loop.sock_recv(sock, 1 << 18):
            chunks.append(data)
    finally:
        await sender
    return b"".join(chunks)


def has_ipv6() -> bool:
    """This host can bind ::1 (CI containers sometimes have no IPv6 at all)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True
