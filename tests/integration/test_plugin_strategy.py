"""A new strategy is one file and one registry line: raced, cancelled and shown like the built-in ones.

`loopback_strategy.py` is that file; `registry.register(ENTRY)` is that line. Two in-process agents
(the registry is per process: a Ray actor sees only the built-in list) run it beside the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.strategies import registry
from ops import cli as ops_cli
from tests.agent_fixtures import AgentPair, open_stream, transfer, two_agents
from tests.integration import loopback_strategy as loopback


@pytest.fixture
async def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AgentPair]:
    registry.register(loopback.ENTRY)
    try:
        async with two_agents(tmp_path, a_link_idle=0) as agents:  # a race per stream: each is raced
            yield agents
    finally:
        registry.unregister(loopback.NAME)


async def session(pair: AgentPair, policy: str = "auto") -> dict[str, Any]:
    sock, reply = await open_stream(pair.a_dir, pair.b_id, pair.echo, path=policy)
    assert sock is not None, reply
    assert await transfer(sock, b"through the race\n") == b"through the race\n"
    sock.close()
    sessions = pair.a.components["coordinator"].plans
    return {"reply": reply, "attempts": {a.strategy: a for a in sessions[reply["session"]].attempts}}


async def test_a_plug_in_strategy_is_raced_and_can_win(pair: AgentPair) -> None:
    assert "loopback" in pair.a.components and "loopback" in pair.b.components  # built from the registry
    first = await session(pair)  # no key pinned yet: the plug-in says so and the others win
    assert first["attempts"]["loopback"].outcome == "skipped"
    assert first["attempts"]["loopback"].reason == "no key pinned for the peer yet"
    second = await session(pair)  # B's key pinned now (and A's on B): the plug-in races, and wins here
    attempt = second["attempts"]["loopback"]
    assert attempt.outcome in ("won", "lost the race", "cancelled"), attempt
    assert pair.a.components["loopback"].dials == 1
    if attempt.outcome == "won":
        assert second["reply"]["path"] == "loopback"
    relay_only = await session(pair, "relay-only")
    assert relay_only["attempts"]["loopback"].outcome == "skipped"
    assert relay_only["attempts"]["loopback"].reason == "relay-only policy"


async def test_a_plug_in_that_loses_is_cancelled_and_shown(
    pair: AgentPair, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await session(pair)
    monkeypatch.setattr(loopback, "DIAL_DELAY", 30.0)  # it cannot win now: another path does, then it is stopped
    result = await session(pair)
    attempt = result["attempts"]["loopback"]
    assert (attempt.outcome, attempt.reason) == ("cancelled", "another path won first"), attempt
    component = pair.a.components["loopback"]
    async with asyncio.timeout(5):  # the coordinator stops it and tells the component, as it does every strategy
        while not (component.stopped == 1 and result["reply"]["session"] in component.cancel_calls):
            await asyncio.sleep(0.02)
    rc = await asyncio.to_thread(ops_cli.main, ["--state-dir", str(pair.a_dir), "sessions"])
    out = capsys.readouterr().out
    assert rc == 0 and "loopback:cancelled(another path won first)" in out, out
