"""`punchthrough-ops relays` against live metrics endpoints on loopback, and one that is not there."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from agent.common.metrics import MetricsServer
from agent.servers.server_metrics import pool_families
from ops import cli as ops_cli
from tests.unit.test_cli import assert_one_line_error, run
from tests.unit.test_relays_view import REPLICAS


def test_ops_relays_scrapes_live_endpoints_and_names_a_dead_one(capsys: pytest.CaptureFixture[str]) -> None:
    ready = threading.Event()
    stop = threading.Event()
    ports: list[int] = []

    async def serve() -> None:
        server = await MetricsServer(("127.0.0.1", 0), lambda: pool_families(REPLICAS)).start()
        ports.append(server.port)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await server.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        rc, out, err = run(ops_cli.main, ["relays", f"127.0.0.1:{ports[0]}"], capsys)
        assert rc == 0 and err == "" and "10.0.0.1" in out and "2/2" in out
        rc, out, err = run(ops_cli.main, ["relays", f"127.0.0.1:{ports[0]}", "--json"], capsys)
        assert rc == 0 and '"replicas"' in out
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        rc, out, err = run(ops_cli.main, ["relays", f"127.0.0.1:{closed}", "--timeout", "2"], capsys)
        message = assert_one_line_error(rc, err, prog="punchthrough-ops", statuses=(2,))
        assert f"127.0.0.1:{closed}" in message and out == ""
    finally:
        stop.set()
        thread.join(10)
