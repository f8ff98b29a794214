"""An idle session must outlive the relay's idle timeout (30 s, as hbbr): ssh sessions sit idle for
hours. A link pings its peer after a silence; without that the relay cuts the pair (and the link
has to come back on a new one)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.session import stream as session
from tests.agent_fixtures import open_stream, relay_config, two_agents


@pytest.mark.parametrize("keepalive", [0.3, 0.0], ids=["keepalive", "none"])
async def test_idle_relayed_session_outlives_the_relay_idle_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keepalive: float
) -> None:
    monkeypatch.setattr(session, "KEEPALIVE_INTERVAL", keepalive)  # in-process agents: scaled down
    async with two_agents(tmp_path, relay=relay_config(idle_timeout=1.0)) as lab:
        sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path="relay-only")
        assert sock is not None, reply
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"hello")
        assert await loop.sock_recv(sock, 100) == b"hello"
        await asyncio.sleep(3.0)  # three relay idle timeouts of silence from the application
        try:
            await loop.sock_sendall(sock, b"still there?")
            async with asyncio.timeout(5):
                answer = await loop.sock_recv(sock, 100)
        except (ConnectionError, TimeoutError):
            answer = b""
        finally:
            sock.close()
        ends = lab.servers.relay.stats()["pair_ends"]
        if keepalive:
            assert answer == b"still there?"
            assert "idle" not in ends, ends
        else:  # the control: without keepalives the relay cuts the pair, which is why they exist
            assert ends.get("idle", 0) >= 1, ends
            # ... and the link then comes back on a new relay pair: the stream survives, after a stall
            assert answer == b"still there?"
            links = lab.a.components["sessions"].link_list()
            assert [h["path"] for h in links[0]["history"]][:2] == ["relay", "relay"], links
