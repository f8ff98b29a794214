"""Relay replicas sharing one port: fd handoff in-process, then real Ray actors (marked `ray`)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from actors.relay_pool import RelayReplica, group_by_node, node_binds, plan_placement, reserve_port
from agent.servers.relay_core import encode_handoff, owner_index
from agent.servers.relay_handoff import Handoff
from agent.servers.relay_server import RelayConfig
from tests.integration.relay_helpers import TEST_SERVER_PK, exchange, open_pair, relay_cfg, wait_for, wait_listening


def names(n: int) -> list[str]:
    token = secrets.token_hex(4)
    return [f"pt-relay-test-{token}-{i}" for i in range(n)]


async def start_replicas(n: int, **kw: Any) -> tuple[list[RelayReplica], int]:
    port, held = reserve_port(["127.0.0.1"])
    cfg = relay_cfg(port=port, replicas=n, **kw)
    group = names(n)
    reps = [RelayReplica(cfg, group, i) for i in range(n)]
    try:
        for r in reps:
            await r.start()
    finally:
        for s in held:
            s.close()
    return reps, port


def test_placement_round_robin() -> None:
    assert plan_placement(["b", "a"], 3) == ["a", "b", "a"]
    assert group_by_node(["a", "b", "a"]) == {"a": [0, 2], "b": [1]}
    with pytest.raises(ValueError):
        plan_placement([], 1)


def test_bind_node_is_the_replicas_own_node_address() -> None:
    assert node_binds(["node", "::"], "10.0.0.2") == ["10.0.0.2", "::"]
    assert node_binds(["127.0.0.1"], "10.0.0.2") == ["127.0.0.1"]


async def test_two_replicas_in_process_pair_across_replicas() -> None:
    reps, port = await start_replicas(2)
    try:
        pairs = await asyncio.gather(*(open_pair(port, f"uuid-inproc-{i}") for i in range(8)))
        await asyncio.gather(*(exchange(a, b, 500_000) for a, b in pairs))
        await wait_for(lambda: sum(r.server.stats()["pairs_total"] for r in reps) == 8)
        stats = [r.stats() for r in reps]
        # Each pair ran in the replica that owns its uuid, whoever accepted its halves.
        for i in range(8):
            assert owner_index(f"uuid-inproc-{i}", 2) in (0, 1)
        owned = [sum(1 for i in range(8) if owner_index(f"uuid-inproc-{i}", 2) == k) for k in (0, 1)]
        assert [s["pairs_total"] for s in stats] == owned
        sent = sum(s["handoff"]["sent"] for s in stats)
        received = sum(s["handoff"]["received"] for s in stats)
        assert sent == received
        # 16 connections spread by the kernel: P(no half lands on a non-owner) = 2**-16.
        assert sent > 0
    finally:
        for r in reps:
            await r.close()


async def test_two_hundred_pairs_spread_over_two_replicas_intact_and_fair() -> None:
    """Issue 5's load: 200 concurrent relayed streams spread over replicas, all intact; fairness reported."""
    reps, port = await start_replicas(2, max_handshaking_per_ip=0, max_waiting_per_ip=0)  # 200 pairs, one address
    n, size = 200, 128 * 1024
    durations: list[float] = []

    async def one(i: int) -> None:
        a, b = await open_pair(port, f"uuid-spread-{i}")
        started = time.monotonic()
        await exchange(a, b, size)
        durations.append(time.monotonic() - started)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
        await wait_for(lambda: sum(r.server.stats()["pairs_total"] for r in reps) == n)
        per_replica = [r.stats()["pairs_total"] for r in reps]
        owned = [sum(1 for i in range(n) if owner_index(f"uuid-spread-{i}", 2) == k) for k in (0, 1)]
        assert per_replica == owned and min(per_replica) > 0
        spread = max(durations) / min(durations)
        print(f"\n200 pairs x {size // 1024} KiB each way over 2 replicas: {per_replica} pairs per replica, "
              f"per-stream time {min(durations) * 1000:.0f}-{max(durations) * 1000:.0f} ms (max/min {spread:.1f})")
        assert len(durations) == n  # every exchange asserted its SHA-256 both ways
    finally:
        for r in reps:
            await r.close()


async def test_handoff_rejects_garbage_and_keeps_working() -> None:
    reps, port = await start_replicas(2)
    try:
        target = reps[1].handoff
        addr = Handoff.address(target.names[1])
        loop = asyncio.get_running_loop()
        bad_messages: list[tuple[bytes, list[int]]] = [
            (b"not a handoff", []),
            (encode_handoff("u", "p"), []),  # no descriptor
            (b"\x01\x00", [os.open(os.devnull, os.O_RDONLY)]),  # bad message, fd must be closed
            (encode_handoff("u", "p"), [os.open(os.devnull, os.O_RDONLY)]),  # not a TCP socket
        ]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        bad_messages.append((encode_handoff("u", "p"), [udp.fileno()]))
        for msg, fds in bad_messages:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
                c.connect(addr)
                socket.send_fds(c, [msg], fds)
            for fd in fds:
                if fd != udp.fileno():
                    os.close(fd)
        udp.close()
        await wait_for(lambda: target.rejected == len(bad_messages))
        await loop.run_in_executor(None, lambda: None)
        a, b = await open_pair(port, "uuid-after-bad-handoff")
        await exchange(a, b, 10_000)
    finally:
        for r in reps:
            await r.close()


async def test_handoff_to_a_missing_owner_is_counted() -> None:
    group = names(2)
    port, held = reserve_port(["127.0.0.1"])
    cfg = relay_cfg(port=port, replicas=2)
    only = RelayReplica(cfg, group, 0)
    only.handoff.owner_wait = 0.2
    await only.start()
    for s in held:
        s.close()
    try:
        uuid = next(f"orphan-{i}" for i in range(100) if owner_index(f"orphan-{i}", 2) == 1)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        from tests.integration.relay_helpers import expect_closed, request_frame

        w.write(request_frame(uuid))
        await w.drain()
        await expect_closed(r)
        w.close()
        assert only.stats()["drops"] == {"owner_unavailable": 1}
    finally:
        await only.close()


# ------------------------------------------------------------------ real Ray


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Any]:
    from actors.ray_runtime import start_private_head

    handle = start_private_head()
    try:
        handle.init_driver()
        yield handle
    finally:
        import ray

        ray.shutdown()
        handle.stop()
        assert not _procs_naming(str(handle.temp_dir))


def _procs_naming(marker: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.ray
@pytest.mark.timeout(90)
def test_ray_two_replicas_relay_eight_pairs(ray_head: Any) -> None:
    from actors.relay_pool import RelayPool

    pool = RelayPool(relay_cfg(replicas=2))
    try:
        infos = pool.start(timeout=60)
        assert len({i["pid"] for i in infos}) == 2
        assert {i["port"] for i in infos} == {pool.port}

        async def run() -> None:
            pairs = await asyncio.gather(*(open_pair(pool.port, f"uuid-ray-{i}") for i in range(8)))
            await asyncio.gather(*(exchange(a, b, 1_000_000) for a, b in pairs))

        asyncio.run(run())
        deadline = time.monotonic() + 10
        while True:
            st = pool.stats()
            if (st["pairs_total"] == 8 and st["pairs_active"] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert st["pairs_total"] == 8
        assert st["bytes_relayed"] == 8 * 2 * 1_000_000
        per = st["replicas"]
        owned = [sum(1 for i in range(8) if owner_index(f"uuid-ray-{i}", 2) == k) for k in (0, 1)]
        assert sorted(p["pairs_total"] for p in per) == sorted(owned)
        sent = sum(p["handoff"]["sent"] for p in per)
        assert sent == sum(p["handoff"]["received"] for p in per)
        assert sent > 0  # 16 halves spread by the kernel; P(no handoff) = 2**-16

        # Supervision: SIGKILL one replica; Ray re-runs its __init__, which binds the port
        # and its handoff socket again, and pairs owned by it work once more.
        victim = infos[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                pids = {p["pid"] for p in pool.stats(timeout=5)["replicas"]}
                if victim not in pids and len(pids) == 2:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "replica did not come back"
            time.sleep(0.1)

        async def again() -> None:
            pairs = await asyncio.gather(*(open_pair(pool.port, f"uuid-ray-after-{i}") for i in range(4)))
            await asyncio.gather(*(exchange(a, b, 100_000) for a, b in pairs))

        asyncio.run(again())
    finally:
        pool.stop()


@pytest.mark.ray
@pytest.mark.timeout(90)
def test_cli_with_replicas_serves_and_cleans_up() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    key = base64.b64encode(TEST_SERVER_PK).decode()
    argv = ["relay", "--replicas", "2", "--bind", "127.0.0.1", "--port", str(port), "--server-key", key]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        wait_listening(port, proc, 60, 0.1)
        # Our head is the `ray start` child of the CLI process; its temp dir names all its processes.
        temp_dirs = [
            part.split("=", 1)[1]
            for c in psutil.Process(proc.pid).children(recursive=True)
            for part in c.cmdline()
            if part.startswith("--temp-dir=")
        ]
        assert temp_dirs, "the CLI should have started a private Ray head"
        marker = temp_dirs[0]
        assert _procs_naming(marker)

        async def pairs() -> None:
            ps = await asyncio.gather(*(open_pair(port, f"uuid-cli-{i}") for i in range(4)))
            await asyncio.gather(*(exchange(a, b, 200_000) for a, b in ps))

        asyncio.run(pairs())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        gone_by = time.monotonic() + 10
        while _procs_naming(marker) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not _procs_naming(marker)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_replica_config_survives_ray_serialisation() -> None:
    cfg = RelayConfig(binds=["127.0.0.1"], port=1234, replicas=2, key="k", stream_limit_bps=5.0)
    assert RelayConfig(**dataclasses.asdict(cfg)) == cfg
