"""NAT probe on loopback against the real rendezvous server, and against broken servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.nat.probe import NatProbe, measure_nat, udp_behavior_probe, udp_mapping_probe
from agent.nat.probe_core import NatType
from agent.proto import rendezvous_pb2 as pb
from agent.servers.rendezvous_server import RendezvousConfig, RendezvousServer, StartupError, start_rendezvous
from agent.wire import messages
from agent.wire.nat_behavior import NatBehavior

NB = pb.NatBehavior


def closed_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound then released, on TCP and UDP)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def serve(tmp_path: Path, host: str = "127.0.0.1") -> RendezvousServer:
    cfg = RendezvousConfig(port=0, binds=[host], db_path=tmp_path / "peers.db", key_file=tmp_path / "id_ed25519")
    return await start_rendezvous(cfg)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RendezvousServer]:
    srv = await serve(tmp_path)
    yield srv
    await srv.close()


async def test_loopback_is_asymmetric_and_udp_maps_to_itself(server: RendezvousServer) -> None:
    v = await measure_nat(("127.0.0.1", server.tcp_port), server.nat_port)
    assert v.error == "" and v.udp_error == ""
    assert v.nat_type == NatType.ASYMMETRIC
    assert v.port1 == v.port2 == v.local_tcp_port  # no NAT: the server sees our own port
    assert v.udp_mapped_port == v.udp_local_port is not None
    assert v.as_dict()["nat_name"] == "ASYMMETRIC"
    stats = server.stats()["messages"]
    assert stats["tcp.test_nat_request"] == 2
    assert stats["udp.test_nat_request"] >= 1
    # no NAT: one port per socket, kept, and the other port's answer gets in
    assert v.behavior == NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.PRESERVING, 0, NB.OPEN)
    assert stats["udp.nat.test_nat_request"] >= 2


async def test_ipv6_loopback(tmp_path: Path) -> None:
    srv = await serve(tmp_path, "::1")
    try:
        v = await measure_nat(("::1", srv.tcp_port), srv.nat_port)
    finally:
        await srv.close()
    assert (v.nat_type, v.error, v.udp_error) == (NatType.ASYMMETRIC, "", "")
    assert v.udp_mapped_port == v.udp_local_port
    assert v.behavior == NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.PRESERVING, 0, NB.OPEN)


async def test_the_other_port_answers_from_the_address_the_request_reached(tmp_path: Path) -> None:
    """The filtering test's answer leaves the server's wildcard socket from the address asked (here
    127.0.0.2 on lo, not the 127.0.0.1 the kernel would pick), from the NAT-test port."""
    cfg = RendezvousConfig(port=0, binds=["0.0.0.0"], db_path=tmp_path / "peers.db", key_file=tmp_path / "k")
    srv = await start_rendezvous(cfg)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            flip = messages.build(test_nat_request=pb.TestNatRequest(padding=bytes(64), answer_from_other_port=True))
            s.sendto(flip, ("127.0.0.2", srv.udp_port))
            data, src = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(s, 4096), 3)
            assert src == ("127.0.0.2", srv.nat_port)
            assert messages.parse(data)[1].port == s.getsockname()[1]
    finally:
        await srv.close()


async def test_an_hbbs_without_the_second_udp_port_leaves_the_behaviour_unknown(server: RendezvousServer) -> None:
    """Against a server that does not serve UDP on the NAT-test port, nothing is guessed."""
    v = await udp_behavior_probe(socket.AF_INET, "127.0.0.1", server.udp_port, closed_port(), give_up=0.3)
    assert (v.mapping, v.allocation) == (NB.MAPPING_UNKNOWN, NB.ALLOCATION_UNKNOWN)
    blocked = await udp_behavior_probe(socket.AF_INET, "127.0.0.1", closed_port(), closed_port(), give_up=0.3)
    assert blocked.udp_blocked


async def test_default_nat_port_is_main_port_minus_one(tmp_path: Path) -> None:
    cfg = RendezvousConfig(port=0, binds=["127.0.0.1"], db_path=tmp_path / "p.db", key_file=tmp_path / "k")
    for _attempt in range(20):  # a fixed port whose neighbour below is free too (other tests run beside)
        srv = await start_rendezvous(cfg)
        port = srv.tcp_port
        await srv.close()
        cfg.port = port  # reopen on a fixed port: its NAT-test port is port - 1
        try:
            srv = await start_rendezvous(cfg)
            break
        except (OSError, StartupError):
            cfg.port = 0
    else:
        pytest.fail("no free port pair in 20 tries")
    try:
        assert srv.nat_port == port - 1
        v = await measure_nat(("127.0.0.1", port))
    finally:
        await srv.close()
    assert v.nat_type == NatType.ASYMMETRIC


async def test_server_down_gives_a_clean_error_verdict() -> None:
    port = closed_port()
    v = await measure_nat(("127.0.0.1", port), closed_port(), timeout=3.0, udp_give_up=2.0)
    assert v.nat_type == NatType.UNKNOWN_NAT
    assert v.error == f"main port 127.0.0.1:{port}: connection refused"
    assert v.udp_error == f"no UDP: 127.0.0.1:{port}: connection refused"  # ICMP, not the 2 s give-up
    assert v.port1 is None and v.udp_mapped_port is None


async def test_nat_test_port_down(server: RendezvousServer) -> None:
    port = closed_port()
    v = await measure_nat(("127.0.0.1", server.tcp_port), port)
    assert v.nat_type == NatType.UNKNOWN_NAT
    assert v.port1 == v.local_tcp_port
    assert v.error == f"NAT-test port 127.0.0.1:{port}: connection refused"
    assert v.udp_mapped_port is not None  # UDP still measured


class FakeTcpServer:
    """A TCP server whose handler misbehaves; closing it also ends every open connection."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.handler = handler
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        try:
            await self.handler(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> FakeTcpServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await self.server.wait_closed()


async def _silent_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # never answers, holds the connection until the client goes


async def _closing_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)


async def _garbage_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.write(b"\x10\xff\xff\xff\xff")  # a 4-byte frame that is not a protobuf
    await writer.drain()
    await reader.read()


async def _oversized_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.write(b"\xff\xff\xff\xff")  # declares a 1 GiB frame
    await writer.drain()
    await reader.read()


@pytest.mark.parametrize(
    ("handler", "expect"),
    [
        (_silent_tcp, "no answer within 0.2 s"),
        (_closing_tcp, "closed the connection without answering"),
        (_garbage_tcp, "unreadable answer"),
        (_oversized_tcp, "unreadable answer"),
    ],
)
async def test_broken_servers(handler: Any, expect: str) -> None:
    silent_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        async with FakeTcpServer(handler) as srv:
            port = srv.port
            silent_udp.bind(("127.0.0.1", port))  # takes datagrams, never answers
            v = await measure_nat(("127.0.0.1", port), port, timeout=0.2, udp_give_up=0.2)
    finally:
        silent_udp.close()
    assert v.nat_type == NatType.UNKNOWN_NAT
    assert v.error.startswith(f"main port 127.0.0.1:{port}: ")
    assert expect in v.error
    assert v.udp_error == f"no UDP answer from 127.0.0.1:{port} within 0.2 s"


async def test_connect_timeout_is_reported() -> None:
    # A listener with a full backlog never completes new handshakes.
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(("127.0.0.1", port))
            fillers.append(f)
        v = await measure_nat(("127.0.0.1", port), port, timeout=0.2, udp_give_up=0.1)
    finally:
        for f in fillers:
            f.close()
        lst.close()
    assert v.nat_type == NatType.UNKNOWN_NAT
    assert v.error == f"main port 127.0.0.1:{port}: no connect within 0.2 s"


async def test_unpadded_udp_request_gets_no_answer(server: RendezvousServer) -> None:
    """Why we pad: the server never answers a UDP source with more bytes than it sent."""
    obs = await udp_mapping_probe(socket.AF_INET, "127.0.0.1", server.udp_port, give_up=0.3, padding=0)
    assert obs.mapped_port is None
    assert "no UDP answer" in obs.error
    assert server.stats()["drops"].get("reply_larger_than_request", 0) >= 1


async def test_probe_loop_measures_and_keeps_last_known_type(tmp_path: Path) -> None:
    srv = await serve(tmp_path)
    probe = NatProbe(("127.0.0.1", srv.tcp_port), srv.nat_port, interval=300.0)
    assert probe.verdict is None and probe.nat_type == NatType.UNKNOWN_NAT
    await probe.start()
    try:
        await asyncio.wait_for(probe.known.wait(), 10)
        assert probe.nat_type == NatType.ASYMMETRIC
        status = probe.status()
        assert status["nat_name"] == "ASYMMETRIC"
        assert status["measurements"] == 1
        assert status["latest"]["nat_type"] == 1
        assert 0 < status["next_in"] <= 300
        await srv.close()
        v = await probe.measure()  # server gone: the new verdict says so ...
        assert v.nat_type == NatType.UNKNOWN_NAT and "connection refused" in v.error
        assert probe.verdict is v
        assert probe.nat_type == NatType.ASYMMETRIC  # ... but the registrar keeps the known type
    finally:
        await probe.close()
        await srv.close()


async def test_probe_loop_against_dead_server_closes_cleanly() -> None:
    probe = NatProbe(("127.0.0.1", closed_port()), closed_port(), udp_give_up=0.2)
    await probe.start()
    for _ in range(200):
        if probe.verdict is not None:
            break
        await asyncio.sleep(0.01)
    await probe.close()
    assert probe.verdict is not None
    assert probe.verdict.error.endswith("connection refused")
    assert probe.status()["nat_type"] == 0
    assert not probe.known.is_set()


async def test_remeasure_measures_now_and_restarts_the_schedule(tmp_path: Path) -> None:
    srv = await serve(tmp_path)
    probe = NatProbe(("127.0.0.1", srv.tcp_port), srv.nat_port, interval=300.0)
    await probe.start()
    try:
        await asyncio.wait_for(probe.known.wait(), 10)
        assert probe.status()["measurements"] == 1
        status = await probe.remeasure("route 10.0.2.2 -> 198.51.100.22")
        assert status["measurements"] == 2 and status["remeasurements"] == 1
        assert status["last_trigger"] == "route 10.0.2.2 -> 198.51.100.22"
        assert status["nat_name"] == "ASYMMETRIC" and 290 < status["next_in"] <= 300
        await srv.close()
        status = await probe.remeasure("gone 198.51.100.22")  # offline now: retried on the short schedule
        assert "connection refused" in status["latest"]["error"] and status["next_in"] <= 1.0
        assert status["nat_name"] == "ASYMMETRIC"  # the last known type is kept meanwhile
    finally:
        await probe.close()
        await srv.close()


async def test_a_flapping_link_costs_at_most_one_extra_measurement(tmp_path: Path) -> None:
    """Five changes while a re-measurement runs coalesce into one more, not five queued ones."""
    from agent.nat.watch_core import NetworkChanged
    from agent.refs import LocalRef
    from agent.stack import RegistrarComponent, load_runtime
    from tests.agent_fixtures import agent_config, prepare_state, start_servers

    servers = await start_servers(tmp_path)
    try:
        prepare_state(tmp_path / "agent", agent_config(servers))
        rt = load_runtime(tmp_path / "agent")
        probe = NatProbe(rt.server_addr, servers.rendezvous.ports["nat_test"])
        comp = RegistrarComponent(rt, LocalRef(object()), LocalRef(probe))
        changes = [NetworkChanged(f"change {i}", True) for i in range(6)]
        await asyncio.gather(*(comp._network_changed(c) for c in changes))
        assert probe.remeasurements == 2
        assert probe.last_trigger == "change 5"  # the latest change is the one measured last
        assert comp.nat_type == NatType.ASYMMETRIC
    finally:
        await servers.relay.close()
        await servers.rendezvous.close()
