"""`punchthrough serve`: a rendezvous server and a relay server in one process (hbbs + hbbr).

The relay listens on the rendezvous port + 1, which is where RustDesk clients
and our agents look for it when the server names no relay, and honours the
rendezvous server's pairing tickets (with `allow_unsigned`, RustDesk clients have
none: then it pairs anyone, as hbbr does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from agent.common.metrics import MetricsServer, parse_listen
from agent.servers.relay_server import RelayConfig, start_relay
from agent.servers.rendezvous_server import RendezvousConfig, StartupError, start_rendezvous
from agent.servers.server_metrics import relay_families, rendezvous_families

log = logging.getLogger(__name__)


async def serve_both(
    binds: list[str], port: int, state_dir: Path, allow_unsigned: bool = False, metrics: str = ""
) -> int:
    """`metrics`: PORT or HOST:PORT for a Prometheus endpoint with both roles' numbers ("" = off)."""
    rendezvous = await start_rendezvous(
        RendezvousConfig(
            binds=binds,
            port=port,
            db_path=state_dir / "rendezvous.sqlite3",
            key_file=state_dir / "id_ed25519",
            allow_unsigned=allow_unsigned,
        )
    )
    # port + 1 of the port actually bound: with --port 0 that is the one picked, not port 1
    relay_port = rendezvous.ports["tcp"] + 1
    try:
        if relay_port > 0xFFFF:
            raise StartupError(f"no port above {relay_port - 1} left for the relay")
        relay = await start_relay(
            RelayConfig(binds=binds, port=relay_port, server_keys=[rendezvous.core.public_key], open=allow_unsigned)
        )
    except OSError as exc:  # relay_server lets its bind error escape as is
        await rendezvous.close()
        raise StartupError(f"relay cannot bind {', '.join(binds)} port {relay_port}: {exc.strerror or exc}") from None
    except BaseException:
        await rendezvous.close()
        raise
    log.info(
        "serving rendezvous on %s (NAT test %s) and relay on %s; server key %s",
        rendezvous.ports["tcp"],
        rendezvous.ports["nat_test"],
        relay.port,
        rendezvous.public_key_b64,
    )
    exporter = None
    if metrics:
        exporter = await MetricsServer(
            parse_listen(metrics), lambda: rendezvous_families(rendezvous.stats()) + relay_families(relay.stats())
        ).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # after the handlers: whoever waits for this line may stop us with SIGTERM right away
    print(f"key: {rendezvous.public_key_b64}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        if exporter is not None:
            await exporter.close()
        await relay.close()
        await rendezvous.close()
    return 0


def run_servers(binds: list[str], port: int, state_dir: Path, allow_unsigned: bool = False, metrics: str = "") -> int:
    try:
        return asyncio.run(serve_both(binds, port, state_dir, allow_unsigned, metrics))
    except OSError as exc:  # the metrics port taken
        raise SystemExit(f"punchthrough: metrics {metrics}: {exc.strerror or exc}") from None
    except StartupError as exc:
        raise SystemExit(f"punchthrough: {exc}") from None
