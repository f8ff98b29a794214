"""The relay server on loopback with raw clients: pairing, pumps, half-close, limits, timeouts."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from agent.servers.relay_core import KEY_MISMATCH, TokenBucket
from agent.servers.relay_pump import splice_available
from agent.servers.relay_server import RelayConfig, bind_listeners, start_relay
from tests.agent_fixtures import has_ipv6
from tests.integration.relay_helpers import (
    TEST_SERVER_PK,
    exchange,
    expect_closed,
    open_half,
    open_pair,
    parse_reply,
    read_to_eof,
    recv_all,
    request_frame,
    send_all,
    wait_for,
    wait_listening,
)

PUMPS = ["asyncio", *(["splice"] if splice_available() else [])]


def cfg(**kw: object) -> RelayConfig:
    base: dict[str, object] = {"binds": ["127.0.0.1"], "port": 0, "server_keys": [TEST_SERVER_PK]}
    base.update(kw)
    return RelayConfig(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ pairing and pumping


@pytest.mark.parametrize("pump", PUMPS)
async def test_pair_exchanges_20_mb_each_way(pump: str) -> None:
    server = await start_relay(cfg(pump=pump))
    try:
        a, b = await open_pair(server.port, "uuid-20mb")
        await exchange(a, b, 20 * 1024 * 1024)
        await wait_for(lambda: server.stats()["pairs_active"] == 0)
        st = server.stats()
        assert st["pump"] == pump
        assert st["pairs_total"] == 1
        assert st["bytes_relayed"] == 2 * 20 * 1024 * 1024
        assert st["pair_ends"] == {"closed": 1}
    finally:
        await server.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_half_close_keeps_the_other_direction(pump: str) -> None:
    server = await start_relay(cfg(pump=pump))
    try:
        (ra, wa), (rb, wb) = await open_pair(server.port, "uuid-half")
        wa.write(b"question")
        wa.write_eof()  # A is done talking but keeps listening
        assert await read_to_eof(rb) == b"question"  # B sees A's EOF
        sent = await send_all(wb, 3 * 1024 * 1024, b"answer")
        n, digest = await recv_all(ra)
        assert (n, digest) == (3 * 1024 * 1024, sent)
        wa.close()
        wb.close()
        await wait_for(lambda: server.stats()["pair_ends"] == {"closed": 1})
    finally:
        await server.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_bytes_right_after_request_are_not_lost(pump: str) -> None:
    server = await start_relay(cfg(pump=pump))
    try:
        early_a = os.urandom(3000)
        early_b = os.urandom(70000)
        ra, wa = await open_half(server.port, "uuid-early", extra=early_a)
        await wait_for(lambda: server.stats()["waiting"] == 1)
        rb, wb = await open_half(server.port, "uuid-early", extra=early_b)
        assert await rb.readexactly(len(early_a)) == early_a
        assert await ra.readexactly(len(early_b)) == early_b
        wa.close()
        wb.close()
    finally:
        await server.close()


async def test_ipv6_and_ipv4_halves_pair() -> None:
    if not has_ipv6():
        pytest.skip("no IPv6 loopback")
    server = await start_relay(cfg(binds=["127.0.0.1", "::1"]))
    try:
        assert {h for h, _ in server.addresses} == {"127.0.0.1", "::1"}
        a = await open_half(server.port, "uuid-v6", host="::1")
        b = await open_half(server.port, "uuid-v6", host="127.0.0.1")
        await exchange(a, b, 100_000)
    finally:
        await server.close()


async def test_many_pairs_at_once() -> None:
    server = await start_relay(cfg())
    try:
        pairs = await asyncio.gather(*(open_pair(server.port, f"uuid-many-{i}") for i in range(16)))
        await asyncio.gather(*(exchange(a, b, 200_000) for a, b in pairs))
        await wait_for(lambda: server.stats()["pairs_total"] == 16 and server.stats()["pairs_active"] == 0)
    finally:
        await server.close()


# ------------------------------------------------------------------ refusals and timeouts


async def test_key_mismatch_gets_refuse_reason() -> None:
    server = await start_relay(cfg(key="s3cret"))
    try:
        r, w = await open_half(server.port, "uuid-key", key="wrong")
        kind, sub = parse_reply(await read_to_eof(r))
        assert kind == "relay_response"
        assert sub.refuse_reason == KEY_MISMATCH
        w.close()
        # The right key pairs as usual.
        a, b = await open_pair(server.port, "uuid-key", key="s3cret")
        await exchange(a, b, 10_000)
        assert server.stats()["drops"] == {"key_mismatch": 1}
    finally:
        await server.close()


async def test_key_mismatch_reason_survives_early_client_bytes() -> None:
    server = await start_relay(cfg(key="s3cret"))
    try:
        r, w = await open_half(server.port, "uuid-key-early", key="wrong", extra=os.urandom(200_000))
        _kind, sub = parse_reply(await read_to_eof(r))
        assert sub.refuse_reason == KEY_MISMATCH
        w.close()
    finally:
        await server.close()


async def test_third_connection_with_same_uuid_is_refused() -> None:
    server = await start_relay(cfg())
    try:
        a, b = await open_pair(server.port, "uuid-3")
        await wait_for(lambda: server.stats()["pairs_active"] == 1)
        rc, wc = await open_half(server.port, "uuid-3", extra=b"let me in")
        await expect_closed(rc)
        wc.close()
        await exchange(a, b, 50_000)  # the pair is untouched
        assert server.stats()["drops"] == {"uuid_in_use": 1}
    finally:
        await server.close()


async def test_unpaired_connection_is_closed_after_the_wait() -> None:
    server = await start_relay(cfg(pair_timeout=0.3))
    try:
        r, w = await open_half(server.port, "uuid-alone")
        assert await read_to_eof(r) == b""
        w.close()
        st = server.stats()
        assert st["drops"] == {"pair_timeout": 1}
        assert st["waiting"] == 0
    finally:
        await server.close()


async def test_silent_connection_is_closed_after_first_frame_timeout() -> None:
    server = await start_relay(cfg(first_frame_timeout=0.3))
    try:
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"\x09")  # half a header, then silence
        assert await read_to_eof(r) == b""
        w.close()
        assert server.stats()["drops"] == {"first_frame_timeout": 1}
    finally:
        await server.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_idle_pair_is_closed(pump: str) -> None:
    server = await start_relay(cfg(idle_timeout=0.3, pump=pump))
    try:
        (ra, wa), (rb, wb) = await open_pair(server.port, "uuid-idle")
        wa.write(b"hi")
        assert await rb.readexactly(2) == b"hi"
        assert await read_to_eof(ra) == b""
        assert await read_to_eof(rb) == b""
        wa.close()
        wb.close()
        await wait_for(lambda: server.stats()["pair_ends"] == {"idle": 1})
    finally:
        await server.close()


async def test_waiting_bound_evicts_the_oldest_waiter() -> None:
    server = await start_relay(cfg(max_waiting=2))
    try:
        a1 = await open_half(server.port, "w1")
        a2 = await open_half(server.port, "w2")
        await wait_for(lambda: server.stats()["waiting"] == 2)
        a3 = await open_half(server.port, "w3")
        assert await read_to_eof(a1[0]) == b""  # the oldest made room
        assert server.stats()["drops"] == {"evicted_oldest_waiter": 1}
        assert server.stats()["waiting"] == 2
        # Partners of the parked ones get through.
        b2 = await open_half(server.port, "w2")
        b3 = await open_half(server.port, "w3")
        await asyncio.gather(exchange(a2, b2, 10_000), exchange(a3, b3, 10_000))
    finally:
        await server.close()


async def test_hang_up_while_waiting_frees_the_slot() -> None:
    server = await start_relay(cfg(max_waiting=1))
    try:
        _, w = await open_half(server.port, "gone")
        await wait_for(lambda: server.stats()["waiting"] == 1)
        w.close()
        await wait_for(lambda: server.stats()["waiting"] == 0)
        assert server.stats()["drops"] == {"closed_while_waiting": 1}
        a, b = await open_pair(server.port, "next")
        await exchange(a, b, 1000)
    finally:
        await server.close()


async def test_handshaking_connections_are_bounded_oldest_evicted() -> None:
    server = await start_relay(cfg(max_handshaking=3))
    try:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await wait_for(lambda: server.stats()["handshaking"] == 3)
        _r, w = await asyncio.open_connection("127.0.0.1", server.port)
        # the newcomer is admitted; the connection idle the longest makes room
        assert await read_to_eof(idle[0][0]) == b""
        await wait_for(lambda: server.stats()["handshaking"] == 3)
        assert server.stats()["drops"] == {"evicted_idle_handshake": 1}
        for _, iw in idle:
            iw.close()
        w.close()
        await wait_for(lambda: server.stats()["handshaking"] == 0)
        a, b = await open_pair(server.port, "after-slowloris")
        await exchange(a, b, 1000)
    finally:
        await server.close()


# ------------------------------------------------------------------ bandwidth limits


@pytest.mark.parametrize("pump", PUMPS)
async def test_stream_limit_is_enforced(pump: str) -> None:
    rate = 2_000_000.0
    server = await start_relay(cfg(stream_limit_bps=rate, pump=pump))
    try:
        a, b = await open_pair(server.port, "uuid-slow")
        total = 400_000
        t0 = time.monotonic()
        await exchange(a, b, total)
        elapsed = time.monotonic() - t0
        burst = TokenBucket(rate, 0).burst
        # A lower bound the bucket guarantees (both directions share the pair's bucket).
        assert elapsed >= (2 * total - burst) / rate
        st = server.stats()
        assert st["limits"]["stream_limit_bps"] == rate
        await wait_for(lambda: server.stats()["pairs_active"] == 0)
        assert server.stats()["limits"]["throttle_waits"] > 0
    finally:
        await server.close()


async def test_total_limit_is_shared_by_pairs() -> None:
    rate = 2_000_000.0
    server = await start_relay(cfg(total_limit_bps=rate))
    try:
        pairs = [await open_pair(server.port, f"uuid-total-{i}") for i in range(2)]
        total = 200_000
        t0 = time.monotonic()
        await asyncio.gather(*(exchange(a, b, total) for a, b in pairs))
        elapsed = time.monotonic() - t0
        burst = TokenBucket(rate, 0).burst
        assert elapsed >= (4 * total - burst) / rate
        assert server.stats()["limits"]["total_limit_bps"] == rate
    finally:
        await server.close()


# ------------------------------------------------------------------ binding and the CLI


def test_bind_listeners_same_port_on_every_address() -> None:
    binds = ["127.0.0.1", "::1"] if has_ipv6() else ["127.0.0.1"]
    socks = bind_listeners(binds, 0, reuse_port=False)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1
        assert len(socks) == len(binds)
    finally:
        for s in socks:
            s.close()


def test_bind_listeners_reports_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            bind_listeners(["127.0.0.1"], taken.getsockname()[1], reuse_port=False)


def test_cli_relay_serves_and_stops_on_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key = base64.b64encode(TEST_SERVER_PK).decode()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "relay", "--bind", "127.0.0.1", "--port", str(port), "--server-key", key],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(port, proc, 20, 0.05)

        async def one_pair() -> None:
            a, b = await open_pair(port, "cli-pair")
            await exchange(a, b, 100_000)

        asyncio.run(one_pair())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_request_frame_helper_matches_upstream_layout() -> None:
    # Field 18 (request_relay) of RendezvousMessage, uuid in field 2: a sanity check of the test client.
    frame = request_frame("u", ticket=b"")
    assert frame[1:3] == b"\x92\x01"


# ------------------------------------------------------------------ the pumps on their own


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
    return client, server


@pytest.mark.parametrize("pump", PUMPS)
async def test_pump_sends_buffered_rest_first(pump: str) -> None:
    from agent.servers.relay_pump import make_pump

    ca, sa = _tcp_pair()
    cb, sb = _tcp_pair()
    for s in (ca, cb):
        s.setblocking(False)
    loop = asyncio.get_running_loop()
    p = make_pump(pump, sa, sb, a_rest=b"rest-of-a|", b_rest=b"rest-of-b|", idle_timeout=5)  # type: ignore[arg-type]
    task = loop.create_task(p.run())
    await loop.sock_sendall(ca, b"live-a")
    await loop.sock_sendall(cb, b"live-b")
    ca.shutdown(socket.SHUT_WR)
    cb.shutdown(socket.SHUT_WR)

    async def drain(s: socket.socket) -> bytes:
        out = b""
        while chunk := await loop.sock_recv(s, 65536):
            out += chunk
        return out

    got_b, got_a = await asyncio.gather(drain(cb), drain(ca))
    assert got_b == b"rest-of-a|live-a"
    assert got_a == b"rest-of-b|live-b"
    result = await task
    assert (result.reason, result.a_to_b, result.b_to_a) == ("closed", 16, 16)
    ca.close()
    cb.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_pump_reset_on_one_side_ends_the_pair(pump: str) -> None:
    from agent.servers.relay_pump import make_pump

    ca, sa = _tcp_pair()
    cb, sb = _tcp_pair()
    p = make_pump(pump, sa, sb, idle_timeout=5)  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(p.run())
    ca.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    ca.close()  # RST
    cb.sendall(b"x" * 100_000)
    result = await asyncio.wait_for(task, 10)
    assert result.reason != "idle"
    cb.close()


async def test_unknown_pump_kind_is_an_error() -> None:
    from agent.servers.relay_pump import make_pump

    ca, sa = _tcp_pair()
    try:
        with pytest.raises(ValueError):
            make_pump("zerocopy-magic", sa, sa)  # type: ignore[arg-type]
    finally:
        ca.close()
        sa.close()
