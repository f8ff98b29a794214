"""Regressions for bugs the atheris harnesses (fuzz/) found; each test names its harness."""

from __future__ import annotations

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_core import MAX_UUID_LEN, Accept, Drop, check_request, decode_handoff, encode_handoff
from agent.wire import messages


def test_relay_uuid_limit_counts_bytes_so_every_accepted_uuid_can_be_handed_off() -> None:
    """fuzz.relay: 64 four-byte characters passed the 64-character check, then encode_handoff
    (one length byte) raised ValueError inside the relay's connection handler."""
    wide = "\U0001f600" * MAX_UUID_LEN
    assert check_request(messages.build(request_relay=pb.RequestRelay(uuid=wide))) == Drop("uuid_too_long")
    fits = "\U0001f600" * (MAX_UUID_LEN // 4)
    decision = check_request(messages.build(request_relay=pb.RequestRelay(uuid=fits)), open_relay=True)
    assert decision == Accept(fits)
    assert decode_handoff(encode_handoff(fits, "203.0.113.9:1")) == (fits, "203.0.113.9:1")
