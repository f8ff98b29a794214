"""The relay server (RustDesk's hbbr role): asyncio shell around agent.servers.relay_core.

Each accepted connection must send a RequestRelay frame within `first_frame_timeout`;
the first connection naming a uuid waits for the second, then a pump moves bytes
between them until both sides close or the pair goes idle. The first frame is read
exactly (nothing past it), so bytes a client sends early stay in the kernel and
reach the partner first once the pump starts.

Loopback connections get no special treatment: upstream hbbr turns them into an
admin console; here they are ordinary clients.

Unlike hbbr, the relay pairs only what a rendezvous server arranged: every first frame
must carry that server's ticket for its uuid (`server_keys` are the servers it trusts).
`open` turns that off for RustDesk clients, which have no tickets.

`replicas > 1` or `ray_address` runs several copies of this server as Ray actors
sharing the port (actors/relay_pool.py); a copy then gets a `router` that hands
connections whose uuid it does not own to the owning copy (agent/servers/relay_handoff.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from agent.common.ip_caps import PerIpCap, source_key, unread_bytes
from agent.common.metrics import MetricsServer, parse_listen
from agent.common.netutil import tune_transport
from agent.common.stats import DropStats
from agent.proto import rendezvous_pb2 as pb
from agent.servers import relay_core as core
from agent.servers.relay_pump import Meter, PumpKind, default_kind, make_pump, splice_available
from agent.servers.server_metrics import relay_families
from agent.wire import messages, signing
from agent.wire.frames import FrameError, encode_frame
from agent.wire.ports import RELAY_PORT

log = logging.getLogger("punchthrough.relay")

REFUSE_LINGER = 2.0
"""Seconds a refused connection may take to read its reason and hang up."""
REFUSE_DRAIN_MAX = 1 << 20


@dataclass
class RelayConfig:
    binds: list[str] = field(default_factory=lambda: ["0.0.0.0", "::"])
    port: int = RELAY_PORT
    key: str = ""
    server_keys: list[bytes] = field(default_factory=list)
    """ed25519 keys of the rendezvous servers whose tickets this relay honours."""
    open: bool = False
    """Pair any two connections naming one uuid, ticket or not (hbbr's behaviour, for RustDesk clients)."""
    replicas: int = 1
    ray_address: str | None = None
    stream_limit_bps: float = 0.0
    """Bytes/s per pair, both directions together (as upstream's per-pair limiter), 0 = off."""
    total_limit_bps: float = 0.0
    """Bytes/s for the whole server process (each replica has its own), 0 = off."""
    metrics: str = ""
    """[HOST:]PORT of a Prometheus endpoint (one process only); "" = off."""
    first_frame_timeout: float = 30.0
    pair_timeout: float = 30.0
    idle_timeout: float = 30.0
    max_waiting: int = 1024
    """Connections parked waiting for their partner; more are refused."""
    max_handshaking: int = 1024
    """Connections that have not sent their first frame yet; at the cap the oldest is closed."""
    max_waiting_per_ip: int = 128
    """Parked connections from one source IP (an IPv6 /64 counts as one); at the cap that IP's oldest
    waiter is closed (0 = no cap). Per replica, like the totals. Loopback is not exempt."""
    max_handshaking_per_ip: int = 128
    """Connections from one source IP (IPv6: /64) without their first frame yet; at the cap that IP's
    oldest one with nothing unread is closed (0 = no cap). Per replica. Loopback is not exempt."""
    max_pairs: int = 0
    """Pairs in progress (0 = bounded only by descriptors)."""
    pump: Literal["auto", "splice", "asyncio"] = "auto"
    backlog: int = 1024
    log_interval: float = 10.0
    """Seconds between two log lines about drops from the same source."""


class Router(Protocol):
    """Decides whether this server pairs a uuid, and hands the socket over when it does not."""

    def is_local(self, uuid: str) -> bool: ...

    async def forward(self, uuid: str, sock: socket.socket, peer: str) -> bool:
        """Pass `sock` to the owner; True once it is on its way (the caller then closes its copy)."""
        ...


def _host(peer: str) -> str:
    """The IP part of a `_peer_str` (what per-IP caps and the log limiter key on)."""
    return peer.rsplit(":", 1)[0]


def _peer_str(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def bind_listeners(binds: list[str], port: int, *, reuse_port: bool, backlog: int = 1024) -> list[socket.socket]:
    """One listening socket per address, all on the same port (picked by the first when `port` is 0).

    "::" is skipped with a warning where IPv6 is unavailable; any other failure is an error.
    """
    if not binds:
        raise ValueError("no address to bind")
    attempts = 20 if port == 0 else 1
    last_exc: OSError | None = None
    for _ in range(attempts):
        socks: list[socket.socket] = []
        chosen = port
        try:
            for host in binds:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                try:
                    s = socket.socket(family, socket.SOCK_STREAM)
                except OSError as exc:
                    if host == "::":
                        log.warning("IPv6 unavailable (%s); not listening on [::]", exc.strerror)
                        continue
                    raise
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if reuse_port:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind((host, chosen))
                except OSError as exc:
                    s.close()
                    if host == "::" and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        log.warning("IPv6 unavailable (%s); not listening on [::]", exc.strerror)
                        continue
                    raise
                s.listen(backlog)
                s.setblocking(False)
                chosen = s.getsockname()[1]
                socks.append(s)
        except OSError as exc:
            for s in socks:
                s.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                last_exc = exc
                continue
            raise
        if not socks:
            raise OSError(errno.EADDRNOTAVAIL, f"could not bind any of {binds}")
        return socks
    assert last_exc is not None
    raise last_exc


class _Waiter:
    """A connection parked in the pairing table, watched so a hang-up frees its slot."""

    __slots__ = ("peer", "sock", "uuid")

    def __init__(self, sock: socket.socket, uuid: str, peer: str) -> None:
        self.sock = sock
        self.uuid = uuid
        self.peer = peer


class RelayServer:
    """One relay process: listeners, handshakes, the pairing table and the pumps."""

    def __init__(self, cfg: RelayConfig, *, router: Router | None = None) -> None:
        if cfg.pump == "splice" and not splice_available():
            raise RuntimeError("pump=splice requested but os.splice does not work here")
        if not cfg.open and not cfg.server_keys:
            raise ValueError(
                "the relay needs the key of the rendezvous server whose pairs it carries (or `open` to pair anyone)"
            )
        self.cfg = cfg
        self.router = router
        self.pump_kind: PumpKind = default_kind() if cfg.pump == "auto" else cfg.pump
        self.table: core.PairingTable[_Waiter] = core.PairingTable(
            cfg.pair_timeout, cfg.max_waiting, cfg.max_pairs, max_waiting_per_ip=cfg.max_waiting_per_ip
        )
        self.drops = DropStats(cfg.log_interval)
        self.meter = Meter()
        self.pairs_total = 0
        self.pair_ends: Counter[str] = Counter()
        self.handed_off = 0
        self.health_checks = 0
        self.throttle_waits = 0
        self.throttled_s = 0.0
        self._throttles: set[core.Throttle] = set()
        self._listeners: list[socket.socket] = []
        self._handshakes: dict[asyncio.Task[None], tuple[socket.socket, str]] = {}
        """Connections still waiting for their first frame, oldest first: socket and peer."""
        self._handshakes_per_ip: PerIpCap[asyncio.Task[None]] = PerIpCap(cfg.max_handshaking_per_ip)
        self._pairs: set[asyncio.Task[None]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._total_bucket: core.TokenBucket | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, listeners: list[socket.socket] | None = None) -> None:
        """Listen on `listeners` (already bound) or on the configured addresses."""
        self._loop = loop = asyncio.get_running_loop()
        if self.cfg.total_limit_bps > 0:
            self._total_bucket = core.TokenBucket(self.cfg.total_limit_bps, loop.time())
        if listeners is None:
            listeners = bind_listeners(
                self.cfg.binds, self.cfg.port, reuse_port=self.cfg.replicas > 1, backlog=self.cfg.backlog
            )
        self._listeners = listeners
        for lsock in listeners:
            lsock.setblocking(False)
            loop.add_reader(lsock.fileno(), self._on_accept, lsock)
        log.info(
            "relay listening on %s (pump=%s, key=%s, pairs %s, stream limit=%s, total limit=%s)",
            ", ".join(_peer_str(s.getsockname()) for s in listeners),
            self.pump_kind,
            "set" if self.cfg.key else "none",
            "anyone (open)" if self.cfg.open else f"tickets of {len(self.cfg.server_keys)} rendezvous server(s)",
            _rate(self.cfg.stream_limit_bps),
            _rate(self.cfg.total_limit_bps),
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._listeners]

    @property
    def port(self) -> int:
        return int(self._listeners[0].getsockname()[1])

    async def close(self) -> None:
        self._closing = True
        loop = self._loop
        for lsock in self._listeners:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(lsock.fileno())
            lsock.close()
        self._listeners = []
        if self._expiry is not None:
            self._expiry.cancel()
        for _uuid, w in self.table.expire(float("inf")):
            self._drop_waiter(w, None)
        tasks = [*self._handshakes, *self._pairs]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {
            "pump": self.pump_kind,
            "pairs_active": self.table.active,
            "pairs_total": self.pairs_total,
            "waiting": self.table.waiting,
            "handshaking": len(self._handshakes),
            "handshaking_max_per_ip": self._handshakes_per_ip.max_count(),
            "waiting_max_per_ip": self.table.per_ip.max_count(),
            "bytes_relayed": self.meter.bytes,
            "handed_off": self.handed_off,
            "health_checks": self.health_checks,
            "drops": self.drops.snapshot(),
            "pair_ends": dict(self.pair_ends),
            "limits": {
                "stream_limit_bps": self.cfg.stream_limit_bps,
                "total_limit_bps": self.cfg.total_limit_bps,
                "max_handshaking_per_ip": self.cfg.max_handshaking_per_ip,
                "max_waiting_per_ip": self.cfg.max_waiting_per_ip,
                "throttle_waits": self.throttle_waits + sum(t.waits for t in self._throttles),
                "throttled_s": round(self.throttled_s + sum(t.throttled_s for t in self._throttles), 3),
            },
        }

    # ------------------------------------------------------------------ accept + first frame
    def _on_accept(self, lsock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(64):
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: stop accepting for a moment instead of spinning.
                log.warning("accept failed: %s; pausing accepts for 0.1 s", exc.strerror)
                loop.remove_reader(lsock.fileno())
                loop.call_later(0.1, self._resume_accept, lsock)
                return
            peer = _peer_str(addr)
            if self._closing:
                conn.close()
                return
            conn.setblocking(False)
            task = loop.create_task(self._handshake(conn, peer))
            # One source IP at its cap makes room among its own (see agent/common/ip_caps.py for why the
            # oldest goes rather than the newcomer); that also keeps it from reaching the total.
            for old in self._handshakes_per_ip.admit(source_key(_host(peer)), task, self._handshake_busy):
                self._evict_handshake(old, "evicted_idle_handshake_per_ip")
            if len(self._handshakes) >= self.cfg.max_handshaking:
                # Full of connections that have not said anything yet: make room by closing the
                # one that has waited longest, rather than refusing everyone who comes next (many
                # hosts holding every slot would otherwise lock real clients out for 30 s).
                self._evict_handshake(next(iter(self._handshakes)), "evicted_idle_handshake")
            self._handshakes[task] = (conn, peer)
            task.add_done_callback(self._handshake_done)

    def _handshake_busy(self, task: asyncio.Task[None]) -> bool:
        """Its first frame is in the kernel already (an accept burst): not idle, just not read yet."""
        entry = self._handshakes.get(task)
        return entry is not None and unread_bytes(entry[0].fileno()) > 0

    def _evict_handshake(self, task: asyncio.Task[None], reason: str) -> None:
        entry = self._handshakes.pop(task, None)
        self._handshakes_per_ip.discard(task)
        if task.done() or entry is None:
            return  # finished already (its done callback is queued): nothing to close or count
        sock, peer = entry
        task.cancel()  # its `finally` closes the socket ...
        task.add_done_callback(lambda _t: sock.close())  # ... unless it was cancelled before it ever ran
        self._drop(reason, peer)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._handshakes.pop(task, None)
        self._handshakes_per_ip.discard(task)

    def handshaking_from(self, host: str) -> int:
        """Connections from this IP (its IPv6 /64) without their first frame yet."""
        return self._handshakes_per_ip.count(source_key(host))

    def waiting_from(self, host: str) -> int:
        """Connections from this IP (its IPv6 /64) parked waiting for their partner."""
        return self.table.waiting_from(source_key(host))

    def _resume_accept(self, lsock: socket.socket) -> None:
        if not self._closing and lsock.fileno() >= 0 and self._loop is not None:
            self._loop.add_reader(lsock.fileno(), self._on_accept, lsock)

    def _drop(self, reason: str, peer: str) -> None:
        now = self._loop.time() if self._loop is not None else 0.0
        host = _host(peer)
        if self.drops.drop(reason, host, now):
            log.info("relay: dropped %s (%s)", peer, reason)

    async def _read_first_frame(self, conn: socket.socket) -> bytes | None:
        loop = asyncio.get_running_loop()
        reader = core.FirstFrameReader()
        while True:
            chunk = await loop.sock_recv(conn, reader.want())
            if not chunk:
                return None
            payload = reader.feed(chunk)
            if payload is not None:
                return payload

    async def _handshake(self, conn: socket.socket, peer: str) -> None:
        keep = False
        try:
            try:
                async with asyncio.timeout(self.cfg.first_frame_timeout):
                    payload = await self._read_first_frame(conn)
            except TimeoutError:
                self._drop("first_frame_timeout", peer)
                return
            except FrameError:
                self._drop("oversized_frame", peer)
                return
            except OSError:
                self._drop("socket_error", peer)
                return
            if payload is None:
                self._drop("eof_before_request", peer)
                return
            decision = core.check_request(
                payload,
                self.cfg.key,
                server_keys=tuple(self.cfg.server_keys),
                open_relay=self.cfg.open,
                now=time.time(),
            )
            if isinstance(decision, core.Drop):
                self._drop(decision.reason, peer)
                return
            if isinstance(decision, core.Health):
                self.health_checks += 1
                load = pb.HealthCheck(
                    pairs_active=self.table.active, waiting=self.table.waiting, bytes_relayed=self.meter.bytes
                )
                await self._refuse(conn, encode_frame(messages.build(hc=load)))
                return
            if isinstance(decision, core.Refuse):
                self._drop(decision.reason, peer)
                await self._refuse(conn, decision.reply)
                return
            uuid = decision.uuid
            if self.router is not None and not self.router.is_local(uuid):
                if await self.router.forward(uuid, conn, peer):
                    self.handed_off += 1
                else:
                    self._drop("owner_unavailable", peer)
                return
            keep = True
        finally:
            if not keep:
                conn.close()
        self.admit(conn, uuid, peer)

    async def _refuse(self, conn: socket.socket, reply: bytes) -> None:
        """Send the reason, then drain briefly before closing: closing with unread input
        would send a RST, and a RST can destroy the reason before the client reads it."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(REFUSE_LINGER):
                await loop.sock_sendall(conn, reply)
                conn.shutdown(socket.SHUT_WR)
                drained = 0
                while drained < REFUSE_DRAIN_MAX:
                    chunk = await loop.sock_recv(conn, 65536)
                    if not chunk:
                        break
                    drained += len(chunk)

    # ------------------------------------------------------------------ pairing
    def admit(self, conn: socket.socket, uuid: str, peer: str) -> None:
        """Pair `conn` (whose RequestRelay named `uuid`) or park it; also the entry for handed-off sockets."""
        loop = self._loop
        assert loop is not None
        if self._closing:
            conn.close()
            return
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        me = _Waiter(conn, uuid, peer)
        res = self.table.offer(uuid, me, loop.time(), source_key(_host(peer)))
        if isinstance(res, core.Refused):
            self._drop(res.reason, peer)
            conn.close()
            return
        if isinstance(res, core.Wait):
            if res.evicted is not None:
                old = res.evicted[1]
                with contextlib.suppress(Exception):
                    loop.remove_reader(old.sock.fileno())
                self._drop(res.evicted_reason or core.EVICTED_OLDEST_WAITER, old.peer)
                old.sock.close()
            loop.add_reader(conn.fileno(), self._on_waiter_readable, me)
            self._arm_expiry()
            return
        partner = res.partner
        with contextlib.suppress(Exception):
            loop.remove_reader(partner.sock.fileno())
        self.pairs_total += 1
        task = loop.create_task(self._run_pair(uuid, partner, me))
        self._pairs.add(task)
        task.add_done_callback(self._pairs.discard)

    def _on_waiter_readable(self, w: _Waiter) -> None:
        """A parked connection became readable: either early payload (fine) or a hang-up (free the slot)."""
        loop = self._loop
        assert loop is not None
        try:
            data = w.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        loop.remove_reader(w.sock.fileno())
        if data:
            return  # the peer is talking already; its bytes wait in the kernel for the partner
        if self.table.cancel(w.uuid, w):
            self._drop("closed_while_waiting", w.peer)
            w.sock.close()

    def _arm_expiry(self) -> None:
        loop = self._loop
        assert loop is not None
        deadline = self.table.next_deadline()
        if deadline is None:
            return
        if self._expiry is not None:
            if self._expiry.when() <= deadline:
                return
            self._expiry.cancel()
        self._expiry = loop.call_at(deadline, self._on_expiry)

    def _on_expiry(self) -> None:
        self._expiry = None
        loop = self._loop
        assert loop is not None
        for _uuid, w in self.table.expire(loop.time()):
            self._drop_waiter(w, "pair_timeout")
        self._arm_expiry()

    def _drop_waiter(self, w: _Waiter, reason: str | None) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(w.sock.fileno())
        if reason is not None:
            self._drop(reason, w.peer)
        w.sock.close()

    async def _run_pair(self, uuid: str, first: _Waiter, second: _Waiter) -> None:
        loop = asyncio.get_running_loop()
        throttle: core.Throttle | None = None
        buckets: list[core.TokenBucket] = []
        if self.cfg.stream_limit_bps > 0:
            buckets.append(core.TokenBucket(self.cfg.stream_limit_bps, loop.time()))
        if self._total_bucket is not None:
            buckets.append(self._total_bucket)
        if buckets:
            throttle = core.Throttle(buckets)
            self._throttles.add(throttle)
        reason = "error"
        for leg in (first.sock, second.sock):  # a leg whose host vanished ends the pair in ~30 s, not 15 min
            tune_transport(leg)
        try:
            pump = make_pump(
                self.pump_kind,
                first.sock,
                second.sock,
                idle_timeout=self.cfg.idle_timeout,
                throttle=throttle,
                meter=self.meter,
            )
            log.debug("relay: paired %s <-> %s (uuid %s)", first.peer, second.peer, uuid)
            result = await pump.run()
            reason = result.reason
            log.debug("relay: pair %s ended (%s), %d / %d bytes", uuid, reason, result.a_to_b, result.b_to_a)
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        except Exception as exc:  # e.g. EMFILE creating the pipes: this pair fails, the server goes on
            log.warning("relay: pair %s failed to start: %s", uuid, exc)
        finally:
            first.sock.close()
            second.sock.close()
            # A ticketed uuid is spent until any ticket for it has expired: no second pair on one ticket.
            spent = None if self.cfg.open else loop.time() + signing.TICKET_TTL + signing.TICKET_SKEW
            self.table.release(uuid, spent)
            self.pair_ends[reason.split(":", 1)[0]] += 1
            if throttle is not None:
                self._throttles.discard(throttle)
                self.throttle_waits += throttle.waits
                self.throttled_s += throttle.throttled_s


def _rate(bps: float) -> str:
    return f"{bps * 8 / 1e6:g} Mbit/s" if bps > 0 else "off"


async def start_relay(cfg: RelayConfig, *, router: Router | None = None) -> RelayServer:
    """Start an in-process relay (no Ray); `await server.close()` stops it."""
    server = RelayServer(cfg, router=router)
    await server.start()
    return server


async def _serve_until_signal(cfg: RelayConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await start_relay(cfg)
    exporter = None
    try:
        if cfg.metrics:
            exporter = await MetricsServer(parse_listen(cfg.metrics), lambda: relay_families(server.stats())).start()
        await stop.wait()
        log.info("relay: stopping (%s)", server.stats())
    finally:
        if exporter is not None:
            await exporter.close()
        await server.close()


def run_relay(cfg: RelayConfig) -> int:
    """Blocking entry point of a one-process `punchthrough relay`; SIGINT/SIGTERM stop it cleanly (exit 0).
    Replicas on Ray are `actors.relay_pool.run_pool` (the CLI picks), so this server never imports Ray."""
    asyncio.run(_serve_until_signal(cfg))
    return 0
