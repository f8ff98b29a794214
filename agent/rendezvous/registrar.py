"""The agent's registrar: keeps this agent's ID registered at the rendezvous server (asyncio shell).

One UDP socket, as RustDesk's `start_udp`: registrations go out from it and the
server's pushes (PunchHole, FetchLocalAddr, RequestRelay, ...) come back to it,
because the server sends them to the address it last saw us register from. When
UDP does not get through, one TCP connection to the server's main port carries the
same registrations and pushes instead (`registration_path.RegistrationPath` decides).
Every decision is in `registrar_core.RegistrarCore` and `RegistrationPath`; this class
moves datagrams and frames, runs the 1 s tick, and calls back into the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nacl.signing import SigningKey

from agent.common.tasks import TaskSet
from agent.nat.watch import observe_view
from agent.nat.watch_core import NetView, NetWatchCore, NetworkChanged
from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.registrar_core import (
    HEARTBEAT_INTERVAL,
    REGISTERED,
    IdTaken,
    KeyRequested,
    Push,
    Registered,
    RegistrarCore,
    ServerKeyLearned,
    ServerKeyRefused,
    StateChanged,
)
from agent.rendezvous.registration_path import TCP, CloseTcp, OpenTcp, ProbeUdp, RegistrationPath
from agent.wire import messages
from agent.wire.addr import SockAddr
from agent.wire.frames import FrameDecoder, FrameError, encode_frame
from agent.wire.messages import MessageError
from agent.wire.peer_ids import fingerprint

log = logging.getLogger("punchthrough.registrar")


class IdentityLike(Protocol):
    """What the registrar needs of agent.identity.Identity."""

    @property
    def peer_id(self) -> str: ...
    @property
    def uuid(self) -> bytes: ...
    @property
    def signing_key(self) -> SigningKey: ...
    @property
    def salt(self) -> int: ...


PushHandler = Callable[[str, Any, tuple[str, int]], Awaitable[None] | None]
"""on_push(kind, sub-message, server address): kind is the RendezvousMessage member name."""
IdTakenHandler = Callable[[IdentityLike], IdentityLike | Awaitable[IdentityLike]]
"""on_id_taken(current identity) -> the identity to register instead (e.g. agent.identity.next_id)."""
NetworkChangeHandler = Callable[[NetworkChanged], Awaitable[None] | None]
"""on_network_change(change): called after the registrar re-bound and re-registered (e.g. re-measure the NAT)."""
ServerKeyHandler = Callable[[bytes], None]
"""on_server_key(key): the server's key, learned on first contact (pin it)."""


UDP_ANSWERS = frozenset({"test_nat_response", "register_peer_response", "register_pk_response"})
"""Datagram kinds that show UDP reaches us from the server (a push may be a stale one, so it does not)."""
PROBE_PADDING = 64
"""The UDP probe is padded: the server never answers a datagram with more bytes than it carried."""
TCP_CONNECT_TIMEOUT = 5.0
MAX_TCP_FRAME = 64 * 1024


class RegistrarError(Exception):
    """The registrar cannot start (server name does not resolve, no socket); one line."""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Registrar) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.owner.send_errors += 1


async def resolve(server: tuple[str, int], kind: socket.SocketKind, timeout: float = 3.0) -> tuple[int, Any]:
    """(family, sockaddr) of the server's first address; RegistrarError with one line if it fails."""
    host, port = server
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=kind)
    except TimeoutError:
        raise RegistrarError(f"cannot resolve {host!r}: timed out after {timeout:g} s") from None
    except OSError as exc:
        raise RegistrarError(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
    if not infos:
        raise RegistrarError(f"cannot resolve {host!r}: no address")
    family, _type, _proto, _name, sockaddr = infos[0]
    return int(family), sockaddr


class Registrar:
    """Registers `identity` at `server` and hands the server's pushes to `on_push`.

    `registered` is set while the server has confirmed our key and cleared when that
    stops being true (server unreachable, restarted, or the ID was taken).
    """

    def __init__(
        self,
        server: tuple[str, int],
        identity: IdentityLike,
        on_push: PushHandler,
        nat_type_getter: Callable[[], int] = lambda: 0,
        interval: float = HEARTBEAT_INTERVAL,
        *,
        on_id_taken: IdTakenHandler | None = None,
        tick: float = 1.0,
        reply_timeout: float = 3.0,
        max_backoff: float = 30.0,
        bind: str | None = None,
        on_network_change: NetworkChangeHandler | None = None,
        observe: Callable[[], NetView] | None = None,
        server_key: bytes | None = None,
        on_server_key: ServerKeyHandler | None = None,
        path: RegistrationPath | None = None,
        nat_behavior_getter: Callable[[], pb.NatBehavior] | None = None,
    ) -> None:
        self.server = server
        self.identity = identity
        self.on_push = on_push
        self.nat_type_getter = nat_type_getter
        self.nat_behavior_getter = nat_behavior_getter
        self.on_id_taken = on_id_taken
        self.interval = interval
        self.tick = tick
        self.reply_timeout = reply_timeout
        self.max_backoff = max_backoff
        self.bind = bind
        self.on_network_change = on_network_change
        self.observe = observe
        self.server_key = server_key
        """The key the server must sign with (configured, embedded or pinned); None: learn it."""
        self.on_server_key = on_server_key
        self.server_key_problem = ""
        """One line when the server presented another key than the one we trust."""
        self.netwatch = NetWatchCore()
        self.rebinds = 0
        self._change_lock = asyncio.Lock()
        self.registered = asyncio.Event()
        self.core: RegistrarCore | None = None
        self.send_errors = 0
        self.push_errors = 0
        self._transport: asyncio.DatagramTransport | None = None
        self.path = path or RegistrationPath()
        """UDP, or TCP when UDP does not get through."""
        self._tcp: asyncio.StreamWriter | None = None
        self._tcp_task: asyncio.Task[None] | None = None
        """Connects, then reads the TCP connection until it ends; one at a time."""
        self._family = int(socket.AF_INET)
        self._server_addr: Any = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks = TaskSet(on_error=self._callback_failed)
        self._closed = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Resolve the server, open the socket and start registering (returns at once)."""
        if self._transport is not None:
            return
        family, sockaddr = await resolve(self.server, socket.SOCK_DGRAM)
        self._server_addr = sockaddr[:2]
        self.core = RegistrarCore(
            SockAddr.of(sockaddr[0], sockaddr[1]),
            self.identity.peer_id,
            self.identity.uuid,
            self.identity.signing_key,
            salt=self.identity.salt,
            server_key=self.server_key,
            interval=self.interval,
            reply_timeout=self.reply_timeout,
            max_backoff=self.max_backoff,
        )
        self._family = int(family)
        if self.observe is None:
            server_ip = str(sockaddr[0])
            self.observe = lambda: observe_view(server_ip, family)
        self._transport = await self._open_socket()
        self.netwatch.observe(self.observe(), time.monotonic())  # the baseline
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="registrar")

    async def _open_socket(self) -> asyncio.DatagramTransport:
        local = self.bind or ("::" if self._family == socket.AF_INET6 else "0.0.0.0")
        try:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(local, 0), family=self._family
            )
        except OSError as exc:
            raise RegistrarError(f"cannot open a UDP socket on {local}: {exc.strerror or exc}") from None
        return transport

    async def close(self) -> None:
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        await self._tasks.close()
        await self._drop_tcp()
        if self._transport is not None:
            self._transport.close()
        self.registered.clear()

    async def __aenter__(self) -> Registrar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def local_address(self) -> tuple[str, int] | None:
        """Our UDP socket's local address (the server sees its NAT mapping)."""
        if self._transport is None:
            return None
        name = self._transport.get_extra_info("sockname")
        return (str(name[0]), int(name[1]))

    def status(self) -> dict[str, Any]:
        if self.core is None:
            return {"state": "not started", "id": self.identity.peer_id, "server": f"{self.server[0]}:{self.server[1]}"}
        out = self.core.status(time.monotonic())
        out["local"] = self.local_address
        out.update(self.path.status())
        out["send_errors"] = self.send_errors
        out["push_errors"] = self.push_errors
        out["network"] = self.netwatch.status(time.monotonic())
        out["network"]["rebinds"] = self.rebinds
        if self.server_key_problem:
            out["server_key_problem"] = self.server_key_problem
        return out

    def nat_type_changed(self) -> None:
        """Read the NAT type now: a changed one goes out at once instead of at the next tick."""
        self._flush()

    # ------------------------------------------------------------------ internals

    async def _run(self) -> None:
        while True:
            self._check_network()
            self._steer()
            self._flush()
            await asyncio.sleep(self.tick)

    def _steer(self) -> None:
        """Carry out the path's steps: open or close the TCP connection, probe UDP."""
        core = self.core
        if core is None or self._closed:
            return
        now = time.monotonic()
        for step in self.path.due(now, core.unanswered_for(now)):
            self._do(step)

    def _do(self, step: OpenTcp | CloseTcp | ProbeUdp) -> None:
        if isinstance(step, OpenTcp):
            log.warning("registration: %s; registering over TCP", self.path.reason)
            self._tcp_task = asyncio.get_running_loop().create_task(self._tcp_session(), name="registrar-tcp")
        elif isinstance(step, CloseTcp):
            self._tasks.spawn(self._drop_tcp())
        elif self._transport is not None and not self._transport.is_closing():
            probe = messages.build(test_nat_request=pb.TestNatRequest(padding=bytes(PROBE_PADDING)))
            try:
                self._transport.sendto(probe, self._server_addr)
            except OSError:
                self.send_errors += 1

    async def _drop_tcp(self) -> None:
        task, self._tcp_task = self._tcp_task, None
        writer, self._tcp = self._tcp, None
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _tcp_session(self) -> None:
        """Connect, register over the connection, read frames until it ends; then tell the path."""
        me = asyncio.current_task()
        writer: asyncio.StreamWriter | None = None
        try:
            host, port = str(self._server_addr[0]), int(self._server_addr[1])
            local = (self.bind, 0) if self.bind else None
            async with asyncio.timeout(TCP_CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            if self._tcp_task is not me or not self.path.tcp_connected(time.monotonic()):
                return
            log.info("registration: TCP connection to %s:%s up", host, port)
            self._tcp = writer
            if self.core is not None:
                self.core.reregister()
            self._flush()
            decoder = FrameDecoder(MAX_TCP_FRAME)
            while data := await reader.read(65536):
                for payload in decoder.feed(data):
                    if payload:
                        self._received(payload, self._server_addr, time.monotonic())
        except (OSError, TimeoutError, FrameError) as exc:
            log.info("registration: TCP connection to the server: %s", exc or type(exc).__name__)
        finally:
            if writer is not None:
                writer.close()
            if self._tcp_task is me:
                self._tcp_task = None
                self._tcp = None
                if not self._closed and self.path.tcp_failed(time.monotonic()) and self.core is not None:
                    self.core.reregister()  # over UDP until the connection is back
                    self._flush()

    def _check_network(self) -> None:
        if self.observe is None:
            return
        try:
            view = self.observe()
        except Exception:  # a broken probe must not stop registration
            log.exception("reading the network view failed")
            return
        change = self.netwatch.observe(view, time.monotonic())
        if change is not None:
            log.warning("network changed: %s; re-binding and re-registering", change.reason)
            self._tasks.spawn(self._network_changed(change))

    async def _network_changed(self, change: NetworkChanged) -> None:
        """Re-bind (a local change) and re-register at once, then let the agent react (NAT re-measure).

        Re-binds happen one at a time, in order: a move often shows as two (old address gone, then
        the new one up) and the second must not race the first's re-bind. The agent's reaction runs
        outside that lock and is expected to coalesce (agent/stack.py RegistrarComponent).
        """
        async with self._change_lock:
            if self._closed:
                return
            if change.local:
                for step in self.path.reset():
                    self._do(step)
                await self._rebind()
                if self.core is not None:
                    self.core.reregister()
                self._flush()
        if self.on_network_change is not None:  # outside the lock: it may take seconds, and coalesces
            result = self.on_network_change(change)
            if inspect.isawaitable(result):
                await result

    async def _rebind(self) -> None:
        """A fresh socket: the old one may hold a NAT mapping (or a source address) that is gone."""
        try:
            new = await self._open_socket()
        except RegistrarError as exc:
            log.warning("keeping the old registration socket: %s", exc)
            return
        old, self._transport = self._transport, new
        self.rebinds += 1
        if old is not None:
            old.close()

    def _flush(self) -> None:
        core, transport = self.core, self._transport
        if core is None or transport is None or transport.is_closing():
            return
        try:
            core.set_nat_type(int(self.nat_type_getter()))
            if self.nat_behavior_getter is not None:
                core.set_nat_behavior(self.nat_behavior_getter())
        except Exception:
            log.exception("reading the NAT type failed")
        tcp = self._tcp if self.path.transport == TCP else None
        for datagram in core.datagrams_to_send(time.monotonic()):
            try:
                if tcp is not None:
                    tcp.write(encode_frame(datagram))
                else:
                    transport.sendto(datagram, self._server_addr)
            except OSError:
                self.send_errors += 1
        self._handle_events()

    def _datagram(self, data: bytes, addr: Any) -> None:
        if self._closed:
            return
        self._received(data, addr, time.monotonic(), udp=True)

    def _received(self, data: bytes, addr: Any, now: float, udp: bool = False) -> None:
        """One message from the server, by datagram or TCP frame: to the core, and to the path (UDP works)."""
        core = self.core
        if core is None:
            return
        try:
            source = SockAddr.of(str(addr[0]), int(addr[1]))
        except (ValueError, TypeError, IndexError):
            core.drops.drop("bad_source", repr(addr), now)
            return
        if udp and self.path.want_tcp and source == core.server:
            try:
                kind = messages.parse(data)[0]
            except MessageError:
                kind = ""
            if kind in UDP_ANSWERS:
                log.info("registration: UDP answers again; registering over UDP")
                for step in self.path.udp_answered(now):
                    self._do(step)
                core.reregister()
            if kind == "test_nat_response":
                self._flush()
                return
        core.receive_datagram(data, source, now)
        self._handle_events()
        self._flush()

    def _handle_events(self) -> None:
        core = self.core
        if core is None:
            return
        for event in core.next_events():
            if isinstance(event, Push):
                self._deliver(event)
            elif isinstance(event, Registered):
                log.info("registered %s at %s:%s", event.peer_id, *self.server)
                self.registered.set()
            elif isinstance(event, StateChanged):
                if event.new != REGISTERED:
                    self.registered.clear()
                log.info("registrar %s -> %s", event.old, event.new)
            elif isinstance(event, KeyRequested):
                change = self.netwatch.server_asked_for_key(time.monotonic())
                log.info("network: %s", change.reason)
                self._tasks.spawn(self._network_changed(change))
            elif isinstance(event, IdTaken):
                log.warning("ID %s belongs to another key at %s:%s", event.peer_id, *self.server)
                self._tasks.spawn(self._change_id())
            elif isinstance(event, ServerKeyLearned):
                log.warning(
                    "trusting rendezvous server %s:%s on first contact: key %s (pinned from now on)",
                    *self.server,
                    fingerprint(event.key),
                )
                if self.on_server_key is not None:
                    try:
                        self.on_server_key(event.key)
                    except Exception:
                        log.exception("pinning the server key failed")
            elif isinstance(event, ServerKeyRefused):
                where = f"{self.server[0]}:{self.server[1]}"
                self.server_key_problem = (
                    f"rendezvous server {where} signs with key {fingerprint(event.presented)}, "
                    f"not the trusted {fingerprint(event.expected)}"
                )
                log.error("%s: not registering", self.server_key_problem)

    def _deliver(self, push: Push) -> None:
        try:
            result = self.on_push(push.kind, push.message, self._server_addr)
        except Exception:
            self.push_errors += 1
            log.exception("on_push failed for %s", push.kind)
            return
        if inspect.isawaitable(result):
            self._tasks.spawn(result)

    def _callback_failed(self, exc: BaseException) -> None:
        self.push_errors += 1
        log.error("registrar callback failed: %s", exc)

    async def _change_id(self) -> None:
        core = self.core
        if self.on_id_taken is None or core is None:
            return
        old = self.identity
        new = self.on_id_taken(old)
        if inspect.isawaitable(new):
            new = await new
        if new.peer_id == old.peer_id:
            raise RegistrarError(f"on_id_taken returned the taken ID {old.peer_id} again")
        self.identity = new
        log.info("registering new ID %s instead of %s", new.peer_id, old.peer_id)
        core.set_identity(new.peer_id, new.uuid, new.signing_key, new.salt)
        self._flush()
