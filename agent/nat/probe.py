"""Measures this agent's NAT against the rendezvous server (asyncio shell around agent/nat/probe_core.py).

TCP two-port test (RustDesk `test_nat_type_`): TestNatRequest to the main port,
then, from the same local address, to the NAT-test port; the server reports the
source port it saw each time. UDP mapping probe (RustDesk `test_udp_uat`): a
padded TestNatRequest over UDP from a fresh socket; the server answers with the
mapped UDP port (our server never answers a UDP source with more bytes than it
sent, hence the padding). UDP behaviour probe (ours; agent/wire/nat_behavior.py says what
it decides): two sockets ask both server ports in turn (mapping, allocation), a
third asks for an answer from the other port (filtering). Every network step has its own timeout and every
failure ends up as a one-line error in the Verdict, never as an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from agent.common.netutil import describe_error
from agent.nat.probe_core import (
    NatType,
    TcpObservation,
    UdpObservation,
    Verdict,
    make_verdict,
    next_measurement_delay,
    udp_probe_offsets,
)
from agent.proto import rendezvous_pb2 as pb
from agent.wire import messages
from agent.wire.frames import FrameDecoder, FrameError, encode_frame
from agent.wire.messages import MessageError
from agent.wire.nat_behavior import MappingSample, NatBehavior, classify

log = logging.getLogger("punchthrough.nat_probe")

UDP_PADDING = 64
"""Filler bytes in the UDP request: its answer (port and observed IP, up to 48 bytes) must not be larger."""
MAX_REPLY = 4096


def _where(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _reuse(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


async def tcp_test_nat(
    family: int, ip: str, port: int, what: str, timeout: float, bind: tuple[str, int] | None = None
) -> TcpObservation:
    """One TCP TestNat exchange: the port the server saw and our local port, or a one-line error."""
    loop = asyncio.get_running_loop()
    where = f"{what} {_where(ip, port)}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    local_port: int | None = None
    local_ip = ""
    try:
        sock.setblocking(False)
        _reuse(sock)
        # Bind explicitly even for the first exchange: a port the kernel picks during connect()
        # is not registered as shareable, so the second exchange could not bind it again.
        any_ip = "::" if family == socket.AF_INET6 else "0.0.0.0"
        try:
            sock.bind(bind if bind is not None else (any_ip, 0))
        except OSError as exc:
            port_text = bind[1] if bind is not None else 0
            return TcpObservation(error=f"{where}: cannot reuse local port {port_text}: {describe_error(exc)}")
        step = "connect"
        async with asyncio.timeout(timeout):
            started = time.perf_counter()
            await loop.sock_connect(sock, (ip, port))
            connect_ms = round((time.perf_counter() - started) * 1000, 3)
            name = sock.getsockname()
            local_ip, local_port = str(name[0]), int(name[1])
            step = "answer"
            request = messages.build(test_nat_request=pb.TestNatRequest(serial=0))
            await loop.sock_sendall(sock, encode_frame(request))
            decoder = FrameDecoder(MAX_REPLY)
            while True:
                chunk = await loop.sock_recv(sock, MAX_REPLY)
                if not chunk:
                    return TcpObservation(None, local_port, f"{where}: closed the connection without answering")
                for payload in decoder.feed(chunk):
                    if not payload:
                        continue  # heartbeat
                    kind, sub = messages.parse(payload, max_len=MAX_REPLY)
                    if kind == "test_nat_response":
                        return TcpObservation(
                            int(sub.port),
                            local_port,
                            local_ip=local_ip,
                            observed_ip=sub.observed_ip,
                            connect_ms=connect_ms,
                        )
                    # anything else (a KeyExchange from a Pro server, ...) is skipped, as RustDesk does
    except TimeoutError:
        return TcpObservation(None, local_port, f"{where}: no {step} within {timeout:g} s")
    except (FrameError, MessageError) as exc:
        return TcpObservation(None, local_port, f"{where}: unreadable answer ({exc})")
    except OSError as exc:
        return TcpObservation(None, local_port, f"{where}: {describe_error(exc)}")
    finally:
        sock.close()


async def tcp_two_port_test(
    family: int, ip: str, port: int, nat_port: int, timeout: float
) -> tuple[TcpObservation, TcpObservation]:
    """Both exchanges, the second from the first one's local address (closed first, then reused)."""
    first = await tcp_test_nat(family, ip, port, "main port", timeout)
    if first.error or first.local_port is None:
        return first, TcpObservation(error="NAT-test port: not tried")
    bind = (first.local_ip, first.local_port)
    return first, await tcp_test_nat(family, ip, nat_port, "NAT-test port", timeout, bind=bind)


async def udp_mapping_probe(
    family: int, ip: str, port: int, give_up: float = 2.0, padding: int = UDP_PADDING
) -> UdpObservation:
    """Padded TestNatRequest datagrams on RustDesk's schedule; the first answer's port wins."""
    loop = asyncio.get_running_loop()
    where = _where(ip, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    local_port: int | None = None
    sender: asyncio.Task[None] | None = None
    try:
        sock.setblocking(False)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        local_port = int(sock.getsockname()[1])
        # connect() makes the kernel filter other sources and report ICMP "port unreachable".
        sock.connect((ip, port))
        request = messages.build(test_nat_request=pb.TestNatRequest(serial=0, padding=bytes(padding)))
        sender = loop.create_task(_resend(lambda: sock.send(request), give_up))  # ICMP errors surface below
        try:
            async with asyncio.timeout(give_up):
                while True:
                    data = await loop.sock_recv(sock, MAX_REPLY)
                    try:
                        kind, sub = messages.parse(data)
                    except MessageError:
                        continue
                    if kind == "test_nat_response":
                        return UdpObservation(int(sub.port), local_port, observed_ip=sub.observed_ip)
        except TimeoutError:
            return UdpObservation(None, local_port, f"no UDP answer from {where} within {give_up:g} s")
        except OSError as exc:
            return UdpObservation(None, local_port, f"no UDP: {where}: {describe_error(exc)}")
    except OSError as exc:
        return UdpObservation(None, local_port, f"no UDP: {where}: {describe_error(exc)}")
    finally:
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        sock.close()


BEHAVIOR_ASK_GIVE_UP = 1.0
"""Seconds one question of the behaviour probe is resent before it counts as unanswered."""
FILTER_WAIT = 0.6
"""Seconds the filtering test waits for the answer from the other port (it never comes through a
port-restricted NAT, so this is what a measurement costs there; several round trips on a WAN)."""


async def _resend(send: Callable[[], object], give_up: float) -> None:
    """Call `send` on the probe's schedule (udp_probe_offsets) until `give_up` s; send errors are retried."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for offset in udp_probe_offsets(give_up):
        delay = start + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        with contextlib.suppress(OSError):
            send()


async def _ask_udp(
    sock: socket.socket, dest: tuple[str, int], request: bytes, accept: set[tuple[str, int]], give_up: float
) -> tuple[int, tuple[str, int]] | None:
    """Resend `request` on the probe's schedule until a TestNatResponse from one of `accept` arrives:
    (the port the server saw, where the answer came from), or None."""
    loop = asyncio.get_running_loop()
    sender = loop.create_task(_resend(lambda: sock.sendto(request, dest), give_up))
    try:
        async with asyncio.timeout(give_up):
            while True:
                try:
                    data, src = await loop.sock_recvfrom(sock, MAX_REPLY)
                except OSError:  # an ICMP error for an earlier send
                    continue
                source = (str(src[0]).removeprefix("::ffff:"), int(src[1]))
                if source not in accept:
                    continue
                try:
                    kind, sub = messages.parse(data)
                except MessageError:
                    continue
                if kind == "test_nat_response" and 0 < sub.port <= 0xFFFF:
                    return int(sub.port), source
    except TimeoutError:
        return None
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender


async def udp_behavior_probe(
    family: int, ip: str, port: int, nat_port: int, give_up: float = BEHAVIOR_ASK_GIVE_UP
) -> NatBehavior:
    """Mapping and allocation from two sockets asking both server ports in turn (in order: the order
    is what shows a sequential allocator), then filtering from a third socket asking for an answer
    from the other port. Never raises OSError: what it could not learn stays unknown."""
    main, other = (ip, port), (ip, nat_port)
    request = messages.build(test_nat_request=pb.TestNatRequest(padding=bytes(UDP_PADDING)))
    socks: list[socket.socket] = []
    try:
        for _ in range(3):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        flip = messages.build(
            test_nat_request=pb.TestNatRequest(padding=bytes(UDP_PADDING), answer_from_other_port=True)
        )
        # the filtering test runs beside the mapping questions (it mostly waits for an answer that a
        # port-restricted NAT never lets in); its one new mapping shows as a gap of one in a sequence
        filtering = asyncio.ensure_future(_ask_udp(socks[2], main, flip, {main, other}, FILTER_WAIT))
        try:
            samples: list[MappingSample] = []
            for index, sock in enumerate(socks[:2]):
                local_port = int(sock.getsockname()[1])
                for port_index, dest in enumerate((main, other)):
                    got = await _ask_udp(sock, dest, request, {dest}, give_up)
                    if got is None:
                        if index == 0 and port_index == 0:
                            return NatBehavior(udp_blocked=True)
                        continue
                    samples.append(MappingSample(index, port_index, local_port, got[0]))
            answer = await filtering
        finally:
            filtering.cancel()
        # from the main port: a server that does not know the request (an hbbs) answered as usual
        filtering_open = None if answer is not None and answer[1] == main else answer is not None
        return classify(samples, filtering_open)
    except OSError as exc:
        log.info("UDP behaviour probe: %s", describe_error(exc))
        return NatBehavior()
    finally:
        for sock in socks:
            sock.close()


async def measure_nat(
    server: tuple[str, int],
    nat_test_port: int | None = None,
    timeout: float = 3.0,
    udp_give_up: float = 2.0,
) -> Verdict:
    """One full measurement (TCP two-port test and UDP probe in parallel); never raises OSError."""
    host, port = server
    nat_port = nat_test_port if nat_test_port is not None else port - 1
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        return _failed(f"cannot resolve {host}: {describe_error(exc)}")
    family, _t, _p, _n, sockaddr = infos[0]
    ip = str(sockaddr[0])
    tcp, udp, behavior = await asyncio.gather(
        tcp_two_port_test(family, ip, port, nat_port, timeout),
        udp_mapping_probe(family, ip, port, udp_give_up),
        udp_behavior_probe(family, ip, port, nat_port),
    )
    return make_verdict(tcp[0], tcp[1], udp, time.time(), behavior)


def _failed(error: str) -> Verdict:
    return make_verdict(TcpObservation(error=error), TcpObservation(), UdpObservation(error=error), time.time())


class NatProbe:
    """Measures now and then; `nat_type` is the last known type (a failed re-measurement keeps it)."""

    def __init__(
        self,
        server: tuple[str, int],
        nat_test_port: int | None = None,
        interval: float = 300.0,
        *,
        timeout: float = 3.0,
        udp_give_up: float = 2.0,
    ) -> None:
        self.server = server
        self.nat_test_port = nat_test_port
        self.interval = interval
        self.timeout = timeout
        self.udp_give_up = udp_give_up
        self.measurements = 0
        self.known = asyncio.Event()
        self._verdict: Verdict | None = None
        self._last_known: Verdict | None = None
        self._behavior = NatBehavior()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._next_at: float | None = None
        self.remeasurements = 0
        self.last_trigger = ""

    @property
    def verdict(self) -> Verdict | None:
        """The latest measurement, known or not."""
        return self._verdict

    @property
    def nat_type(self) -> int:
        """For RegisterPeer/PunchHoleRequest: the last known NAT type, UNKNOWN_NAT before any."""
        return int(self._last_known.nat_type) if self._last_known is not None else int(NatType.UNKNOWN_NAT)

    @property
    def behavior(self) -> NatBehavior:
        """The latest measured UDP behaviour (one that measured nothing does not replace it)."""
        return self._behavior

    async def measure(self) -> Verdict:
        async with self._lock:
            try:
                verdict = await measure_nat(self.server, self.nat_test_port, self.timeout, self.udp_give_up)
            except Exception as exc:  # a bug must not stop the periodic loop; record it
                log.exception("NAT measurement failed")
                verdict = _failed(f"internal error: {exc}")
            self.measurements += 1
            self._verdict = verdict
            if verdict.known:
                self._last_known = verdict
                self.known.set()
            if verdict.behavior.known:
                self._behavior = verdict.behavior
            log.info(
                "NAT %s (tcp ports %s/%s, udp %s)%s",
                verdict.nat_name,
                verdict.port1,
                verdict.port2,
                verdict.udp_mapped_port,
                f": {verdict.error}" if verdict.error else "",
            )
            return verdict

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="nat-probe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def remeasure(self, reason: str, delay: float = 0.0) -> dict[str, Any]:
        """Measure again because the network changed (after `delay` s); returns `status()`.

        The periodic schedule starts over from this measurement: an unknown result is retried on
        the short schedule (1, 3, 7 s ...) as at start-up, a known one is good for `interval`.
        """
        self.remeasurements += 1
        self.last_trigger = reason
        if delay > 0:
            await asyncio.sleep(delay)
        verdict = await self.measure()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            first = self._schedule(verdict, None)
            self._task = asyncio.get_running_loop().create_task(self._run(first), name="nat-probe")
        return self.status()

    def _schedule(self, verdict: Verdict, retry: float | None) -> tuple[float, float | None]:
        delay, retry = next_measurement_delay(verdict, retry, self.interval)
        self._next_at = time.monotonic() + delay
        return delay, retry

    async def _run(self, first: tuple[float, float | None] | None = None) -> None:
        delay, retry = first if first is not None else self._schedule(await self.measure(), None)
        while True:
            await asyncio.sleep(delay)
            delay, retry = self._schedule(await self.measure(), retry)

    def status(self) -> dict[str, Any]:
        return {
            "server": _where(*self.server),
            "nat_type": self.nat_type,
            "nat_name": NatType(self.nat_type).name,
            "nat_behavior": dataclasses.asdict(self._behavior),
            "measurements": self.measurements,
            "remeasurements": self.remeasurements,
            "last_trigger": self.last_trigger or None,
            "latest": self._verdict.as_dict() if self._verdict else None,
            "last_known": self._last_known.as_dict() if self._last_known else None,
            "next_in": None if self._next_at is None else round(max(0.0, self._next_at - time.monotonic()), 3),
        }
