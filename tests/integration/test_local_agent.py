"""Two agents (all components in-process, no Ray) reach each other by ID through a real relay."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.stack import LocalAgent
from tests.agent_fixtures import (
    AgentPair,
    agent_config,
    open_stream,
    prepare_state,
    transfer,
    two_agents,
    wait_registered,
)
from tests.integration.test_agent_e2e import free_triple


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[AgentPair]:
    async with two_agents(tmp_path, b_direct_port=free_port()) as pair:
        yield pair


def free_port() -> int:
    return free_triple()


async def test_echo_through_relay(lab: AgentPair) -> None:
    sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo)
    assert sock is not None, reply
    payload = os.urandom(3 * 1024 * 1024 + 17)
    got = await asyncio.wait_for(transfer(sock, payload), 60)
    sock.close()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    sessions = (await lab.a.components["coordinator"].sessions())["sessions"]
    # A and B are both 127.0.0.1 to the server: one LAN, so the LAN path wins the race.
    assert sessions[0]["path"] == "lan", sessions
    assert {"strategy": "lan", "outcome": "won"}.items() <= sessions[0]["attempts"][0].items()


async def test_relay_only_policy(lab: AgentPair) -> None:
    sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path="relay-only")
    assert sock is not None, reply
    payload = os.urandom(1_000_000)
    assert await asyncio.wait_for(transfer(sock, payload), 60) == payload
    sock.close()
    assert reply["path"] == "relay"
    assert lab.servers.relay.stats()["pairs_total"] >= 1


async def test_concurrent_streams(lab: AgentPair) -> None:
    async def one(i: int) -> bool:
        sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo)
        assert sock is not None, reply
        data = os.urandom(100_000 + i)
        got = await transfer(sock, data)
        sock.close()
        return got == data

    assert all(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(6))), 60))


async def test_disallowed_target(lab: AgentPair) -> None:
    sock, reply = await open_stream(lab.a_dir, lab.b_id, "127.0.0.1:1")
    assert sock is None
    assert "not allowed" in reply["error"]


async def test_unknown_peer(lab: AgentPair) -> None:
    sock, reply = await open_stream(lab.a_dir, "1999999999", lab.echo)
    assert sock is None
    assert "1999999999" in reply["error"]


async def test_unlisted_peer_refused(lab: AgentPair, tmp_path: Path) -> None:
    c_dir = tmp_path / "c"
    prepare_state(c_dir, agent_config(lab.servers))
    c = await LocalAgent(c_dir).start()
    try:
        await wait_registered(c)
        sock, reply = await open_stream(c_dir, lab.b_id, lab.echo)
        assert sock is None
        assert "is not on this agent's allow list" in reply["error"] and "punchthrough allow" in reply["error"]
    finally:
        await c.close()


async def test_direct_port_needs_a_pinned_key_then_skips_the_rendezvous(lab: AgentPair) -> None:
    where = f"{lab.b_id}@127.0.0.1:{lab.b_cfg.agent.direct_port}"
    sock, reply = await open_stream(lab.a_dir, where, lab.echo)
    assert sock is None and "no key pinned" in reply["error"]
    first, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo)  # via the server: pins B's key
    assert first is not None, reply
    first.close()
    await lab.servers.rendezvous.close()  # nobody to ask any more
    sock, reply = await open_stream(lab.a_dir, where, lab.echo)
    assert sock is not None, reply
    assert reply["path"] == "direct"
    assert await asyncio.wait_for(transfer(sock, b"direct bytes"), 30) == b"direct bytes"
    sock.close()
