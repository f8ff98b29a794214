"""Hostile and broken input at the relay: it drops and counts, says nothing, and keeps serving."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_core import FIRST_FRAME_MAX
from agent.wire import messages
from agent.wire.frames import encode_frame, encode_header
from tests.integration.relay_helpers import (
    ThreadedRelay,
    blocking_pair_roundtrip,
    blocking_send_expect_close,
    relay_cfg,
    request_frame,
    threaded_relay,
)


@pytest.fixture(scope="module")
def relay() -> Iterator[ThreadedRelay]:
    # Short waits so a junk input that happens to be a valid request does not linger.
    cfg = relay_cfg(pair_timeout=0.5, first_frame_timeout=5.0)
    with threaded_relay(cfg) as r:
        yield r


def drops(relay: ThreadedRelay) -> dict[str, int]:
    return dict(relay.stats()["drops"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=6000))
def test_random_bytes_get_no_reply(relay: ThreadedRelay, data: bytes) -> None:
    # No key is configured, so nothing but a pair partner could ever get bytes back.
    assert blocking_send_expect_close(relay.port, data) == b""


def test_truncated_request_frames(relay: ThreadedRelay) -> None:
    frame = request_frame("uuid-truncated")
    before = drops(relay).get("eof_before_request", 0)
    for cut in range(1, len(frame)):
        assert blocking_send_expect_close(relay.port, frame[:cut]) == b""
    after = drops(relay)["eof_before_request"]
    assert after - before == len(frame) - 1


@pytest.mark.parametrize("declared", [FIRST_FRAME_MAX + 1, 0x3FFF, 0x3FFFFF, 0x3FFFFFFF])
def test_oversized_header_is_refused_before_its_body(relay: ThreadedRelay, declared: int) -> None:
    before = drops(relay).get("oversized_frame", 0)
    # We never half-close: the server must close on the header alone, without waiting for the body.
    assert blocking_send_expect_close(relay.port, encode_header(declared) + b"\x00" * 10, half_close=False) == b""
    assert drops(relay)["oversized_frame"] == before + 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (messages.build(punch_hole_request=pb.PunchHoleRequest(id="123")), "unexpected_message"),
        (messages.build(request_relay=pb.RequestRelay(id="123")), "empty_uuid"),
        (messages.build(request_relay=pb.RequestRelay(uuid="u" * 65)), "uuid_too_long"),
        (b"", "empty"),
        (b"\x92\x01\xff", "malformed"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "malformed"),
    ],
)
def test_wrong_first_message(relay: ThreadedRelay, payload: bytes, reason: str) -> None:
    before = drops(relay).get(reason, 0)
    assert blocking_send_expect_close(relay.port, encode_frame(payload), half_close=False) == b""
    assert drops(relay)[reason] == before + 1


def test_loopback_admin_console_commands_are_just_junk(relay: ThreadedRelay) -> None:
    # Upstream hbbr treats loopback TCP as an admin console; ours has no such thing.
    for cmd in (b"h\n", b"blacklist-add 1.2.3.4\n", b"usage\n"):
        assert blocking_send_expect_close(relay.port, cmd) == b""


def test_server_still_pairs_after_the_junk(relay: ThreadedRelay) -> None:
    blocking_pair_roundtrip(relay.port, "uuid-after-junk", b"still here")
    st = relay.stats()
    assert st["pairs_total"] >= 1
    assert sum(st["drops"].values()) > 0


def test_raw_http_and_tls_probes(relay: ThreadedRelay) -> None:
    tls_hello = bytes.fromhex("16030100a5010000a10303") + b"\x00" * 160
    for probe in (b"GET / HTTP/1.0\r\n\r\n", tls_hello, b"SSH-2.0-OpenSSH_9.6\r\n"):
        assert blocking_send_expect_close(relay.port, probe) == b""
    blocking_pair_roundtrip(relay.port, "uuid-after-probes")


def test_key_mismatch_reply_is_bounded(relay: ThreadedRelay) -> None:
    cfg = relay_cfg(key="k")
    with threaded_relay(cfg) as keyed:
        reply = blocking_send_expect_close(keyed.port, request_frame("u" * 64, key="x" * 3000))
        assert 0 < len(reply) < 200
        assert blocking_send_expect_close(keyed.port, b"\x00\x00\x00") == b""


def test_connection_reset_mid_handshake_is_harmless(relay: ThreadedRelay) -> None:
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", relay.port))
        s.sendall(request_frame("uuid-reset")[:5])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST
    deadline = time.monotonic() + 10
    while relay.stats()["handshaking"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert relay.stats()["handshaking"] == 0
    blocking_pair_roundtrip(relay.port, "uuid-after-resets")
