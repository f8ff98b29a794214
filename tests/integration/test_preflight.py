"""`up`'s first look at the server against a real rendezvous server and real dead ends (no Ray).

Each case is one of the first hour's silent failures: a wrong `--server-key` used to give exit 0 and
"registered"; an unreachable server, 25 s of waiting then exit 0.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from agent.identity import load_or_create
from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous import preflight
from agent.rendezvous.preflight import check_server
from agent.wire import messages
from agent.wire.frames import encode_frame
from tests.agent_fixtures import start_servers


async def check(server: str, state: Path, trusted: bytes | None) -> preflight.ServerCheck:
    host, _, port = server.rpartition(":")
    ident = load_or_create(state)
    return await asyncio.to_thread(check_server, server, (host, int(port)), ident, trusted)


async def test_the_right_key_passes_and_registers_nothing(tmp_path: Path) -> None:
    servers = await start_servers(tmp_path / "srv")
    try:
        key = servers.rendezvous.core.public_key
        result = await check(servers.server, tmp_path / "a", key)
        assert (result.problem, result.key) == ("", key)
        first_contact = await check(servers.server, tmp_path / "b", None)
        assert (first_contact.problem, first_contact.key) == ("", key)  # what first contact would pin
        assert servers.rendezvous.core.lookup(load_or_create(tmp_path / "a").peer_id) is None
    finally:
        await servers.relay.close()
        await servers.rendezvous.close()


async def test_a_wrong_key_is_refused_by_name(tmp_path: Path) -> None:
    servers = await start_servers(tmp_path / "srv")
    try:
        wrong = bytes(SigningKey.generate().verify_key)
        started = time.monotonic()
        result = await check(servers.server, tmp_path / "a", wrong)
        assert "signs with key SHA256:" in result.problem and "not the trusted SHA256:" in result.problem
        assert result.key == servers.rendezvous.core.public_key
        print(f"\nwrong key refused in {time.monotonic() - started:.3f}s")
    finally:
        await servers.relay.close()
        await servers.rendezvous.close()


async def test_nothing_listening_is_said_at_once(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = await check(f"127.0.0.1:{port}", tmp_path, None)
    assert result.problem.startswith(
        f"rendezvous server 127.0.0.1:{port} does not answer (UDP: nothing listens there (ICMP port unreachable); "
        "TCP: connection refused)"
    )
    assert f"UDP port {port} reaches it" in result.problem
    assert time.monotonic() - started < preflight.WAIT  # the ICMP answer, not the timeout


def udp_and_tcp_on_one_port() -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a bound, not listening TCP socket on one port (connecting to it is refused).

    Holding the TCP port keeps another test from taking it before a test here listens on it."""
    for _ in range(100):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", tcp.getsockname()[1]))
        except OSError:
            tcp.close()
            udp.close()
            continue
        return udp, tcp
    raise RuntimeError("no port free for both UDP and TCP")


@pytest.fixture
def silent_or_unsigned() -> Iterator[tuple[int, list[bytes], socket.socket]]:
    """A UDP socket that answers each request with whatever the test put in the list (nothing if empty),
    and the same port held for TCP (refusing until a test listens on it)."""
    sock, tcp = udp_and_tcp_on_one_port()
    sock.settimeout(0.1)
    answers: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                _data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            for answer in answers:
                sock.sendto(answer, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], answers, tcp
    stop.set()
    thread.join()
    sock.close()
    tcp.close()


async def test_a_silent_server_times_out_with_what_to_check(
    tmp_path: Path, silent_or_unsigned: tuple[int, list[bytes], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "WAIT", 3.5)
    port, _, _ = silent_or_unsigned
    result = await check(f"127.0.0.1:{port}", tmp_path, None)
    assert result.problem == (
        f"rendezvous server 127.0.0.1:{port} does not answer (UDP: no reply to 2 requests in 3.5 s; TCP: connection "
        f"refused): check that it runs, that the address is right and that UDP port {port} reaches it"
    )


async def test_udp_blocked_but_tcp_answering_is_a_warning_not_a_failure(
    tmp_path: Path, silent_or_unsigned: tuple[int, list[bytes], socket.socket]
) -> None:
    """A network that drops UDP (natlab `udp-blocked`): a note, not a failure (the agent registers over TCP).
    TCP is asked beside UDP, so UDP gets UDP_AFTER_TCP seconds, not the whole WAIT."""
    port, _, listener = silent_or_unsigned
    listener.listen()

    def answer_test_nat() -> None:
        conn, peer = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(encode_frame(messages.build(test_nat_response=pb.TestNatResponse(port=peer[1]))))

    thread = threading.Thread(target=answer_test_nat, daemon=True)
    thread.start()
    try:
        result = await check(f"127.0.0.1:{port}", tmp_path, None)
    finally:
        listener.close()
    assert (result.problem, result.udp_blocked, result.key) == ("", "no reply to 1 request in 2 s", None)
    assert preflight.UDP_AFTER_TCP == 2.0 < preflight.WAIT


async def test_an_unsigned_answer_is_not_a_punchthrough_server(
    tmp_path: Path, silent_or_unsigned: tuple[int, list[bytes], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an hbbs says to a RegisterPk: OK, unsigned. It cannot vouch for keys, and `up` says so."""
    monkeypatch.setattr(preflight, "WAIT", 1.0)
    port, answers, _ = silent_or_unsigned
    answers.append(messages.build(register_pk_response=pb.RegisterPkResponse(result=pb.RegisterPkResponse.OK)))
    result = await check(f"127.0.0.1:{port}", tmp_path, bytes(32))
    assert "answers without a valid signature: not a punchthrough rendezvous server" in result.problem


async def test_an_unknown_host_is_one_line(tmp_path: Path) -> None:
    result = await check("no-such-host.invalid:21116", tmp_path, None)
    assert result.problem.startswith("cannot resolve rendezvous server no-such-host.invalid:21116")
