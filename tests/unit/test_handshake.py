"""Peer handshake + mutual authentication: golden bytes, full runs, and every refusal."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey

from agent.proto import message_pb2 as pb
from agent.wire.frames import FrameDecoder, encode_frame
from agent.wire.handshake import (
    MAX_AUTH_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    ZERO_NONCE,
    Binding,
    HandshakeError,
    Initiator,
    Policy,
    Responder,
    TrustedBy,
    auth_signed_bytes,
    direction_keys,
    password_proof,
    transcript_hash,
    trusted_peer_key,
)
from agent.wire.keys import sign_id_pk
from agent.wire.peer_ids import fingerprint
from agent.wire.secure_channel import SecureChannel
from tests.conftest import load_vectors

V = load_vectors("handshake_vectors.json")


def seed(tag: str) -> bytes:
    return hashlib.sha256(b"rustdesk-vector-" + tag.encode()).digest()


HBBS = SigningKey(seed(V["hbbs_sign_seed_tag"]))
B_SIGN = SigningKey(seed(V["peer_b_sign_seed_tag"]))
B_EPH = PrivateKey(seed(V["b_ephemeral_box_secret_seed_tag"]))
A_EPH = PrivateKey(seed(V["a_ephemeral_box_secret_seed_tag"]))
SESSION = seed(V["session_key_tag"])
B_ID = "123456789"
A_ID = "987654321"
A_SIGN = SigningKey(hashlib.sha256(b"test-peer-A-ed25519").digest())
B_PK = bytes(B_SIGN.verify_key)
A_PK = bytes(A_SIGN.verify_key)
PASSWORD = "correct horse battery staple"
OPEN_POLICY = Policy(allowed_keys={A_ID: fingerprint(A_PK)}, allowed_targets=frozenset({"127.0.0.1:22"}))


def make_b(
    policy: Policy = OPEN_POLICY,
    eph: PrivateKey | None = None,
    key: SigningKey = B_SIGN,
    binding: Binding | None = None,
    gate: Any = None,
) -> Responder:
    return Responder(B_ID, key, policy, ephemeral_key=eph, binding=binding, password_gate=gate)


def make_a(**kw: Any) -> Initiator:
    args: dict[str, Any] = {
        "my_id": A_ID,
        "my_signing_key": A_SIGN,
        "peer_id": B_ID,
        "peer_sign_pk": B_PK,
        "target": "127.0.0.1:22",
    }
    args.update(kw)
    return Initiator(**args)


@dataclass
class Run:
    a: Initiator
    b: Responder
    signed_id: bytes
    public_key: bytes
    sealed_auth: bytes
    reply: bytes


def run(a: Initiator, b: Responder) -> Run:
    assert a.start() == []
    (signed_id,) = b.start()
    public_key, sealed_auth = a.receive(signed_id)
    assert b.receive(public_key) == []
    (reply,) = b.receive(sealed_auth)
    assert a.receive(reply) == []
    return Run(a, b, signed_id, public_key, sealed_auth, reply)


def to_auth_step(a: Initiator, b: Responder) -> tuple[bytes, bytes, bytes]:
    """Drive both machines up to B waiting for PeerAuth; return (signed_id, public_key, sealed_auth)."""
    a.start()
    (signed_id,) = b.start()
    public_key, sealed_auth = a.receive(signed_id)
    b.receive(public_key)
    return signed_id, public_key, sealed_auth


def eavesdrop_keys(signed_id: bytes, public_key: bytes, b_eph: PrivateKey) -> tuple[bytes, bytes]:
    """What B (or anyone holding B's ephemeral secret) derives: (A->B key, B->A key)."""
    msg = pb.Message.FromString(public_key).public_key
    session = Box(b_eph, PublicKey(msg.asymmetric_value)).decrypt(msg.symmetric_value, ZERO_NONCE)
    return direction_keys(session, transcript_hash(signed_id, public_key))


def refused(b_error: HandshakeError, a: Initiator) -> str:
    """Deliver B's sealed refusal to A; return A's reason."""
    assert len(b_error.reply) == 1
    with pytest.raises(HandshakeError) as exc:
        a.receive(b_error.reply[0])
    assert a.failure == exc.value.reason
    return exc.value.reason


def assert_dead(m: Initiator | Responder) -> None:
    assert not m.done
    assert m.failure
    with pytest.raises(RuntimeError, match="not finished"):
        _ = m.channel
    with pytest.raises(HandshakeError, match="already failed"):
        m.receive(b"anything")


# ---------------------------------------------------------------- golden vectors


def test_vector_keys() -> None:
    assert bytes(HBBS.verify_key).hex() == V["hbbs_sign_public_key_hex"]
    assert B_PK.hex() == V["peer_b_sign_public_key_hex"]
    assert bytes(B_EPH.public_key).hex() == V["b_ephemeral_box_public_hex"]
    assert bytes(A_EPH.public_key).hex() == V["a_ephemeral_box_public_hex"]
    assert SESSION.hex() == V["session_key_hex"]


def test_vector_rendezvous_signed_idpk() -> None:
    assert pb.IdPk(id=B_ID, pk=B_PK).SerializeToString().hex() == V["idpk_for_b_hex"]
    assert sign_id_pk(HBBS, B_ID, B_PK).hex() == V["hbbs_signed_idpk_for_b_hex"]
    signed = bytes.fromhex(V["hbbs_signed_idpk_for_b_hex"])
    assert trusted_peer_key(B_ID, server_key=bytes(HBBS.verify_key), signed_id_pk=signed) == (B_PK, "rendezvous-signed")


def test_vector_responder_signed_id() -> None:
    (payload,) = make_b(eph=B_EPH).start()
    assert payload.hex() == V["message_signed_id_hex"]
    signed = pb.Message.FromString(payload).signed_id.id
    assert signed.hex() == V["signed_id_value_hex"]
    assert signed[64:].hex() == V["signed_id_inner_idpk_hex"]


def test_vector_initiator_public_key() -> None:
    a = make_a(ephemeral_key=A_EPH, session_key=SESSION)
    a.start()
    public_key, _ = a.receive(bytes.fromhex(V["message_signed_id_hex"]))
    assert public_key.hex() == V["message_public_key_hex"]
    assert pb.Message.FromString(public_key).public_key.symmetric_value.hex() == V["sealed_session_key_hex"]


def test_vector_handshake_completes_with_vector_keys() -> None:
    r = run(make_a(ephemeral_key=A_EPH, session_key=SESSION), make_b(eph=B_EPH))
    assert r.signed_id.hex() == V["message_signed_id_hex"]
    assert r.public_key.hex() == V["message_public_key_hex"]
    a_to_b, b_to_a = direction_keys(SESSION, transcript_hash(r.signed_id, r.public_key))
    assert eavesdrop_keys(r.signed_id, r.public_key, B_EPH) == (a_to_b, b_to_a)
    # the session channel is the vectors' secretbox framing, with one key per direction:
    # A's PeerAuth used counter 1, so A's next frame is the vectors' frame 2 under the A->B key
    peer_auth = pb.Message.FromString(SecureChannel(bytes(32), a_to_b).open(r.sealed_auth)).peer_auth
    assert (peer_auth.id, peer_auth.pk, peer_auth.target) == (A_ID, A_PK, "127.0.0.1:22")
    f = V["secretbox_frames"][1]
    plain = bytes.fromhex(f["plaintext_hex"])
    reference = SecureChannel(a_to_b, send_counter=f["counter"] - 1)
    sealed = reference.seal(plain)
    assert r.a.channel.seal(plain) == sealed
    assert r.b.channel.open(sealed) == plain
    assert SecureChannel(SESSION, send_counter=1).seal(plain).hex() == f["ciphertext_hex"]  # RustDesk's key


# ---------------------------------------------------------------- the happy path


def test_full_handshake_random_keys() -> None:
    a_key = SigningKey.generate()
    a_pk = bytes(a_key.verify_key)
    b = make_b(Policy(pinned_keys={"555": a_pk}, allowed_targets=frozenset({"[::1]:8080"})))
    a = make_a(my_id="555", my_signing_key=a_key, target="[::1]:8080")
    r = run(a, b)
    assert a.done and b.done and a.failure is None
    assert (b.peer_id, b.peer_pk, b.target, b.admitted_by) == ("555", a_pk, "[::1]:8080", "pinned key")
    assert a.channel.send_counter == 1 and a.channel.recv_counter == 1
    assert b.channel.send_counter == 1 and b.channel.recv_counter == 1
    # data both ways through the frame codec
    dec_b, dec_a = FrameDecoder(), FrameDecoder()
    stream = b"".join(encode_frame(a.channel.seal(bytes([i]) * i)) for i in range(50))
    assert [b.channel.open(p) for p in dec_b.feed(stream)] == [bytes([i]) * i for i in range(50)]
    assert [a.channel.open(p) for p in dec_a.feed(encode_frame(b.channel.seal(b"pong")))] == [b"pong"]
    assert len(r.signed_id) < 200 and len(r.public_key) < 100


def test_allow_entry_with_the_key_and_empty_target() -> None:
    b = make_b(Policy(allowed_keys={A_ID: fingerprint(A_PK)}))
    run(make_a(target=""), b)
    assert (b.admitted_by, b.target, b.peer_pk, b.id_verified) == (TrustedBy.ALLOW_KEY, "", A_PK, True)


def test_a_bare_allowed_id_is_admitted_with_the_key_the_server_bound_to_it() -> None:
    b = make_b(Policy(allowed_ids=frozenset({A_ID})), binding=Binding(A_ID, A_PK))
    run(make_a(target=""), b)
    assert (b.admitted_by, b.peer_pk, b.id_verified) == (TrustedBy.SERVER_BINDING, A_PK, True)


def test_a_bare_allowed_id_with_nothing_to_vouch_for_its_key_is_refused() -> None:
    """Finding 1: the first contact claiming an allowed ID with a key of its own."""
    auth_refused(
        make_b(Policy(allowed_ids=frozenset({A_ID}))),
        make_a(),
        "nothing vouched for its key",
        f"peer {A_ID}: this agent allows your ID but cannot check your key on this path; "
        f"on {B_ID}, run `punchthrough allow {A_ID}={fingerprint(A_PK)}`",
    )


def test_a_key_other_than_the_servers_binding_is_refused() -> None:
    other = bytes(SigningKey.generate().verify_key)
    policy = Policy(allowed_ids=frozenset({A_ID}), password=PASSWORD, allowed_targets=frozenset({"127.0.0.1:22"}))
    auth_refused(
        make_b(policy, binding=Binding(A_ID, other)),
        make_a(password=PASSWORD),
        "not the key the rendezvous server bound to it",
        f"peer {A_ID}: your key is not the one the rendezvous server has for {A_ID}",
    )


def test_claiming_another_id_than_the_server_named_is_refused() -> None:
    policy = Policy(password=PASSWORD, allowed_targets=frozenset({"127.0.0.1:22"}))
    auth_refused(
        make_b(policy, binding=Binding("555", A_PK)),
        make_a(password=PASSWORD),
        "says the requester is 555",
        f"you claim to be {A_ID} but the rendezvous server says you are 555",
    )


def test_an_allow_entry_naming_another_key_refuses_even_a_pinned_one() -> None:
    other = bytes(SigningKey.generate().verify_key)
    policy = Policy(allowed_keys={A_ID: fingerprint(other)}, pinned_keys={A_ID: A_PK})
    auth_refused(
        make_b(policy, binding=Binding(A_ID, A_PK)),
        make_a(),
        "its allow entry names",
        f"peer {A_ID}: your key {fingerprint(A_PK)} is not the one on this agent's allow list",
    )


def test_password_gate_refuses_before_checking_and_failures_are_flagged() -> None:
    policy = Policy(password=PASSWORD, allowed_targets=frozenset({"127.0.0.1:22"}))
    refusal = f"{A_ID}: too many failed password attempts; retry in 9 s"
    b = make_b(policy, gate=lambda claimed: f"{claimed}: too many failed password attempts; retry in 9 s")
    auth_refused(b, make_a(password=PASSWORD), "retry in 9 s", refusal)
    assert not b.password_failed
    b = make_b(policy, gate=lambda claimed: None)
    auth_refused(b, make_a(password="nope"), "wrong password", "wrong password")
    assert b.password_failed and b.claimed_id == A_ID and b.claimed_pk == A_PK


def test_password_admission_without_a_binding_leaves_the_id_unverified() -> None:
    policy = Policy(password=PASSWORD, allowed_targets=frozenset({"127.0.0.1:22"}))
    b = make_b(policy)
    run(make_a(password=PASSWORD), b)
    assert (b.admitted_by, b.id_verified) == (TrustedBy.PASSWORD, False)
    b = make_b(policy, binding=Binding(A_ID, A_PK))
    run(make_a(password=PASSWORD), b)
    assert (b.admitted_by, b.id_verified) == (TrustedBy.PASSWORD, True)


def test_would_admit_decides_whether_b_acts_on_a_push() -> None:
    bound = Binding(A_ID, A_PK)
    assert Policy(allowed_ids=frozenset({A_ID})).would_admit(bound)
    assert not Policy(allowed_ids=frozenset({"555"})).would_admit(bound)
    assert not Policy(allowed_ids=frozenset({A_ID})).would_admit(None)
    assert Policy(allowed_keys={A_ID: fingerprint(A_PK)}).would_admit(bound)
    assert not Policy(allowed_keys={A_ID: fingerprint(B_PK)}).would_admit(bound)
    assert not Policy(pinned_keys={A_ID: B_PK}, allowed_ids=frozenset({A_ID})).would_admit(bound)
    assert Policy(password=PASSWORD).would_admit(None)  # anyone may try a password


def test_directions_never_share_a_nonce() -> None:
    r = run(make_a(), make_b())
    assert r.a.channel.seal(b"same text") != r.b.channel.seal(b"same text")


def test_sessions_differ() -> None:
    one, two = run(make_a(), make_b()), run(make_a(), make_b())
    assert one.signed_id != two.signed_id and one.public_key != two.public_key


def test_password_admits_unlisted_peer() -> None:
    b = make_b(Policy(password=PASSWORD, allowed_targets=frozenset({"127.0.0.1:22"})))
    run(make_a(my_id="424242", password=PASSWORD), b)
    assert (b.peer_id, b.admitted_by) == ("424242", "password")


# ---------------------------------------------------------------- A's view of B's key


def test_trusted_key_forged_rendezvous_idpk() -> None:
    forged = sign_id_pk(SigningKey.generate(), B_ID, B_PK)
    with pytest.raises(HandshakeError, match="does not verify with the server key"):
        trusted_peer_key(B_ID, server_key=bytes(HBBS.verify_key), signed_id_pk=forged)
    tampered = bytearray(bytes.fromhex(V["hbbs_signed_idpk_for_b_hex"]))
    tampered[-1] ^= 1
    with pytest.raises(HandshakeError, match="does not verify"):
        trusted_peer_key(B_ID, server_key=bytes(HBBS.verify_key), signed_id_pk=bytes(tampered))


def test_trusted_key_for_another_id() -> None:
    other = sign_id_pk(HBBS, "111111111", bytes(SigningKey.generate().verify_key))
    with pytest.raises(HandshakeError, match="is for peer 111111111, not 123456789"):
        trusted_peer_key(B_ID, server_key=bytes(HBBS.verify_key), signed_id_pk=other)


def test_trusted_key_pinned() -> None:
    signed = bytes.fromhex(V["hbbs_signed_idpk_for_b_hex"])
    server = bytes(HBBS.verify_key)
    assert trusted_peer_key(B_ID, pinned=B_PK) == (B_PK, "pinned")
    assert trusted_peer_key(B_ID, server_key=server, signed_id_pk=signed, pinned=B_PK) == (B_PK, "pinned")
    with pytest.raises(HandshakeError, match="does not match the pinned key"):
        trusted_peer_key(B_ID, server_key=server, signed_id_pk=signed, pinned=A_PK)
    with pytest.raises(HandshakeError, match="pinned key for peer 123456789 is 5 bytes"):
        trusted_peer_key(B_ID, pinned=b"short")


def test_trusted_key_missing_or_unusable() -> None:
    signed = bytes.fromhex(V["hbbs_signed_idpk_for_b_hex"])
    with pytest.raises(HandshakeError, match="no key for peer"):
        trusted_peer_key(B_ID, signed_id_pk=b"")
    with pytest.raises(HandshakeError, match="no server key"):
        trusted_peer_key(B_ID, signed_id_pk=signed)
    garbled = bytes(HBBS.sign(b"\xff\xff\xff"))
    with pytest.raises(HandshakeError, match="malformed IdPk"):
        trusted_peer_key(B_ID, server_key=bytes(HBBS.verify_key), signed_id_pk=garbled)
    short_pk = sign_id_pk(HBBS, B_ID, b"\x01" * 31)
    with pytest.raises(HandshakeError, match="31 bytes"):
        trusted_peer_key(B_ID, server_key=bytes(HBBS.verify_key), signed_id_pk=short_pk)


# ---------------------------------------------------------------- A refuses B


def signed_id_from(key: SigningKey, peer_id: str, eph_pk: bytes) -> bytes:
    idpk = pb.IdPk(id=peer_id, pk=eph_pk).SerializeToString()
    return pb.Message(signed_id=pb.SignedId(id=bytes(key.sign(idpk)))).SerializeToString()


def a_refuses(payload: bytes, match: str, **kw) -> Initiator:
    a = make_a(**kw)
    a.start()
    with pytest.raises(HandshakeError, match=match) as exc:
        a.receive(payload)
    assert "\n" not in exc.value.reason and exc.value.reply == []
    assert_dead(a)
    return a


def test_b_key_differs_from_pinned_key() -> None:
    impostor = Responder(B_ID, SigningKey.generate(), OPEN_POLICY)
    (payload,) = impostor.start()
    a_refuses(payload, "peer 123456789 presented a key that does not match the pinned key", key_source="pinned")
    a_refuses(payload, "does not match the rendezvous-signed key", key_source="rendezvous-signed")


def test_peer_presenting_another_ids_key() -> None:
    """Agent 111 answers a dial for 123456789 with its own, valid, signed key exchange."""
    other = Responder("111111111", SigningKey.generate(), OPEN_POLICY)
    a_refuses(other.start()[0], "presented a key that does not match")


def test_wrong_id_in_signed_id() -> None:
    payload = signed_id_from(B_SIGN, "111111111", bytes(B_EPH.public_key))
    a_refuses(payload, "signed its key exchange as peer 111111111")
    hostile = signed_id_from(B_SIGN, "evil\nline\x1b[31m", bytes(B_EPH.public_key))
    a_refuses(hostile, r"as peer 'evil\?line\?\[31m'")


def test_bad_ephemeral_keys() -> None:
    a_refuses(signed_id_from(B_SIGN, B_ID, b"\x09" * 31), "ephemeral key of 31 bytes")
    a_refuses(signed_id_from(B_SIGN, B_ID, b""), "ephemeral key of 0 bytes")
    a_refuses(signed_id_from(B_SIGN, B_ID, bytes(32)), "unusable ephemeral key")
    b_pub = bytes(B_EPH.public_key)
    a_refuses(signed_id_from(B_SIGN, B_ID, b_pub[:31] + bytes([b_pub[31] | 0x80])), "non-canonical ephemeral key")


def test_a_refuses_plaintext_fallback_and_wrong_messages() -> None:
    a_refuses(b"", "empty message .*plaintext fallback")
    a_refuses(pb.Message(public_key=pb.PublicKey()).SerializeToString(), "sent public_key where signed_id was expected")
    a_refuses(pb.Message(signed_id=pb.SignedId()).SerializeToString(), "SignedId of 0 bytes")
    a_refuses(pb.Message(signed_id=pb.SignedId(id=b"x" * 64)).SerializeToString(), "SignedId of 64 bytes")
    a_refuses(bytes([0xF8, 0x07, 0x01]), "no known member")  # unknown field 127
    a_refuses(b"\xff\xff\xff", "malformed message")
    a_refuses(b"\x1a" + b"\x00" * (MAX_HANDSHAKE_PAYLOAD), "limit 1024")
    unsigned_idpk = pb.IdPk(id=B_ID, pk=bytes(B_EPH.public_key)).SerializeToString()
    a_refuses(pb.Message(signed_id=pb.SignedId(id=bytes(64) + unsigned_idpk)).SerializeToString(), "does not match")
    a_refuses(
        pb.Message(signed_id=pb.SignedId(id=bytes(B_SIGN.sign(b"\xff\xff")))).SerializeToString(), "malformed IdPk"
    )


def test_replayed_signed_id_never_completes() -> None:
    """A recorded SignedId replayed at A: the replayer cannot open the session key, so no AuthResult works."""
    old = run(make_a(), make_b())
    a = make_a()
    a.start()
    public_key, _ = a.receive(old.signed_id)
    with pytest.raises(HandshakeError, match="no key confirmation"):
        a.receive(old.reply)
    assert_dead(a)
    # even someone who knows the *old* session keys cannot confirm the new session
    a = make_a()
    a.start()
    a.receive(old.signed_id)
    forged = SecureChannel(hashlib.sha256(b"guess").digest()).seal(
        pb.Message(auth_result=pb.AuthResult(ok=True)).SerializeToString()
    )
    with pytest.raises(HandshakeError, match="no key confirmation"):
        a.receive(forged)
    assert public_key != old.public_key


# ---------------------------------------------------------------- B refuses the key exchange


def b_refuses(payload: bytes, match: str, b: Responder | None = None) -> None:
    b = b or make_b()
    b.start()
    with pytest.raises(HandshakeError, match=match) as exc:
        b.receive(payload)
    assert "\n" not in exc.value.reason and exc.value.reply == []
    assert_dead(b)


def public_key_msg(asym: bytes, sym: bytes) -> bytes:
    return pb.Message(public_key=pb.PublicKey(asymmetric_value=asym, symmetric_value=sym)).SerializeToString()


def test_b_refuses_bad_public_key() -> None:
    a_pub = bytes(A_EPH.public_key)
    sealed = Box(A_EPH, B_EPH.public_key).encrypt(SESSION, ZERO_NONCE).ciphertext
    b_refuses(b"", "empty message .*plaintext fallback")
    b_refuses(public_key_msg(b"", b""), "empty PublicKey")
    b_refuses(public_key_msg(a_pub[:31], sealed), "ephemeral key of 31 bytes")
    b_refuses(public_key_msg(a_pub + b"\x00", sealed), "ephemeral key of 33 bytes")
    b_refuses(public_key_msg(a_pub[:31] + bytes([a_pub[31] | 0x80]), sealed), "non-canonical ephemeral key")
    b_refuses(public_key_msg(a_pub, sealed[:47]), "sealed session key of 47 bytes")
    b_refuses(public_key_msg(a_pub, sealed), "does not open", make_b())  # sealed for B_EPH, not this session
    b_refuses(public_key_msg(bytes(32), sealed), "does not open")
    b_refuses(make_b().start()[0], "sent signed_id where public_key was expected")
    b_refuses(b"\x22" + b"\x00" * MAX_HANDSHAKE_PAYLOAD, "limit 1024")


def test_b_opens_vector_public_key_only_with_its_ephemeral_key() -> None:
    b = make_b(eph=B_EPH)
    b.start()
    assert b.receive(bytes.fromhex(V["message_public_key_hex"])) == []
    tampered = bytearray(bytes.fromhex(V["message_public_key_hex"]))
    tampered[-1] ^= 0x80
    b_refuses(bytes(tampered), "does not open", make_b(eph=B_EPH))


def test_replayed_public_key_into_new_session() -> None:
    old = run(make_a(), make_b())
    b = make_b()
    b.start()
    with pytest.raises(HandshakeError, match="does not open"):
        b.receive(old.public_key)


# ---------------------------------------------------------------- B judges A


def auth_refused(b: Responder, a: Initiator, local: str, public: str) -> None:
    _, _, sealed_auth = to_auth_step(a, b)
    with pytest.raises(HandshakeError, match=local) as exc:
        b.receive(sealed_auth)
    assert_dead(b)
    reason = refused(exc.value, a)
    assert reason == f"peer {B_ID} refused the session: {public}"
    assert_dead(a)
    for secret in (PASSWORD, A_SIGN.encode().hex(), A_PK.hex()):
        assert secret not in exc.value.reason and secret not in reason


def test_unlisted_peer() -> None:
    auth_refused(
        make_b(Policy(allowed_ids=frozenset({"111"}))),
        make_a(),
        "not allowed",
        f"{A_ID} is not on this agent's allow list: on {B_ID}, run `punchthrough allow {A_ID}={fingerprint(A_PK)}`",
    )


def test_pinned_key_mismatch_is_refused_even_with_password() -> None:
    policy = Policy(pinned_keys={A_ID: bytes(32)}, password=PASSWORD, allowed_targets=frozenset({"127.0.0.1:22"}))
    auth_refused(
        make_b(policy),
        make_a(password=PASSWORD),
        "not its pinned key",
        f"peer {A_ID}: your key {fingerprint(A_PK)} is not the key this agent pinned for {A_ID}",
    )


def test_wrong_password() -> None:
    policy = Policy(password=PASSWORD, allowed_targets=frozenset({"127.0.0.1:22"}))
    auth_refused(make_b(policy), make_a(password="Tr0ub4dor&3"), "wrong password", "wrong password")


def test_missing_password() -> None:
    policy = Policy(password=PASSWORD, allowed_targets=frozenset({"127.0.0.1:22"}))
    auth_refused(make_b(policy), make_a(), "gave no password", "password required")


def test_disallowed_target() -> None:
    auth_refused(
        make_b(),
        make_a(target="10.0.0.1:22"),
        "which is not allowed",
        "target 10.0.0.1:22 is not allowed: on 123456789, run `punchthrough allow-target 10.0.0.1:22`",
    )


def test_target_required() -> None:
    policy = Policy(allowed_keys={A_ID: fingerprint(A_PK)}, allow_no_target=False)
    auth_refused(make_b(policy), make_a(target=""), "a target is required", "a forward target is required")


def seal_auth(a_to_b: bytes, auth: pb.PeerAuth) -> bytes:
    return SecureChannel(a_to_b).seal(pb.Message(peer_auth=auth).SerializeToString())


def test_replayed_auth_from_another_session() -> None:
    """Malicious M, whom A trusts, re-seals A's PeerAuth (signature + password proof) into M's session with B."""
    m_eph = PrivateKey.generate()
    m_sign = SigningKey.generate()
    m = Responder("666666666", m_sign, OPEN_POLICY, ephemeral_key=m_eph)
    a = make_a(peer_id="666666666", peer_sign_pk=bytes(m_sign.verify_key), password=PASSWORD)
    signed_id, public_key, sealed_auth = to_auth_step(a, m)
    a_to_m, _ = eavesdrop_keys(signed_id, public_key, m_eph)
    stolen = pb.Message.FromString(SecureChannel(b"\x00" * 32, a_to_m).open(sealed_auth)).peer_auth
    assert stolen.pk == A_PK and len(stolen.password_proof) == 32

    for policy in (Policy(pinned_keys={A_ID: A_PK}), Policy(password=PASSWORD)):
        b = make_b(policy)
        (b_signed_id,) = b.start()
        m_key = SigningKey.generate()
        mi = Initiator("666666666", m_key, B_ID, B_PK, session_key=hashlib.sha256(b"m").digest())
        mi.start()
        m_public_key, _ = mi.receive(b_signed_id)
        b.receive(m_public_key)
        m_to_b, _ = direction_keys(hashlib.sha256(b"m").digest(), transcript_hash(b_signed_id, m_public_key))
        with pytest.raises(HandshakeError, match="does not verify for this session") as exc:
            b.receive(seal_auth(m_to_b, stolen))
        assert len(exc.value.reply) == 1
        assert_dead(b)

    # M signs with its own key but borrows A's password proof: bound to A's transcript, so wrong
    b = make_b(Policy(password=PASSWORD))
    (b_signed_id,) = b.start()
    m_key = SigningKey.generate()
    m_session = hashlib.sha256(b"m2").digest()
    mi = Initiator("666666666", m_key, B_ID, B_PK, session_key=m_session)
    mi.start()
    m_public_key, _ = mi.receive(b_signed_id)
    b.receive(m_public_key)
    transcript = transcript_hash(b_signed_id, m_public_key)
    own = pb.PeerAuth(
        id="666666666",
        pk=bytes(m_key.verify_key),
        signature=m_key.sign(auth_signed_bytes(transcript, "666666666", "")).signature,
        password_proof=stolen.password_proof,
    )
    with pytest.raises(HandshakeError, match="wrong password"):
        b.receive(seal_auth(direction_keys(m_session, transcript)[0], own))


def test_auth_signature_covers_target_and_id() -> None:
    b = make_b(Policy(pinned_keys={A_ID: A_PK}, allowed_targets=frozenset({"127.0.0.1:22", "127.0.0.1:80"})))
    a = make_a(session_key=hashlib.sha256(b"s").digest())
    signed_id, public_key, sealed_auth = to_auth_step(a, b)
    a_to_b, _ = direction_keys(hashlib.sha256(b"s").digest(), transcript_hash(signed_id, public_key))
    auth = pb.Message.FromString(SecureChannel(b"\x00" * 32, a_to_b).open(sealed_auth)).peer_auth
    auth.target = "127.0.0.1:80"
    with pytest.raises(HandshakeError, match="does not verify for this session"):
        b.receive(seal_auth(a_to_b, auth))


def test_password_proof_is_what_the_docs_say() -> None:
    from agent.wire.handshake import password_key

    t = hashlib.sha256(b"t").digest()
    assert password_key(PASSWORD, B_ID) == password_key(PASSWORD, B_ID)
    assert password_key(PASSWORD, B_ID) != password_key(PASSWORD, A_ID)
    assert password_proof(password_key(PASSWORD, B_ID), t) != password_proof(password_key(PASSWORD, B_ID), t[::-1])


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"pk": b"\x01" * 31}, "key of 31 bytes"),
        ({"signature": b"\x01" * 63}, "signature of 63 bytes"),
        ({"password_proof": b"\x01" * 5}, "proof of 5 bytes"),
        ({"id": ""}, "ID of 0 bytes"),
        ({"id": "9" * 65}, "ID of 65 bytes"),
        ({"target": "x" * 300}, "target of 300 bytes"),
    ],
)
def test_malformed_peer_auth(change: dict, detail: str) -> None:
    b = make_b()
    a = make_a(session_key=hashlib.sha256(b"s").digest())
    signed_id, public_key, _ = to_auth_step(a, b)
    a_to_b, _ = direction_keys(hashlib.sha256(b"s").digest(), transcript_hash(signed_id, public_key))
    fields: dict[str, Any] = {"id": A_ID, "pk": A_PK, "signature": bytes(64), "password_proof": b"", "target": ""}
    fields.update(change)
    with pytest.raises(HandshakeError, match=detail) as exc:
        b.receive(seal_auth(a_to_b, pb.PeerAuth(**fields)))
    assert refused(exc.value, a).endswith("refused the session: malformed auth message")


def test_wrong_message_inside_channel() -> None:
    b = make_b()
    a = make_a(session_key=hashlib.sha256(b"s").digest())
    signed_id, public_key, _ = to_auth_step(a, b)
    a_to_b, _ = direction_keys(hashlib.sha256(b"s").digest(), transcript_hash(signed_id, public_key))
    with pytest.raises(HandshakeError, match="auth_result where peer_auth was expected") as exc:
        b.receive(SecureChannel(a_to_b).seal(pb.Message(auth_result=pb.AuthResult(ok=True)).SerializeToString()))
    assert "malformed auth message" in refused(exc.value, a)


def test_tampered_auth_frame_gets_no_reply() -> None:
    b, a = make_b(), make_a()
    _, _, sealed_auth = to_auth_step(a, b)
    bad = bytearray(sealed_auth)
    bad[20] ^= 4
    with pytest.raises(HandshakeError, match="failed authentication") as exc:
        b.receive(bytes(bad))
    assert exc.value.reply == []
    assert_dead(b)
    with pytest.raises(HandshakeError, match="limit 2048"):
        make_b_at_auth().receive(b"\x00" * (MAX_AUTH_PAYLOAD + 1))


def make_b_at_auth() -> Responder:
    b = make_b()
    to_auth_step(make_a(), b)
    return b


def test_tampered_or_hostile_auth_result() -> None:
    session = hashlib.sha256(b"s").digest()
    b, a = make_b(), make_a(session_key=session)
    signed_id, public_key, _ = to_auth_step(a, b)
    _, b_to_a = direction_keys(session, transcript_hash(signed_id, public_key))
    ok = SecureChannel(b_to_a).seal(pb.Message(auth_result=pb.AuthResult(ok=True)).SerializeToString())
    with pytest.raises(HandshakeError, match="no key confirmation"):
        a.receive(ok[:-1])
    assert_dead(a)
    a = make_a(session_key=session)
    a.start()
    a.receive(signed_id)
    hostile = pb.AuthResult(ok=False, reason="no\r\nFAKE LOG LINE" + "x" * 500)
    with pytest.raises(HandshakeError) as exc:
        a.receive(SecureChannel(b_to_a).seal(pb.Message(auth_result=hostile).SerializeToString()))
    assert "\n" not in exc.value.reason and "\r" not in exc.value.reason and len(exc.value.reason) < 300


def test_a_gets_the_real_reply_only_once() -> None:
    r = run(make_a(), make_b())
    with pytest.raises(RuntimeError, match="finished"):
        r.a.receive(r.reply)
    with pytest.raises(RuntimeError, match="finished"):
        r.b.receive(r.sealed_auth)


# ---------------------------------------------------------------- garbage and truncation at each step


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_to_a_first(junk: bytes) -> None:
    a = make_a()
    a.start()
    with pytest.raises(HandshakeError):
        a.receive(junk)
    assert_dead(a)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_to_b_first(junk: bytes) -> None:
    b = make_b()
    b.start()
    with pytest.raises(HandshakeError):
        b.receive(junk)
    assert_dead(b)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_to_b_auth(junk: bytes) -> None:
    b = make_b_at_auth()
    with pytest.raises(HandshakeError):
        b.receive(junk)
    assert_dead(b)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_to_a_auth_result(junk: bytes) -> None:
    a, b = make_a(), make_b()
    to_auth_step(a, b)
    with pytest.raises(HandshakeError):
        a.receive(junk)
    assert_dead(a)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3), st.data())
def test_truncated_or_flipped_at_each_step(which: int, data: st.DataObject) -> None:
    """Any truncation or bit flip of any of the four messages stops the handshake before A is done.

    Some flips are invisible to the step that reads them (X25519 ignores the top bit of a
    public key; protobuf skips what it does not know), so the run goes on: the transcript
    binding must then catch it at the auth step.
    """

    def wire(n: int, msg: bytes) -> bytes:
        if n != which:
            return msg
        if data.draw(st.booleans()):
            return msg[: data.draw(st.integers(0, len(msg) - 1))]
        i = data.draw(st.integers(0, len(msg) - 1))
        return msg[:i] + bytes([msg[i] ^ (1 << data.draw(st.integers(0, 7)))]) + msg[i + 1 :]

    a, b = make_a(), make_b()
    a.start()
    with pytest.raises(HandshakeError):
        (m0,) = b.start()
        m1, m2 = a.receive(wire(0, m0))
        b.receive(wire(1, m1))
        (m3,) = b.receive(wire(2, m2))
        a.receive(wire(3, m3))
    assert not a.done
    assert b.done == (which == 3)


# ---------------------------------------------------------------- API misuse


def test_api_misuse() -> None:
    b = make_b()
    with pytest.raises(RuntimeError, match="start"):
        b.receive(b"x")
    b.start()
    with pytest.raises(RuntimeError, match="twice"):
        b.start()
    a = make_a()
    a.start()
    with pytest.raises(RuntimeError, match="twice"):
        a.start()
    with pytest.raises(ValueError, match="32 bytes"):
        make_a(peer_sign_pk=b"short")
    with pytest.raises(ValueError, match="bad target"):
        make_a(target="no-port")
    with pytest.raises(ValueError, match="own ID"):
        make_a(my_id="")
    with pytest.raises(ValueError, match="session key"):
        make_a(session_key=b"short")


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="admits nobody"):
        Policy()
    with pytest.raises(ValueError, match="empty password"):
        Policy(password="")
    with pytest.raises(ValueError, match="5 bytes"):
        Policy(pinned_keys={"1": b"short"})
    p = Policy.of(allowed_ids=["1", "2"], allowed_targets=["a:1"])
    assert p.allowed_ids == frozenset({"1", "2"}) and p.allowed_targets == frozenset({"a:1"})
    keys = {"1": A_PK}
    p = Policy(pinned_keys=keys)
    keys["2"] = B_PK
    assert "2" not in p.pinned_keys
