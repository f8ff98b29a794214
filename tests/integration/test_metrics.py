"""Prometheus endpoints, scraped over HTTP and read with prometheus_client's own parser (the text
format a Prometheus server reads): the servers' and the agent's numbers, and the session just opened
counted under the path it took."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.common.metrics import MetricsServer, parse_listen
from agent.servers.server_metrics import relay_families, rendezvous_families
from tests.agent_fixtures import open_stream, transfer, two_agents


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_ports() -> tuple[int, int]:
    """A rendezvous port whose neighbours (the NAT-test port below, the relay above) are free for TCP
    and UDP, and a metrics port that is none of them."""
    for _ in range(200):
        port = free_port()
        socks = []
        try:
            for p in (port - 1, port, port + 1):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        metrics = free_port()
        if metrics not in (port - 1, port, port + 1):
            return port, metrics
    raise AssertionError("no free port triple")


SCRAPED: list[str] = []
"""Every text `scrape` read, for the promtool checks at the end of a test (after its own asserts)."""


def promtool_check(text: str) -> None:
    """Prometheus' own checker on a scrape (`promtool check metrics`: format and naming lint).
    scripts/test.sh puts promtool in .venv/bin; without it the check is skipped, visibly."""
    tool = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("promtool not installed (scripts/test.sh fetches it)")
    out = subprocess.run([tool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()[-2000:]


async def scrape(port: int, path: str = "/metrics") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}, as Prometheus would read them."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(resp.read().decode())

    text = await asyncio.to_thread(get)
    SCRAPED.append(text)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def assert_started(proc: subprocess.Popen[bytes]) -> None:
    """`serve` printed its key (it is up); else its one line of error."""
    assert proc.stdout is not None and proc.stderr is not None
    if not proc.stdout.readline().startswith(b"key: "):
        proc.wait(timeout=10)
        raise AssertionError(f"serve did not start: {proc.stderr.read().decode()[-500:]}")


def test_listen_addresses() -> None:
    assert parse_listen("9101") == ("127.0.0.1", 9101)  # a bare port: loopback only
    assert parse_listen("0.0.0.0:9101") == ("0.0.0.0", 9101)
    assert parse_listen("[::1]:9101") == ("::1", 9101)
    for bad in ("x", "70000", "host:", ""):
        with pytest.raises(ValueError, match="metrics"):
            parse_listen(bad)


async def test_a_session_is_counted_under_its_path_by_the_agent_and_the_servers(tmp_path: Path) -> None:
    port = free_port()
    async with two_agents(tmp_path, a_metrics=str(port)) as pair:
        servers = MetricsServer(
            ("127.0.0.1", 0),
            lambda: rendezvous_families(pair.servers.rendezvous.stats()) + relay_families(pair.servers.relay.stats()),
        )
        await servers.start()
        try:
            before = await scrape(port)
            assert before[("punchthrough_agent_registered", ())] == 1
            sock, reply = await open_stream(pair.a_dir, pair.b_id, pair.echo, path="relay-only")
            assert sock is not None, reply
            payload = os.urandom(100_000)
            assert await asyncio.wait_for(transfer(sock, payload), 30) == payload
            sock.close()
            after = await scrape(port)
            key = ("punchthrough_agent_streams_total", (("outcome", "ok"), ("path", "relay")))
            assert after.get(key, 0) == before.get(key, 0) + 1, after
            race = ("punchthrough_agent_races_total", (("kind", "link"), ("outcome", "ok"), ("path", "relay")))
            assert after[race] == 1
            assert after[("punchthrough_agent_attempts_total", (("outcome", "won"), ("strategy", "relay")))] == 1
            assert after[("punchthrough_agent_links", (("path", "relay"),))] == 1
            assert after[("punchthrough_agent_actor_restarts_total", (("component", "coordinator"),))] == 0
            srv = await scrape(servers.port)
            assert srv[("punchthrough_relay_pairs_total", ())] >= 1
            assert srv[("punchthrough_relay_bytes_total", ())] >= 2 * len(payload)
            assert srv[("punchthrough_rendezvous_messages_total", (("kind", "tcp.request_relay"),))] >= 1
            assert srv[("punchthrough_rendezvous_peers_online", ())] == 2
            for text in SCRAPED[-3:]:  # the agent's (twice) and the servers': what Prometheus would lint
                promtool_check(text)
        finally:
            await servers.close()


async def test_only_get_metrics_is_served_and_junk_is_dropped() -> None:
    server = await MetricsServer(("127.0.0.1", 0), lambda: []).start()
    try:
        with pytest.raises(urllib.error.HTTPError, match="404"):
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{server.port}/", None, 5)
        for junk, answer in ((b"\x00" * 100 + b"\r\n\r\n", b"HTTP/1.1 405"), (b"G" * 100_000, b"")):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(junk)  # garbage gets a 405; a head past the limit, the door
            await writer.drain()
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(answer)
            writer.close()
        assert await scrape(server.port) == {}
        assert server.scrapes == 1
    finally:
        await server.close()


def test_serve_without_metrics_serves_none(tmp_path: Path) -> None:
    """The default: no --metrics, no endpoint (and the servers start)."""
    port, _ = serve_ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(tmp_path), "serve", "--bind", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert_started(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_serve_exports_both_roles(tmp_path: Path) -> None:
    """`punchthrough serve --metrics PORT`: the flag as an operator would use it."""
    port, metrics = serve_ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(tmp_path), "serve", "--bind", "127.0.0.1",
         "--port", str(port), "--metrics", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert_started(proc)
        got = asyncio.run(scrape(metrics))
        assert got[("punchthrough_relay_pairs_active", ())] == 0
        assert ("punchthrough_rendezvous_peers_online", ()) in got
        promtool_check(SCRAPED[-1])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize(
    ("role", "family"),
    [("rendezvous", "punchthrough_rendezvous_peers_online"), ("relay", "punchthrough_relay_pairs_active")],
)
def test_each_server_alone_exports_its_role(tmp_path: Path, role: str, family: str) -> None:
    port, metrics = serve_ports()
    argv = [sys.executable, "-m", "agent.cli", "--state-dir", str(tmp_path), role, "--bind", "127.0.0.1",
            "--port", str(port), "--metrics", str(metrics)]
    if role == "relay":
        argv.append("--open")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        got: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for _ in range(100):  # these print no line when up: ask until the endpoint answers
            try:
                got = asyncio.run(scrape(metrics))
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        assert (family, ()) in got, got
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
