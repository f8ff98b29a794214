"""Soak of the rendezvous server: many simulated peers heartbeating while real agents connect (loopback only).

    python bench/load_bench.py                                    # the full soak: 10 000 peers, 600 s
    python bench/load_bench.py --duration 60 --peers 2000 --sample 10   # short variant (CI)
    python bench/load_bench.py --mode storm [--minutes 1] [--pairs 200] [--pair-kib 4096]

soak (default) -- the issue's "10 000 simulated peers registering and heartbeating against one
rendezvous server while real agents connect: no registration lost, punch requests answered,
memory flat over 10 minutes":

* The server is the real command, `python -m agent.cli rendezvous`, in its own process, so the RSS
  sampled is the server's alone (not this load generator's). Default limits: no per-IP limit is lifted.
* --peers simulated peers, each with its own UDP socket (its own "NAT mapping"), --peers-per-ip of
  them per source address in 127.1/16 (so the per-IP RegisterPk limits hold, as for real hosts).
  Each has a key of its own and registers as an agent does (RegisterPk for a challenge, then
  RegisterPk signed with it, each retried on loss), then sends RegisterPeer every --heartbeat
  seconds; the heartbeats of all peers are spread evenly over the period.
* --punch-rate punch requests per second, signed by a registered requester on 127.0.0.1, to random
  simulated peers: the server pushes PunchHole to the peer's UDP socket, the peer answers
  PunchHoleSent over TCP with the push's token, and the requester must get a PunchHoleResponse
  carrying the peer's address.
* Two in-process agents (agent.stack.LocalAgent, as tests/integration/test_load.py uses them) open
  a stream to each other through the server every --stream-every seconds and echo 64 KiB.
* Every --sample seconds: the server's RSS and CPU, and an OnlineRequest for every simulated ID
  (a registered peer the server calls offline is a lost registration).

At the end a table and a verdict: RSS growth from --baseline seconds (minute 2; half the run when
that is shorter) to the end, lost registrations, unanswered punch requests and heartbeats, failed
streams. Exit status 1 if any of those is non-zero or the growth exceeds --max-growth-pct.

storm -- the older round-based soak: registration storms (in-process servers, per-IP limits lifted)
and --pairs concurrent relayed pairs from one address, round after round for --minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.common.keyfile import load_or_create_signing_key
from agent.config import Config
from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_server import RelayConfig, start_relay
from agent.stack import LocalAgent
from agent.wire import addr as addrmod
from agent.wire import messages
from agent.wire.frames import FrameDecoder, encode_frame
from tests.agent_fixtures import echo_server, open_stream, prepare_state, transfer, wait_registered
from tests.signed import Member

ROOT = Path(__file__).resolve().parent.parent
REPLY_TIMEOUT = 3.0
"""Seconds before a RegisterPk is sent again (a real client retries too)."""
PROBE_TIMEOUT = 10.0
STREAM_BYTES = 64 * 1024
STARTUP_RE = re.compile(r"rendezvous on .*: udp/tcp (\d+), nat-test tcp (\d+); key (\S+);")


# --------------------------------------------------------------------------- the server process


@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    ps: psutil.Process
    port: int
    nat_port: int
    key: str
    log_path: Path
    db_path: Path

    def rss_mib(self) -> float:
        return float(self.ps.memory_info().rss) / (1 << 20)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        return int(self.proc.returncode)


def start_server(tmp: Path, relay_addr: str) -> ServerProc:
    state = tmp / "server"
    state.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "agent.cli", "--state-dir", str(state), "rendezvous"]
    cmd += ["--bind", "127.0.0.1", "--port", "0", "--relay", relay_addr]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = STARTUP_RE.search(log_path.read_text(errors="replace"))
        if m:
            return ServerProc(
                proc,
                psutil.Process(proc.pid),
                int(m.group(1)),
                int(m.group(2)),
                m.group(3),
                log_path,
                state / "rendezvous.sqlite3",
            )
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"rendezvous server did not start:\n{log_path.read_text(errors='replace')}")


# --------------------------------------------------------------------------- simulated peers


class Peer:
    __slots__ = ("heartbeat", "id", "ip", "member", "outstanding", "sock", "waiter")

    def __init__(self, member: Member, ip: str) -> None:
        self.member = member
        self.id = member.id
        self.ip = ip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((ip, 0))
        self.heartbeat = messages.build(register_peer=pb.RegisterPeer(id=self.id, serial=0))
        self.outstanding = 0
        """Heartbeats sent and not answered yet."""
        self.waiter: asyncio.Future[Any] | None = None


@dataclass
class Counts:
    reg_ok: int = 0
    reg_failed: int = 0
    reg_retries: int = 0
    reg_results: dict[int, int] = field(default_factory=dict)
    hb_sent: int = 0
    hb_answered: int = 0
    hb_request_pk: int = 0
    """Heartbeats answered "who are you?": the server forgot a registered peer."""
    send_errors: int = 0
    recv_errors: int = 0
    pushes_unexpected: int = 0
    punch_sent: int = 0
    punch_ok: int = 0
    punch_failed: dict[str, int] = field(default_factory=dict)
    punch_ms: list[float] = field(default_factory=list)
    streams_ok: int = 0
    streams_failed: int = 0
    stream_errors: list[str] = field(default_factory=list)
    stream_ms: list[float] = field(default_factory=list)

    def punch_fail(self, reason: str) -> None:
        self.punch_failed[reason] = self.punch_failed.get(reason, 0) + 1


class Swarm:
    """The simulated peers: one UDP socket each, read by one callback each."""

    def __init__(self, server: ServerProc, n: int, per_ip: int, counts: Counts) -> None:
        self.loop = asyncio.get_running_loop()
        self.to = ("127.0.0.1", server.port)
        self.server = server
        self.counts = counts
        self.tasks: set[asyncio.Task[None]] = set()
        self.peers: list[Peer] = []
        for i in range(n):
            ip_index = i // per_ip
            ip = f"127.1.{ip_index // 250}.{1 + ip_index % 250}"
            p = Peer(Member.new(f"soak{i:07d}".encode()), ip)
            self.peers.append(p)
            self.loop.add_reader(p.sock.fileno(), self._readable, p)
        self.prober = Peer(Member.new(b"soak-prober"), "127.0.0.1")
        """Signs the punch probes (a requester must be registered); its socket only registers it."""
        self.loop.add_reader(self.prober.sock.fileno(), self._readable, self.prober)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for p in [*self.peers, self.prober]:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(p.sock.fileno())
            p.sock.close()

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _send(self, p: Peer, payload: bytes) -> bool:
        try:
            p.sock.sendto(payload, self.to)
        except OSError:
            self.counts.send_errors += 1
            return False
        return True

    def _readable(self, p: Peer) -> None:
        c = self.counts
        while True:
            try:
                data = p.sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable while the server was down
                c.recv_errors += 1
                return
            try:
                kind, msg = messages.parse(data)
            except messages.MessageError:
                c.recv_errors += 1
                continue
            if kind == "register_peer_response":
                c.hb_answered += 1
                p.outstanding = max(0, p.outstanding - 1)
                if msg.request_pk:
                    c.hb_request_pk += 1
                    self._spawn(self.register(p))  # as a real client: register the key again
            elif kind == "register_pk_response":
                if p.waiter is not None and not p.waiter.done():
                    p.waiter.set_result(msg)
            elif kind == "punch_hole":
                self._spawn(self._hole_sent(p, msg))
            else:
                c.pushes_unexpected += 1

    async def register(self, p: Peer, attempts: int = 4) -> bool:
        """As the registrar does: ask for a challenge, then sign it (each step retried on loss)."""
        c = self.counts
        nonce = os.urandom(16)
        challenge = b""
        for attempt in range(2 * attempts):
            p.waiter = self.loop.create_future()
            if attempt > 1:
                c.reg_retries += 1
            self._send(p, p.member.register_pk(nonce, challenge))
            try:
                msg = await asyncio.wait_for(p.waiter, REPLY_TIMEOUT)
            except TimeoutError:
                continue
            finally:
                p.waiter = None
            result = int(msg.result)
            if result == pb.RegisterPkResponse.CHALLENGE:
                challenge = bytes(msg.challenge)
                continue
            c.reg_results[result] = c.reg_results.get(result, 0) + 1
            if result == pb.RegisterPkResponse.OK:
                if p is not self.prober:
                    c.reg_ok += 1
                return True
            break
        c.reg_failed += 1
        return False

    async def register_all(self, in_flight: int = 256) -> float:
        t0 = time.perf_counter()
        window = asyncio.Semaphore(in_flight)

        async def one(p: Peer) -> None:
            async with window:
                await self.register(p)

        await asyncio.gather(*(one(p) for p in self.peers))
        took = time.perf_counter() - t0
        await self.register(self.prober)
        return took

    async def heartbeat(self, period: float, until: float) -> None:
        """Every peer sends RegisterPeer once per `period`, all spread evenly over it."""
        n = len(self.peers)
        t0 = self.loop.time()
        sent = 0
        while self.loop.time() < until:
            due = int((self.loop.time() - t0) * n / period)
            while sent < due:
                p = self.peers[sent % n]
                if self._send(p, p.heartbeat):
                    p.outstanding += 1
                    self.counts.hb_sent += 1
                sent += 1
            await asyncio.sleep(0.01)

    async def _hole_sent(self, p: Peer, ph: Any) -> None:
        """B's answer to a PunchHole, as RustDesk sends it: a fresh TCP connection, PunchHoleSent, done."""
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((p.ip, 0))
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.loop.sock_connect(s, self.to)
                sent = pb.PunchHoleSent(
                    socket_addr=ph.socket_addr, id=p.id, nat_type=pb.ASYMMETRIC, answer_token=ph.answer_token
                )
                await self.loop.sock_sendall(s, encode_frame(messages.build(punch_hole_sent=sent)))
                while await self.loop.sock_recv(s, 4096):  # the server closes it
                    pass
        except (OSError, TimeoutError):
            self.counts.punch_fail("b_answer_failed")
        finally:
            s.close()

    async def punch_probe(self, target: Peer) -> None:
        """A asks for `target` over TCP; answered = a PunchHoleResponse carrying the target's address."""
        c = self.counts
        c.punch_sent += 1
        t0 = time.perf_counter()
        s = socket.socket()
        s.setblocking(False)
        decoder = FrameDecoder()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.loop.sock_connect(s, self.to)
                req = pb.PunchHoleRequest(id=target.id, nat_type=pb.ASYMMETRIC, version="1")
                await self.loop.sock_sendall(s, encode_frame(self.prober.member.request("punch_hole_request", req)))
                while True:
                    data = await self.loop.sock_recv(s, 4096)
                    if not data:
                        c.punch_fail("closed")
                        return
                    frames = decoder.feed(data)
                    if frames:
                        break
            kind, resp = messages.parse(frames[0], max_len=1 << 16)
            if kind != "punch_hole_response":
                c.punch_fail(f"answer_{kind}")
            elif not resp.socket_addr:
                c.punch_fail(f"failure_{pb.PunchHoleResponse.Failure.Name(resp.failure)}")
            elif addrmod.decode(resp.socket_addr).host != target.ip:
                c.punch_fail("wrong_address")
            else:
                c.punch_ok += 1
                c.punch_ms.append((time.perf_counter() - t0) * 1000)
        except TimeoutError:
            c.punch_fail("timeout")
        except OSError as exc:
            c.punch_fail(type(exc).__name__)
        finally:
            s.close()

    async def probes(self, rate: float, until: float) -> None:
        if rate <= 0:
            return
        while self.loop.time() < until:
            self._spawn(self.punch_probe(random.choice(self.peers)))
            await asyncio.sleep(1 / rate)

    async def online(self, chunk: int = 1000) -> int:
        """How many simulated peers the server calls online (OnlineRequest on the NAT-test port)."""
        r, w = await asyncio.open_connection("127.0.0.1", self.server.nat_port)
        decoder = FrameDecoder()
        up = 0
        try:
            for start in range(0, len(self.peers), chunk):
                part = [p.id for p in self.peers[start : start + chunk]]
                w.write(encode_frame(messages.build(online_request=pb.OnlineRequest(id="soakasker", peers=part))))
                frames: list[bytes] = []
                async with asyncio.timeout(PROBE_TIMEOUT):
                    while not frames:
                        data = await r.read(1 << 16)
                        if not data:
                            raise ConnectionError("server closed the OnlineRequest connection")
                        frames = decoder.feed(data)
                kind, msg = messages.parse(frames[0], max_len=1 << 16)
                assert kind == "online_response", kind
                up += sum(bool(msg.states[i // 8] & (0x80 >> (i % 8))) for i in range(len(part)))
        finally:
            w.close()
        return up


# --------------------------------------------------------------------------- two real agents


@dataclass
class Agents:
    a: LocalAgent
    b: LocalAgent
    a_dir: Path
    b_id: str
    echo_addr: str
    echo: asyncio.Server

    async def close(self) -> None:
        for agent in (self.a, self.b):
            with contextlib.suppress(Exception):
                await agent.close()
        self.echo.close()


async def start_agents(tmp: Path, server: ServerProc, relay_addr: str) -> Agents:
    echo, echo_addr = await echo_server()

    def cfg(**access: Any) -> Config:
        c = Config()
        c.agent.server = f"127.0.0.1:{server.port}"
        c.agent.server_key = server.key
        c.agent.relay = relay_addr
        c.agent.nat_test_port = server.nat_port
        c.agent.connect_timeout = 8.0
        for key, value in access.items():
            setattr(c.access, key, value)
        return c

    a_dir, b_dir = tmp / "agent-a", tmp / "agent-b"
    a_id = prepare_state(a_dir, cfg())
    b_id = prepare_state(b_dir, cfg(allow=[a_id], allow_targets=[echo_addr]))
    a, b = await LocalAgent(a_dir).start(), await LocalAgent(b_dir).start()
    await wait_registered(a, 30)
    await wait_registered(b, 30)
    return Agents(a, b, a_dir, b_id, echo_addr, echo)


async def streams(agents: Agents, every: float, until: float, counts: Counts) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        started = loop.time()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(60):
                sock, reply = await open_stream(agents.a_dir, agents.b_id, agents.echo_addr)
                if sock is None:
                    raise RuntimeError(f"open failed: {reply.get('error', reply)}")
                try:
                    payload = os.urandom(STREAM_BYTES)
                    got = await transfer(sock, payload)
                finally:
                    sock.close()
            if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
                raise RuntimeError(f"echo damaged ({len(got)} of {len(payload)} bytes)")
            counts.streams_ok += 1
            counts.stream_ms.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:
            counts.streams_failed += 1
            if len(counts.stream_errors) < 5:
                counts.stream_errors.append(f"{type(exc).__name__}: {exc}"[:200])
        await asyncio.sleep(max(0.0, every - (loop.time() - started)))


# --------------------------------------------------------------------------- the soak


@dataclass
class Row:
    t: float
    rss: float
    cpu_pct: float
    online: int
    offline: int
    hb_sent: int
    hb_answered: int
    punch_sent: int
    punch_ok: int
    streams_ok: int
    streams_failed: int


HEADER = (
    f"{'time s':>7} {'RSS MiB':>8} {'CPU %':>6} {'reg ok':>7} {'lost':>5} {'hb sent':>9} {'hb answered':>11} "
    f"{'punch sent':>10} {'punch ok':>8} {'streams ok':>10} {'failed':>6}"
)


def fmt(r: Row) -> str:
    return (
        f"{r.t:7.0f} {r.rss:8.1f} {r.cpu_pct:6.1f} {r.online:7d} {r.offline:5d} {r.hb_sent:9d} {r.hb_answered:11d} "
        f"{r.punch_sent:10d} {r.punch_ok:8d} {r.streams_ok:10d} {r.streams_failed:6d}"
    )


def db_rows(path: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return int(db.execute("SELECT count(*) FROM peer").fetchone()[0])
    except sqlite3.Error:
        return -1


async def soak(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.peers + 1024
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        if hard < need:
            raise SystemExit(f"{args.peers} peers need {need} descriptors; the hard limit is {hard}")
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    loop = asyncio.get_running_loop()
    # The relay honours the rendezvous server's tickets: it gets that server's key (made here first).
    server_key = load_or_create_signing_key(tmp / "server" / "id_ed25519")
    relay = await start_relay(RelayConfig(binds=["127.0.0.1"], port=0, server_keys=[bytes(server_key.verify_key)]))
    relay_addr = f"127.0.0.1:{relay.port}"
    server = start_server(tmp, relay_addr)
    if args.nice:
        os.nice(args.nice)  # the load generator only: the server was started before
    counts = Counts()
    rows: list[Row] = []
    swarm: Swarm | None = None
    agents: Agents | None = None
    max_offline = 0
    print(
        f"soak: server pid {server.proc.pid} (python -m agent.cli rendezvous, udp/tcp {server.port}, nat-test "
        f"{server.nat_port}), {args.peers} peers ({args.peers_per_ip} per source IP), heartbeat every "
        f"{args.heartbeat:g} s, {args.punch_rate:g} punch probes/s, a stream every {args.stream_every:g} s, "
        f"{args.duration:g} s; state in {tmp}",
        flush=True,
    )
    try:
        agents = await start_agents(tmp, server, relay_addr)
        swarm = Swarm(server, args.peers, args.peers_per_ip, counts)
        took = await swarm.register_all()
        print(
            f"registered {counts.reg_ok}/{args.peers} peers in {took:.1f} s ({args.peers / took:,.0f}/s), "
            f"{counts.reg_retries} retries, results {counts.reg_results}; server RSS {server.rss_mib():.1f} MiB",
            flush=True,
        )
        t0 = loop.time()
        until = t0 + args.duration
        cpu_prev, t_prev = server.cpu_s(), t0
        workers = [
            loop.create_task(swarm.heartbeat(args.heartbeat, until)),
            loop.create_task(swarm.probes(args.punch_rate, until)),
            loop.create_task(streams(agents, args.stream_every, until, counts)),
        ]

        async def sample() -> None:
            nonlocal cpu_prev, t_prev, max_offline
            assert swarm is not None
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.proc.returncode}")
            now = loop.time()
            cpu = server.cpu_s()
            online = await swarm.online()
            offline = counts.reg_ok - online
            max_offline = max(max_offline, offline)
            row = Row(
                now - t0,
                server.rss_mib(),
                100 * (cpu - cpu_prev) / max(now - t_prev, 1e-9),
                online,
                offline + counts.reg_failed,
                counts.hb_sent,
                counts.hb_answered,
                counts.punch_sent,
                counts.punch_ok,
                counts.streams_ok,
                counts.streams_failed,
            )
            cpu_prev, t_prev = cpu, now
            rows.append(row)
            print(fmt(row), flush=True)

        print(HEADER, flush=True)
        await sample()
        next_sample = t0 + args.sample
        while next_sample < until - 1:
            await asyncio.sleep(max(0.0, next_sample - loop.time()))
            await sample()
            next_sample += args.sample
        await asyncio.gather(*workers)
        await asyncio.sleep(REPLY_TIMEOUT)  # let the last answers arrive
        await sample()
    finally:
        if agents is not None:
            await agents.close()
        if swarm is not None:
            swarm.close()
        status = server.stop()
        await relay.close()
    return verdict(args, server, rows, counts, max_offline, status)


def verdict(
    args: argparse.Namespace, server: ServerProc, rows: list[Row], c: Counts, max_offline: int, status: int
) -> int:
    baseline_t = min(args.baseline, args.duration / 2)
    base = next((r for r in rows if r.t >= baseline_t - 1), rows[0])
    end = rows[-1]
    growth = end.rss - base.rss
    pct = 100 * growth / base.rss if base.rss else 0.0
    hb_unanswered = c.hb_sent - c.hb_answered
    punch_unanswered = c.punch_sent - c.punch_ok
    log_text = server.log_path.read_text(errors="replace")
    errors = sum(1 for line in log_text.splitlines() if " ERROR " in line or line.startswith("Traceback"))
    drops = sum(1 for line in log_text.splitlines() if "dropped input" in line)
    rows_in_db = db_rows(server.db_path)
    punch_p50 = statistics.median(c.punch_ms) if c.punch_ms else float("nan")
    punch_p99 = sorted(c.punch_ms)[int(0.99 * (len(c.punch_ms) - 1))] if c.punch_ms else float("nan")
    stream_p50 = statistics.median(c.stream_ms) if c.stream_ms else float("nan")
    print(
        f"\nregistrations: {c.reg_ok} ok, {c.reg_failed} failed ({c.reg_retries} retries, results {c.reg_results}); "
        f"peers offline at worst sample {max_offline}; heartbeats answered request_pk {c.hb_request_pk}; "
        f"rows in the server's DB {rows_in_db} (peers + 2 agents)\n"
        f"heartbeats: {c.hb_sent} sent, {c.hb_answered} answered, {hb_unanswered} unanswered; send errors "
        f"{c.send_errors}, receive errors {c.recv_errors}, unexpected pushes {c.pushes_unexpected}\n"
        f"punch requests: {c.punch_sent} sent, {c.punch_ok} answered with the peer's address "
        f"(p50 {punch_p50:.1f} ms, p99 {punch_p99:.1f} ms), failures {c.punch_failed or 'none'}\n"
        f"agent streams: {c.streams_ok} ok (p50 {stream_p50:.0f} ms for open + {STREAM_BYTES >> 10} KiB echo), "
        f"{c.streams_failed} failed {c.stream_errors or ''}\n"
        f"server: exit status {status} after SIGTERM, {errors} error lines and {drops} drop lines in its log "
        f"({server.log_path})"
    )
    lost = c.reg_failed + max_offline + c.hb_request_pk
    ok = (
        lost == 0
        and punch_unanswered == 0
        and c.streams_failed == 0
        and c.streams_ok > 0
        and pct <= args.max_growth_pct
        and status == 0
        and errors == 0
    )
    print(
        f"VERDICT: server RSS {base.rss:.1f} MiB at {base.t:.0f} s -> {end.rss:.1f} MiB at {end.t:.0f} s: "
        f"{growth:+.1f} MiB ({pct:+.1f}%, limit {args.max_growth_pct:g}%); lost registrations {lost}; "
        f"unanswered punch requests {punch_unanswered} of {c.punch_sent}; unanswered heartbeats {hb_unanswered} "
        f"of {c.hb_sent}; agent streams failed {c.streams_failed} of {c.streams_ok + c.streams_failed} "
        f"-> {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    return 0 if ok else 1


# --------------------------------------------------------------------------- storm rounds (the older soak)


async def storm(args: argparse.Namespace) -> int:
    # Lazy: these helpers live in the load test, which only this mode needs.
    from agent.servers.rendezvous_core import Limits
    from agent.servers.rendezvous_server import RendezvousConfig, start_rendezvous
    from tests.integration.relay_helpers import relay_cfg
    from tests.integration.test_load import online_states, register_peers, relay_pairs, rss_mib, sim_peers

    tmp = Path(tempfile.mkdtemp(prefix="load-bench-"))
    rv = await start_rendezvous(
        RendezvousConfig(
            binds=["127.0.0.1"],
            port=0,
            db_path=tmp / "rv.sqlite3",
            key_file=tmp / "rv_key",
            limits=Limits(ip_block_limit=1 << 30, ip_ids_limit=1 << 30),
        )
    )
    # Every pair comes from 127.0.0.1 (many simulated hosts, one address): lift the per-IP caps.
    relay = await start_relay(relay_cfg(max_waiting_per_ip=0, max_handshaking_per_ip=0))
    t_start = time.monotonic()
    deadline = t_start + args.minutes * 60
    failures = 0

    def sample(tag: str) -> None:
        st, rs = rv.stats(), relay.stats()
        print(
            f"[{time.monotonic() - t_start:7.1f} s] {tag:5} RSS {rss_mib():7.1f} MiB  peers in DB "
            f"{st['peers_registered']:>8}  online {st['peers_online']:>8}  relay pairs {rs['pairs_total']:>6}  "
            f"relayed {rs['bytes_relayed'] / (1 << 20):9.0f} MiB",
            flush=True,
        )

    async def sampler() -> None:
        while True:
            await asyncio.sleep(args.sample)
            sample("rss")

    sample("start")
    ticker = asyncio.ensure_future(sampler())
    rnd = 0
    try:
        while time.monotonic() < deadline:
            peers = sim_peers(args.peers, f"soak{rnd:04d}x")
            took = await register_peers(rv, peers)
            online = await online_states(rv.nat_port, [m.id for m in peers])
            lost = online.count(False)
            failures += lost > 0
            durations = await relay_pairs(relay.port, args.pairs, args.pair_kib << 10)
            rates = sorted(2 * (args.pair_kib << 10) / d / (1 << 20) for d in durations)
            print(
                f"round {rnd}: {args.peers} registrations in {took:.2f} s = {args.peers / took:,.0f}/s, "
                f"lost {lost}; {args.pairs} pairs x {args.pair_kib} KiB each way: per-stream MiB/s min "
                f"{rates[0]:.2f} median {statistics.median(rates):.2f} max {rates[-1]:.2f} "
                f"(max/min {rates[-1] / rates[0]:.1f})",
                flush=True,
            )
            rnd += 1
    except AssertionError as exc:
        print(f"round {rnd} FAILED: {exc}", flush=True)
        failures += 1
    finally:
        ticker.cancel()
        sample("end")
        await relay.close()
        await rv.close()
    return 1 if failures else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--mode", choices=["soak", "storm"], default="soak")
    ap.add_argument("--duration", type=float, default=600.0, help="soak: seconds of heartbeating (default 600)")
    ap.add_argument("--minutes", type=float, default=None, help="storm: minutes of rounds; soak: --duration/60")
    ap.add_argument("--peers", type=int, default=10_000, help="simulated peers (storm: fresh IDs per round)")
    ap.add_argument("--peers-per-ip", type=int, default=25, help="soak: simulated peers per source address")
    ap.add_argument("--heartbeat", type=float, default=4.0, help="soak: seconds between one peer's RegisterPeers")
    ap.add_argument("--punch-rate", type=float, default=2.0, help="soak: punch requests per second")
    ap.add_argument("--stream-every", type=float, default=3.0, help="soak: seconds between agent streams")
    ap.add_argument("--baseline", type=float, default=120.0, help="soak: RSS growth is measured from here")
    ap.add_argument("--max-growth-pct", type=float, default=10.0, help="soak: RSS growth that fails the verdict")
    ap.add_argument("--nice", type=int, default=0, help="soak: nice increment for the load generator only")
    ap.add_argument("--pairs", type=int, default=200, help="storm: concurrent relayed pairs per round")
    ap.add_argument("--pair-kib", type=int, default=4096, help="storm: KiB each way per pair")
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    args = ap.parse_args()
    if args.mode == "soak":
        if args.minutes is not None:
            args.duration = args.minutes * 60
        sys.exit(asyncio.run(soak(args)))
    if args.minutes is None:
        args.minutes = 1.0
    sys.exit(asyncio.run(storm(args)))


if __name__ == "__main__":
    main()
