"""agent/wire/signing.py: signed rendezvous messages and relay tickets, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from agent.proto import rendezvous_pb2 as pb
from agent.wire import messages, signing

KEY = SigningKey(b"k" * 32)
PK = bytes(KEY.verify_key)
BODY = messages.build(punch_hole=pb.PunchHole(relay_server="r:1", requester_id="1234567890"))


def test_seal_appends_field_100_and_the_message_still_parses() -> None:
    data = signing.seal(KEY, signing.PUSH, b"1234567890", BODY)
    assert data.startswith(BODY) and len(data) == len(BODY) + signing.SIGNED_SUFFIX
    kind, msg = messages.parse(data)
    assert kind == "punch_hole" and msg.relay_server == "r:1"
    envelope = pb.RendezvousMessage.FromString(data)
    assert len(envelope.signature) == 64
    assert signing.opened(PK, signing.PUSH, b"1234567890", data) == BODY


@pytest.mark.parametrize(
    ("key", "domain", "context"),
    [
        (bytes(SigningKey(b"x" * 32).verify_key), signing.PUSH, b"1234567890"),  # another key
        (PK, signing.REQUEST, b"1234567890"),  # another kind of signature
        (PK, signing.PUSH, b"9999999999"),  # signed for another peer
    ],
)
def test_a_signature_holds_for_its_key_domain_and_context_only(key: bytes, domain: bytes, context: bytes) -> None:
    data = signing.seal(KEY, signing.PUSH, b"1234567890", BODY)
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.opened(key, domain, context, data)


def test_any_changed_byte_breaks_the_signature() -> None:
    data = signing.seal(KEY, signing.PUSH, b"c", BODY)
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(signing.SignatureError):
            signing.opened(PK, signing.PUSH, b"c", bytes(tampered))


def test_unsigned_and_misplaced_signatures_are_refused() -> None:
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.opened(PK, signing.PUSH, b"c", BODY)
    # a signature field that is not the last one: the message parses, but it is not a signed envelope
    sig = KEY.sign(signing.PUSH + (1).to_bytes(4, "big") + b"c" + BODY).signature
    misplaced = signing.SIGNATURE_FIELD + sig + BODY
    assert messages.parse(misplaced)[0] == "punch_hole"
    with pytest.raises(signing.SignatureError):
        signing.opened(PK, signing.PUSH, b"c", misplaced)
    assert signing.split(b"") == (b"", None)
    assert not signing.verify(PK, signing.PUSH, b"c", BODY, b"short")
    assert not signing.verify(b"short key", signing.PUSH, b"c", BODY, bytes(64))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=40))
def test_arbitrary_bytes_never_raise_anything_but_signature_error(data: bytes, context: bytes) -> None:
    body, sig = signing.split(data)
    assert body + (signing.SIGNATURE_FIELD + sig if sig is not None else b"") == data
    assert not signing.verify(PK, signing.PUSH, context, body, sig)
    with pytest.raises(signing.SignatureError):
        signing.opened(PK, signing.PUSH, context, data)


# --------------------------------------------------------------------------- tickets

NOW = 1_800_000_000.0


def test_a_ticket_is_for_one_uuid_at_one_relay_for_a_while() -> None:
    t = signing.make_ticket(KEY, "u-1", "relay:21117", int(NOW * 1000))
    assert len(t) == signing.TICKET_BYTES
    ok = signing.check_ticket((PK,), t, "u-1", "relay:21117", NOW + 10)
    assert (ok.uuid, ok.relay, ok.issued, ok.expires) == ("u-1", "relay:21117", NOW, NOW + signing.TICKET_TTL)
    for uuid, relay in (("u-2", "relay:21117"), ("u-1", "other:1"), ("u-1", "")):
        with pytest.raises(signing.SignatureError, match="not signed"):
            signing.check_ticket((PK,), t, uuid, relay, NOW)
    with pytest.raises(signing.SignatureError, match="expired"):
        signing.check_ticket((PK,), t, "u-1", "relay:21117", NOW + signing.TICKET_TTL + 1)
    with pytest.raises(signing.SignatureError, match="future"):
        signing.check_ticket((PK,), t, "u-1", "relay:21117", NOW - signing.TICKET_SKEW - 1)
    assert signing.check_ticket((PK,), t, "u-1", "relay:21117", NOW - signing.TICKET_SKEW + 1)  # clocks apart a bit


def test_a_ticket_needs_a_trusted_server_and_its_exact_form() -> None:
    t = signing.make_ticket(KEY, "u", "", int(NOW * 1000))
    with pytest.raises(signing.SignatureError, match="no ticket"):
        signing.check_ticket((PK,), b"", "u", "", NOW)
    with pytest.raises(signing.SignatureError, match="72 bytes"):
        signing.check_ticket((PK,), t + b"\0", "u", "", NOW)
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.check_ticket((), t, "u", "", NOW)
    other = bytes(SigningKey(b"o" * 32).verify_key)
    assert signing.check_ticket((other, b"junk", PK), t, "u", "", NOW).uuid == "u"  # any trusted server will do
    forged = t[:8] + bytes(64)
    with pytest.raises(signing.SignatureError):
        signing.check_ticket((PK,), forged, "u", "", NOW)
    later = (int(NOW * 1000) + 1).to_bytes(8, "big") + t[8:]  # the issue time is signed too
    with pytest.raises(signing.SignatureError):
        signing.check_ticket((PK,), later, "u", "", NOW)
