"""The rendezvous server hands out relays by health and load, asking each relay (a HealthCheck
frame) every few seconds: a dead relay is no longer handed out, a busy one less."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_server import RelayConfig, start_relay
from agent.servers.rendezvous_core import RELAY_REFUSED
from agent.servers.rendezvous_server import RendezvousConfig, relay_load, start_rendezvous
from agent.wire import messages
from agent.wire.frames import encode_frame


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_relay_reports_its_load_and_a_dead_ones_host_refuses() -> None:
    relay = await start_relay(RelayConfig(binds=["127.0.0.1"], port=0, open=True))
    try:
        assert await relay_load(f"127.0.0.1:{relay.port}") == 0
        # a half pair waiting counts
        _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(encode_frame(messages.build(request_relay=pb.RequestRelay(uuid="u-1"))))
        await writer.drain()
        for _ in range(100):
            if await relay_load(f"127.0.0.1:{relay.port}") == 1:
                break
            await asyncio.sleep(0.02)
        assert await relay_load(f"127.0.0.1:{relay.port}") == 1
        assert relay.stats()["health_checks"] >= 2
        writer.close()
        assert await relay_load(f"127.0.0.1:{closed_port()}") == RELAY_REFUSED
    finally:
        await relay.close()


async def test_the_server_stops_handing_out_a_dead_relay(tmp_path: Path) -> None:
    live = await start_relay(RelayConfig(binds=["127.0.0.1"], port=0, open=True))
    dead = f"127.0.0.1:{closed_port()}"
    alive = f"127.0.0.1:{live.port}"
    cfg = RendezvousConfig(binds=["127.0.0.1"], port=0, db_path=tmp_path / "p.db", key_file=tmp_path / "k",
                           relays=[dead, alive], relay_check_interval=0.05)
    server = await start_rendezvous(cfg)
    try:
        for _ in range(200):
            if not server.stats()["relays"].get(dead, {"up": True})["up"]:
                break
            await asyncio.sleep(0.02)
        relays = server.stats()["relays"]
        assert relays[dead]["up"] is False and relays[alive]["up"] is True
        assert {server.core.next_relay() for _ in range(10)} == {alive}
        assert server.core.events["relay_down"] == 1
    finally:
        await server.close()
        await live.close()
