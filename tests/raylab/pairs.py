"""Relayed pairs through the rendezvous server, as the agent makes them, for the multi-node lab.

Run inside the lab's client namespace: `python -m tests.raylab.pairs --server HOST:PORT --pairs N`.
Each pair is what an agent pair does on the relay path, minus the encryption the relay never
sees: B is registered (the agent's own Registrar), A asks the server for a relay to B
(RequestRelay, signed), the server picks a relay by load and health and pushes B the uuid and
ticket, B joins at the relay and answers, A joins with the answer. Then A streams random blocks
and B echoes them; A checks every byte that comes back.

Lines on stdout (JSON) drive the test: `{"up": ...}` once every pair is streaming (which relay
carries each); then it reads one line on stdin (the test kills a node meanwhile) and, from that
moment, opens a new short pair every `--every` seconds for `--after` seconds while the first pairs
keep streaming; `{"done": ...}` has every pair's outcome. Each pair has a deadline: nothing hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from agent.common.netutil import connect_tcp
from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.registrar import Registrar
from agent.rendezvous.requests import Reply, Signer, request_relay, send_relay_response
from agent.wire import messages
from agent.wire.addr import split_host_port
from agent.wire.frames import encode_frame
from agent.wire.peer_ids import derive_id

BLOCK = 16 * 1024
PAIR_DEADLINE = 10.0
"""Seconds a pair may take to join (request, push, both halves at the relay)."""


@dataclass
class Identity:
    signing_key: SigningKey
    uuid: bytes
    salt: int = 0

    @property
    def peer_id(self) -> str:
        return derive_id(bytes(self.signing_key.verify_key), self.salt)


def new_identity() -> Identity:
    return Identity(SigningKey.generate(), secrets.token_bytes(16))


async def join(relay: str, uuid: str, ticket: bytes, relay_name: str, peer_id: str) -> tuple[Any, Any]:
    """Connect to the relay and send RequestRelay as the agent's relay strategy does."""
    sock = await connect_tcp(relay, None, 3.0)
    reader, writer = await asyncio.open_connection(sock=sock)
    request = pb.RequestRelay(id=peer_id, uuid=uuid, ticket=ticket, relay_server=relay_name,
                              conn_type=pb.PORT_FORWARD)
    writer.write(encode_frame(messages.build(request_relay=request)))
    await writer.drain()
    return reader, writer


class B:
    """A registered peer that answers every RequestRelay push by joining the relay and echoing."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.me = new_identity()
        self.registrar = Registrar(server, self.me, self.on_push, interval=2.0)
        self.tasks: set[asyncio.Task[None]] = set()

    def on_push(self, kind: str, msg: Any, source: tuple[str, int]) -> None:
        if kind == "request_relay":
            task = asyncio.create_task(self.answer(msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def answer(self, push: Any) -> None:
        try:
            reader, writer = await join(push.relay_server, push.uuid, bytes(push.ticket), push.relay_server,
                                        self.me.peer_id)
        except (OSError, TimeoutError, ValueError):
            await send_relay_response(self.server, Reply.to(push, self.me.peer_id, push.relay_server, "lab"),
                                      push.uuid, refuse_reason="relay unreachable")
            return
        await send_relay_response(self.server, Reply.to(push, self.me.peer_id, push.relay_server, "lab"), push.uuid)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@dataclass
class Outcome:
    relay: str = ""
    ok: bool = False
    error: str = ""
    sent: int = 0
    verified: int = 0
    started: float = 0.0
    joined_ms: float = 0.0


async def pair(server: tuple[str, int], a: Identity, b: B, out: Outcome, until: asyncio.Event | None,
               blocks: int = 0, pause: float = 0.05) -> None:
    """Open a pair A -> b and echo blocks through it until `until` is set (or `blocks` are done)."""
    out.started = time.monotonic()
    try:
        async with asyncio.timeout(PAIR_DEADLINE):
            resp = await request_relay(server, b.me.peer_id, timeout=PAIR_DEADLINE,
                                       signer=Signer(a.peer_id, a.signing_key))
            out.relay = resp.relay_server
            reader, writer = await join(resp.relay_server, resp.uuid, bytes(resp.ticket), resp.relay_server,
                                        a.peer_id)
        out.joined_ms = round((time.monotonic() - out.started) * 1000, 1)
    except Exception as exc:  # every failure is an outcome, never a crash of the driver
        out.error = f"join: {type(exc).__name__}: {exc}"
        return
    try:
        n = 0
        while (until is None or not until.is_set()) and (blocks == 0 or n < blocks):
            block = os.urandom(BLOCK)
            writer.write(block)
            await writer.drain()
            out.sent += len(block)
            async with asyncio.timeout(5.0):
                back = await reader.readexactly(BLOCK)
            if hashlib.sha256(back).digest() != hashlib.sha256(block).digest():
                out.error = f"corrupt block after {out.verified} bytes"
                return
            out.verified += len(back)
            n += 1
            await asyncio.sleep(pause)
        out.ok = True
    except Exception as exc:
        out.error = f"stream: {type(exc).__name__}: {exc or 'no detail'}"
    finally:
        writer.close()


async def main(args: argparse.Namespace) -> int:
    host, port = split_host_port(args.server, 21116)
    server = (host, port)
    bs = [B(server) for _ in range(args.peers)]
    as_ = [new_identity() for _ in range(args.peers)]
    # A must be known to the server to sign requests: register each A too (no pushes expected).
    a_regs = [Registrar(server, a, lambda *_: None, interval=2.0) for a in as_]
    for r in [b.registrar for b in bs] + a_regs:
        await r.start()
    async with asyncio.timeout(20):
        for r in [b.registrar for b in bs] + a_regs:
            await r.registered.wait()
    stop = asyncio.Event()
    first = [Outcome() for _ in range(args.pairs)]
    tasks = []
    for i, out in enumerate(first):
        tasks.append(asyncio.create_task(pair(server, as_[i % args.peers], bs[i % args.peers], out, stop)))
        await asyncio.sleep(args.spacing)
    deadline = time.monotonic() + PAIR_DEADLINE + 5
    while time.monotonic() < deadline and any(o.verified == 0 and not o.error for o in first):
        await asyncio.sleep(0.05)
    print(json.dumps({"up": {"split": Counter(o.relay for o in first),
                             "streaming": sum(o.verified > 0 for o in first),
                             "failed": [o.error for o in first if o.error]}}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    killed = time.monotonic()
    later: list[Outcome] = []
    while time.monotonic() - killed < args.after:
        out = Outcome()
        later.append(out)
        tasks.append(asyncio.create_task(pair(server, as_[len(later) % args.peers], bs[len(later) % args.peers],
                                              out, None, blocks=4, pause=0.0)))
        await asyncio.sleep(args.every)
    await asyncio.sleep(args.tail)
    stop.set()
    async with asyncio.timeout(PAIR_DEADLINE + 10):
        await asyncio.gather(*tasks)
    for r in [b.registrar for b in bs] + a_regs:
        await r.close()
    report = {
        "first": [vars(o) | {"started": round(o.started - killed, 3)} for o in first],
        "later": [vars(o) | {"started": round(o.started - killed, 3)} for o in later],
    }
    print(json.dumps({"done": report}), flush=True)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--server", required=True, help="rendezvous server HOST:PORT")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--peers", type=int, default=10, help="B peers (and as many A identities) the pairs share")
    p.add_argument("--spacing", type=float, default=0.01, help="seconds between opening the first pairs")
    p.add_argument("--after", type=float, default=8.0, help="seconds of new pairs after the kill")
    p.add_argument("--every", type=float, default=0.25, help="seconds between new pairs after the kill")
    p.add_argument("--tail", type=float, default=1.0, help="seconds the first pairs stream after the last new one")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
