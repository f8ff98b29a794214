"""`punchthrough rendezvous`: the asyncio shell around RendezvousCore (the hbbs role).

This module owns the sockets, the clock and the database writer; every decision is
in `rendezvous_core.py`. Per bind address it serves UDP and TCP on `port` and on
the NAT-test port (port-1: TCP as RustDesk's, UDP for the NAT probe's mapping and
filtering tests). Durable writes (new ID bindings) go to a worker thread
in batches, and the replies that depend on them are held back until they are
committed, so "OK" always means "bound on disk" while the event loop never waits
for an fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common.ip_caps import PerIpCap, source_key, unread_bytes
from agent.common.keyfile import KeyFileError, load_or_create_signing_key
from agent.common.metrics import MetricsServer, parse_listen
from agent.proto import rendezvous_pb2 as pb
from agent.servers.registry import PeerRow, Registry
from agent.servers.rendezvous_core import (
    RELAY_REFUSED,
    Action,
    CloseTcp,
    Limits,
    Persist,
    RendezvousCore,
    Role,
    SendTcp,
    SendUdp,
)
from agent.servers.server_metrics import rendezvous_families
from agent.servers.udp_reply import ReplyingUdp
from agent.wire import messages
from agent.wire.addr import SockAddr, to_v4_if_mapped
from agent.wire.frames import FrameDecoder, FrameError, encode_frame
from agent.wire.ports import RENDEZVOUS_PORT

log = logging.getLogger("punchthrough.rendezvous")


@dataclass(kw_only=True)
class RendezvousConfig:
    binds: list[str] = field(default_factory=lambda: ["0.0.0.0", "::"])
    port: int = RENDEZVOUS_PORT  # UDP + TCP; 0 = ephemeral (tests)
    relays: list[str] = field(default_factory=list)
    """"HOST:PORT" handed to peers, round robin; ":PORT" means this server's host (as each peer
    reaches it); none means RustDesk's default, this server's host and port + 1."""
    db_path: Path
    key_file: Path
    always_relay: bool = False
    allow_unsigned: bool = False
    """Also serve RustDesk clients: unsigned registrations (never over a signed binding) and unsigned
    requests. Off by default: then every ID is bound to a key that signed for it."""
    nat_test_port: int | None = None  # None -> port-1 (ephemeral when port == 0)
    idle_timeout: float = 30.0  # TCP connections with no frame for this long are closed
    max_frame: int = 64 * 1024  # larger TCP frames are refused before buffering
    max_tcp_connections: int = 4096
    max_idle_tcp_per_ip: int = 128
    """Connections from one source IP (an IPv6 /64 counts as one) that have not sent a frame yet; at
    the cap that IP's oldest one with nothing unread is closed (0 = no cap). Loopback is not exempt."""
    max_tcp_per_ip: int = 1024
    """All open connections from one source IP (/64), talking or not; past it that IP's newcomers are
    refused (0 = no cap). An agent holds one long-lived connection here only when its UDP does not
    get through (it registers over TCP; punch requests and NAT tests last a second), so this binds a
    network of many such agents behind one address, and a host that keeps connections alive with
    heartbeats to hold slots: without it one address could fill `max_tcp_connections`."""
    limits: Limits = field(default_factory=Limits)
    relay_check_interval: float = 2.0
    """Seconds between health checks of each relay in `relays` (its load decides who gets a new pair)."""
    metrics: str = ""
    """[HOST:]PORT of a Prometheus endpoint (agent/common/metrics.py); "" = off."""


RELAY_CHECK_TIMEOUT = 1.0


async def relay_load(relay: str, timeout: float = RELAY_CHECK_TIMEOUT) -> int | None:
    """A relay's pairs (active + waiting), None when it does not answer in time, RELAY_REFUSED when
    its host refuses the connection. ":PORT" is a relay on this host."""
    host, _, port = relay.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(encode_frame(messages.build(hc=pb.HealthCheck())))
                decoder = FrameDecoder(4096)
                while data := await reader.read(4096):
                    for payload in decoder.feed(data):
                        kind, sub = messages.parse(payload)
                        if kind == "hc":
                            return int(sub.pairs_active) + int(sub.waiting)
            finally:
                writer.close()
    except ConnectionRefusedError:
        return RELAY_REFUSED
    except (OSError, TimeoutError, ValueError, FrameError, messages.MessageError):
        return None
    return None


class StartupError(Exception):
    """The server cannot start (bad bind address, port taken); the message is one line."""


# --------------------------------------------------------------------------- sockets

_V6_UNAVAILABLE = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def _family(host: str) -> socket.AddressFamily:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise StartupError(f"bind address must be an IP address, got {host!r}") from None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _usable_binds(binds: Sequence[str]) -> list[str]:
    """Drop the IPv6 wildcard (with a warning) when this host has no IPv6."""
    out = []
    for host in binds:
        if _family(host) == socket.AF_INET6:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                    s.bind((host, 0))
            except OSError as exc:
                if host == "::" and exc.errno in _V6_UNAVAILABLE:
                    log.warning("IPv6 is unavailable here (%s); not listening on [::]", exc.strerror)
                    continue
                raise StartupError(f"cannot bind {host}: {exc.strerror}") from None
        out.append(host)
    if not out:
        raise StartupError("no usable bind address")
    return out


UDP_RCVBUF = 4 << 20


def _make_socket(host: str, port: int, kind: int, v6only: bool) -> socket.socket:
    fam = _family(host)
    sock = socket.socket(fam, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            # The kernel default (~208 KiB) holds about 250 small datagrams: a burst of
            # registrations overflowed it in the load test. The kernel caps this at rmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Sockets:
    udp: list[socket.socket]
    tcp: list[socket.socket]
    nat: list[socket.socket]
    port: int
    nat_port: int
    nat_udp: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for s in self.udp + self.tcp + self.nat + self.nat_udp:
            s.close()


def _open_sockets(binds: Sequence[str], port: int, nat_port: int | None) -> _Sockets:
    """Bind every address on the same UDP/TCP port (and NAT-test port); with port 0, find a free pair."""
    has_v4 = any(_family(h) == socket.AF_INET for h in binds)
    v6only = has_v4  # [::] beside 0.0.0.0 must be v6-only; alone it serves both families
    attempts = 50 if port == 0 or nat_port == 0 else 1
    for attempt in range(attempts):
        opened = _Sockets([], [], [], port, 0)
        what = ""
        try:
            for host in binds:
                what = f"UDP {host}:{opened.port}"
                s = _make_socket(host, opened.port, socket.SOCK_DGRAM, v6only)
                opened.udp.append(s)
                opened.port = s.getsockname()[1]
            for host in binds:
                what = f"TCP {host}:{opened.port}"
                opened.tcp.append(_make_socket(host, opened.port, socket.SOCK_STREAM, v6only))
            want = nat_port if nat_port is not None else (port - 1 if port > 1 else 0)
            opened.nat_port = want
            for host in binds:
                what = f"TCP {host}:{opened.nat_port} (NAT test)"
                s = _make_socket(host, opened.nat_port, socket.SOCK_STREAM, v6only)
                opened.nat.append(s)
                opened.nat_port = s.getsockname()[1]
            for host in binds:
                what = f"UDP {host}:{opened.nat_port} (NAT test)"
                opened.nat_udp.append(_make_socket(host, opened.nat_port, socket.SOCK_DGRAM, v6only))
            return opened
        except OSError as exc:
            opened.close()
            if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                continue
            raise StartupError(f"cannot bind {what}: {exc.strerror or exc}") from None
    raise StartupError("no free port found")  # pragma: no cover - the loop returns or raises


# --------------------------------------------------------------------------- protocols


def _on_udp(server: RendezvousServer, via: int, role: Role = "main") -> Callable[[bytes, Any], None]:
    def datagram_received(data: bytes, addr: Any) -> None:
        now = server.loop.time()
        try:
            src = SockAddr.of(addr[0], addr[1])
            server.execute(server.core.handle_udp(data, src, via, now, role))
        except Exception:
            server.internal_error(str(addr[0]), now)

    return datagram_received


class _TcpConn(asyncio.Protocol):
    __slots__ = ("decoder", "id", "last_activity", "local", "role", "server", "spoke", "src", "transport")

    def __init__(self, server: RendezvousServer, role: Role) -> None:
        self.server = server
        self.role = role
        self.decoder = FrameDecoder(server.cfg.max_frame)
        self.id = 0
        self.src = SockAddr.of("0.0.0.0", 0)
        self.local: SockAddr | None = None
        """Our address this connection came in on (where the client reached us)."""
        self.transport: asyncio.Transport | None = None
        self.last_activity = server.loop.time()
        self.spoke = False
        """A complete frame arrived: a real client, not an idle connection holding a slot."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.src = to_v4_if_mapped(SockAddr.of(peer[0], peer[1]))
        here = transport.get_extra_info("sockname")
        self.local = to_v4_if_mapped(SockAddr.of(here[0], here[1])) if here else None
        self.server.conn_opened(self)

    def data_received(self, data: bytes) -> None:
        srv = self.server
        transport = self.transport
        assert transport is not None
        now = srv.loop.time()
        try:
            payloads = self.decoder.feed(data)
        except FrameError as exc:
            srv.core.drop("frame_too_large", self.src, now, str(exc))
            transport.abort()
            return
        if payloads:
            self.last_activity = now
            if not self.spoke:
                self.spoke = True
                srv.conn_spoke(self)
        for payload in payloads:
            if transport.is_closing():
                return
            if not payload:
                continue  # an empty frame is a heartbeat
            try:
                srv.execute(srv.core.handle_tcp(self.id, self.src, self.role, payload, now, self.local))
            except Exception:
                srv.internal_error(self.src.host, now)

    def eof_received(self) -> bool | None:
        if self.decoder.buffered:
            self.server.core.drop("truncated_frame", self.src, self.server.loop.time())
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conn_lost(self)

    def pause_writing(self) -> None:
        # A client that sends requests but does not read answers stops being read.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


# --------------------------------------------------------------------------- server


class RendezvousServer:
    """A running server; create with `await start_rendezvous(cfg)`, stop with `await close()`."""

    def __init__(self, cfg: RendezvousConfig, core: RendezvousCore, reader: Registry, writer: Registry) -> None:
        self.cfg = cfg
        self.core = core
        self.loop = asyncio.get_running_loop()
        self._reader = reader
        self._writer = writer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rendezvous-db")
        self._write_queue: list[tuple[list[PeerRow], list[Action]]] = []
        self._write_task: asyncio.Task[None] | None = None
        self._udp: list[ReplyingUdp] = []
        self._udp_v6: list[bool] = []
        self._servers: list[asyncio.Server] = []
        self._conns: dict[int, _TcpConn] = {}
        self._idle_per_ip: PerIpCap[int] = PerIpCap(cfg.max_idle_tcp_per_ip)
        self._open_per_ip: Counter[str] = Counter()
        """Ids of the connections that have not sent a frame yet, by source IP."""
        self._next_conn = 1
        self._housekeeping: asyncio.Task[None] | None = None
        self._relay_checks: asyncio.Task[None] | None = None
        self._closed = False
        self.udp_port = 0
        self.tcp_port = 0
        self.nat_port = 0

    @property
    def public_key_b64(self) -> str:
        """The key clients configure (and send as licence_key); also in KEY_FILE.pub."""
        return self.core.public_key_b64

    @property
    def ports(self) -> dict[str, int]:
        return {"udp": self.udp_port, "tcp": self.tcp_port, "nat_test": self.nat_port}

    async def _start(self) -> None:
        cfg = self.cfg
        binds = _usable_binds(cfg.binds)
        socks = _open_sockets(binds, cfg.port, cfg.nat_test_port)
        try:
            # UDP endpoints: the main port's first, then the NAT-test port's in the same order, so
            # endpoint `via` and `via ± n` are one address's two ports (`_send_udp`'s other_port)
            for via, (sock, role) in enumerate([(s, "main") for s in socks.udp] + [(s, "nat") for s in socks.nat_udp]):
                udp = ReplyingUdp(sock, _on_udp(self, via, role), self._udp_send_error)  # type: ignore[arg-type]
                udp.start(self.loop)
                self._udp.append(udp)
                self._udp_v6.append(sock.family == socket.AF_INET6)
            for sock in socks.tcp:
                self._servers.append(await self.loop.create_server(lambda: _TcpConn(self, "main"), sock=sock))
            for sock in socks.nat:
                self._servers.append(await self.loop.create_server(lambda: _TcpConn(self, "nat"), sock=sock))
        except BaseException:
            socks.close()
            raise
        self.udp_port = self.tcp_port = socks.port
        self.nat_port = socks.nat_port
        self._housekeeping = self.loop.create_task(self._housekeep())
        if cfg.relays:
            self._relay_checks = self.loop.create_task(self._check_relays())
        log.info(
            "rendezvous on %s: udp/tcp %d, nat-test tcp %d; key %s; relays %s%s",
            ", ".join(binds),
            self.udp_port,
            self.nat_port,
            self.public_key_b64,
            ",".join(cfg.relays) or "(none)",
            "; always relay" if cfg.always_relay else "",
        )
        if cfg.allow_unsigned:
            log.warning("unsigned registrations and requests allowed (RustDesk clients): their IDs are first come")

    # ------------------------------------------------------------------ actions

    def execute(self, actions: list[Action]) -> None:
        """Carry out the core's actions; anything after a Persist waits for the commit."""
        if not actions:
            return
        rows = [a.row for a in actions if isinstance(a, Persist)]
        if rows:
            self._write_queue.append((rows, [a for a in actions if not isinstance(a, Persist)]))
            if self._write_task is None or self._write_task.done():
                self._write_task = self.loop.create_task(self._write_loop())
            return
        for action in actions:
            if isinstance(action, SendUdp):
                self._send_udp(action)
            elif isinstance(action, SendTcp):
                conn = self._conns.get(action.conn)
                if conn is not None and conn.transport is not None and not conn.transport.is_closing():
                    conn.transport.write(encode_frame(action.payload))
            elif isinstance(action, CloseTcp):
                conn = self._conns.get(action.conn)
                if conn is not None and conn.transport is not None:
                    conn.transport.close()

    def _send_udp(self, action: SendUdp) -> None:
        if not 0 <= action.via < len(self._udp):
            return
        received_on = self._udp[action.via]
        host = action.addr.host
        if self._udp_v6[action.via] and action.addr.ip.version == 4:
            host = f"::ffff:{host}"  # a dual-stack [::] socket reaches IPv4 peers through mapped addresses
        if action.other_port:  # same address, other port: the answer leaves from where the request came in
            half = len(self._udp) // 2
            partner = self._udp[action.via + half if action.via < half else action.via - half]
            partner.sendto(action.payload, (host, action.addr.port), like=received_on)
            return
        received_on.sendto(action.payload, (host, action.addr.port))

    def _udp_send_error(self) -> None:
        self.core.events["udp_send_error"] += 1

    async def _write_loop(self) -> None:
        """Group commit: everything queued while one batch commits goes into the next."""
        while self._write_queue:
            batch, self._write_queue = self._write_queue, []
            rows = [row for rows, _ in batch for row in rows]
            try:
                refused = await self.loop.run_in_executor(self._executor, self._writer.put_many, rows)
                if refused:
                    self.core.events["db_refused_other_owner"] += refused
                    log.warning("database refused %d binding(s) owned by another key or uuid", refused)
            except sqlite3.Error as exc:
                # Upstream answers OK even when the DB write fails; we do the same (the
                # binding holds in memory) but say so loudly.
                self.core.events["db_write_failed"] += len(rows)
                log.error("database write failed for %d row(s): %s", len(rows), exc)
            self.core.events["db_commits"] += 1
            for _, deferred in batch:
                self.execute(deferred)

    # ------------------------------------------------------------------ connections

    def conn_opened(self, conn: _TcpConn) -> None:
        assert conn.transport is not None
        if self._closed:
            conn.transport.abort()
            return
        now = self.loop.time()
        conn.id = self._next_conn
        self._next_conn += 1
        ip = source_key(conn.src.host)
        if self.cfg.max_tcp_per_ip and self._open_per_ip[ip] >= self.cfg.max_tcp_per_ip:
            self.core.drop("too_many_connections_per_ip", conn.src, now)
            conn.transport.abort()
            return
        # One source IP at its cap of silent connections makes room among its own (agent/common/ip_caps.py
        # says why the oldest goes rather than the newcomer); that also keeps it off the total.
        for old_id in self._idle_per_ip.admit(source_key(conn.src.host), conn.id, self._conn_busy):
            old = self._conns.get(old_id)
            if old is not None:
                self._evict(old, "evicted_idle_connection_per_ip", now)
        if len(self._conns) >= self.cfg.max_tcp_connections:
            # Full: close the oldest connection that never sent a frame, so idle sockets from many
            # hosts cannot lock real clients out until they time out; if every slot is a real
            # client, refuse the newcomer.
            idle = next((c for c in self._conns.values() if not c.spoke), None)
            if idle is None or idle.transport is None:
                self._idle_per_ip.discard(conn.id)
                self.core.drop("too_many_connections", conn.src, now)
                conn.transport.abort()
                return
            self._evict(idle, "evicted_idle_connection", now)
        self._conns[conn.id] = conn
        self._open_per_ip[ip] += 1

    def _conn_busy(self, conn_id: int) -> bool:
        """Its first frame is in the kernel already (an accept burst): not idle, just not read yet."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.transport is None:
            return False
        sock = conn.transport.get_extra_info("socket")
        return sock is not None and unread_bytes(sock.fileno()) > 0

    def _forget(self, conn: _TcpConn) -> None:
        del self._conns[conn.id]
        self._idle_per_ip.discard(conn.id)
        ip = source_key(conn.src.host)
        self._open_per_ip[ip] -= 1
        if self._open_per_ip[ip] <= 0:
            del self._open_per_ip[ip]

    def _evict(self, conn: _TcpConn, reason: str, now: float) -> None:
        self.core.drop(reason, conn.src, now)
        self._forget(conn)
        self.core.tcp_closed(conn.id)
        if conn.transport is not None:
            conn.transport.abort()

    def conn_spoke(self, conn: _TcpConn) -> None:
        """A first complete frame arrived: no longer an idle connection."""
        self._idle_per_ip.discard(conn.id)

    def conn_lost(self, conn: _TcpConn) -> None:
        if self._conns.get(conn.id) is conn:
            self._forget(conn)
            self.core.tcp_closed(conn.id)

    def open_from(self, host: str) -> int:
        """Open connections from this IP (its IPv6 /64), talking or not."""
        return self._open_per_ip.get(source_key(host), 0)

    def idle_from(self, host: str) -> int:
        """Connections from this IP (its IPv6 /64) that have not sent a frame yet."""
        return self._idle_per_ip.count(source_key(host))

    def internal_error(self, source: str, now: float) -> None:
        if self.core.drops.drop("internal_error", source, now):
            log.exception("internal error while handling input from %s", source)

    async def _housekeep(self) -> None:
        interval = max(0.01, min(1.0, self.cfg.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            self.core.wall_offset = time.time() - now  # follows clock adjustments
            self.core.tick(now)
            idle_before = now - self.cfg.idle_timeout
            for conn in list(self._conns.values()):
                if conn.last_activity < idle_before and conn.transport is not None:
                    self.core.events["tcp_idle_closed"] += 1
                    conn.transport.close()

    async def _check_relays(self) -> None:
        """Ask every relay for its load now and then (a HealthCheck frame; agent/servers/relay_core.py)."""
        while True:
            results = await asyncio.gather(*(relay_load(r) for r in self.cfg.relays))
            for relay, load in zip(self.cfg.relays, results, strict=True):
                self.core.relay_checked(relay, load)
            await asyncio.sleep(self.cfg.relay_check_interval)

    # ------------------------------------------------------------------ status / stop

    def stats(self) -> dict[str, Any]:
        out = self.core.stats(self.loop.time())
        try:
            out["peers_registered"] = self._reader.count()
        except sqlite3.Error:
            out["peers_registered"] = -1
        out["tcp_connections"] = len(self._conns)
        out["tcp_idle"] = len(self._idle_per_ip)
        out["tcp_idle_max_per_ip"] = self._idle_per_ip.max_count()
        out["tcp_max_per_ip"] = max(self._open_per_ip.values(), default=0)
        out["db_writes_queued"] = sum(len(rows) for rows, _ in self._write_queue)
        out["ports"] = self.ports
        return out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._housekeeping, self._relay_checks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for server in self._servers:
            server.close()
        for transport in self._udp:
            transport.close()
        for conn in list(self._conns.values()):
            if conn.transport is not None:
                conn.transport.abort()
        for server in self._servers:
            await server.wait_closed()
        if self._write_task is not None:
            with contextlib.suppress(Exception):
                await self._write_task  # flush bindings that were acknowledged-to-be
        self._executor.shutdown(wait=True)
        self._reader.close()
        self._writer.close()
        await asyncio.sleep(0)  # let transports run their connection_lost callbacks


async def start_rendezvous(cfg: RendezvousConfig) -> RendezvousServer:
    """Open the key, the database and every socket; raises StartupError, KeyFileError or OSError."""
    key = load_or_create_signing_key(cfg.key_file)
    reader = Registry(cfg.db_path)
    writer = Registry(cfg.db_path)
    core = RendezvousCore(
        reader,
        key,
        relays=cfg.relays,
        always_relay=cfg.always_relay,
        limits=cfg.limits,
        allow_unsigned=cfg.allow_unsigned,
        wall_offset=time.time() - asyncio.get_running_loop().time(),
    )
    server = RendezvousServer(cfg, core, reader, writer)
    try:
        await server._start()
    except BaseException:
        await server.close()
        raise
    return server


async def _serve(cfg: RendezvousConfig) -> int:
    try:
        server = await start_rendezvous(cfg)
    except (StartupError, KeyFileError, sqlite3.Error, OSError) as exc:
        print(f"punchthrough rendezvous: {exc}", file=sys.stderr)
        return 2
    exporter = None
    if cfg.metrics:
        try:
            exporter = MetricsServer(parse_listen(cfg.metrics), lambda: rendezvous_families(server.stats()))
            await exporter.start()
        except OSError as exc:
            await server.close()
            print(f"punchthrough rendezvous: metrics {cfg.metrics}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        if exporter is not None:
            await exporter.close()
        await server.close()
    return 0


def run_rendezvous(cfg: RendezvousConfig) -> int:
    """Blocking: serve until SIGINT/SIGTERM, then stop cleanly and return 0 (2 if it cannot start)."""
    return asyncio.run(_serve(cfg))
