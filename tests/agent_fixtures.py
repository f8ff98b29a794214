"""Fixtures for agent tests: real servers on loopback and agents with their own state dirs."""

from __future__ import annotations

import asyncio
import base64
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import ctlproto
from agent.config import Config
from agent.identity import load_or_create
from agent.netutil import loopback_pair
from agent.relay_server import RelayConfig, start_relay
from agent.rendezvous_server import RendezvousConfig, start_rendezvous
from agent.runtime_paths import control_socket
from agent.stack import write_config


@dataclass
class Servers:
    rendezvous: Any
    relay: Any
    server: str
    relay_addr: str
    key_b64: str


async def start_servers(tmp: Path) -> Servers:
    rv = await start_rendezvous(
        RendezvousConfig(binds=["127.0.0.1"], port=0, db_path=tmp / "rv.sqlite3", key_file=tmp / "rv_key")
    )
    rl = await start_relay(RelayConfig(binds=["127.0.0.1"], port=0))
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
    write_config(state_dir, cfg)
    return load_or_create(state_dir).peer_id


async def open_stream(
    state_dir: Path, peer: str, target: str, password: str | None = None, path: str = "auto"
) -> tuple[socket.socket | None, dict[str, Any]]:
    """What `punchthrough pipe` does, in-loop: our end of a socketpair, or None and the error."""
    mine, theirs = loopback_pair()  # as `punchthrough pipe` does: TCP carries the reset of a failed session
    try:
        reply = await ctlproto.acall(
            control_socket(state_dir),
            {"op": "open", "peer": peer, "target": target, "password": password, "path": path},
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
