"""Both handshake roles fed arbitrary peer messages, from raw bytes down to well-sealed hostile plaintext.

The keys are the vectors' (tests/vectors/handshake_vectors.json), so every run of the real
handshake is byte-for-byte the same and the seeds are its real messages m0..m3:
m0 B->A signed_id, m1 A->B public_key, m2 A->B sealed PeerAuth, m3 B->A sealed AuthResult.

Input: [mode | variant << 4][len u16][p1][p2...]. variant picks B's policy (listed ID, pinned
key with a required target, password only, pinned to another key plus a password). Modes:
 0  A gets p1 as m0 and p2 as m3        A done  => (p1, p2) == (m0, m3)
 1  B gets p1 as m1 and p2 as m2        B done  => (p1, p2) == (m1, m2)
 2  A gets B-signed IdPk p1, then p2    A done  => (p1, p2) == (the real IdPk, m3)
 3  A gets real m0, then p1 sealed with the B->A key (a keyed but hostile B)
                                         A done  => p1 is an AuthResult with ok set
 4  B gets real m1, then p1 sealed with the A->B key (a keyed but hostile A)
                                         B done  => it admitted A's real ID, key and target;
                                         a refusal's reply is something A can open and reject
 5  trusted_peer_key on p1 (and on p2 signed by the rendezvous key): a key comes back only
    when it is B's
 6  the relay-refusal sniffer of the session shell on p1
 7  B gets real m1, then p1 sealed with the B->A key (a reflected frame): B never finishes
 8  B gets Message{public_key{asymmetric_value, symmetric_value}} built from p1 = [n][n bytes][rest],
    then p2 as m2                        B done  => both fields and p2 are the real ones
 9  A gets a B-signed IdPk{id, pk} built from p1 = [n][id: n bytes][pk: rest], then p2 as m3
                                         A done  => id, pk and p2 are the real ones
10  B gets real m1, then a PeerAuth that A's key seals, built from p1 = [flags][n][id][m][target]
    [proof...]; flags: 1 sign it properly (else p2[:64] is the signature), 2 sign with B's key
    instead of A's, 4 the real password proof, 8 p2[:32] as the key
                                         B done  => the signature is genuine, the key and ID
                                         satisfy the rule it names, the target is allowed
11-15 as 3-7
Only HandshakeError (SessionError for mode 6) may escape.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fuzz._common import Reader, entry, instrumented, load_vectors, record

with instrumented():
    from nacl.public import PrivateKey
    from nacl.signing import SigningKey

    from agent.proto import message_pb2 as pb
    from agent.proto import rendezvous_pb2 as rdv
    from agent.session.stream import SessionError, _raise_if_relay_refusal
    from agent.wire.handshake import (
        Binding,
        HandshakeError,
        Initiator,
        Policy,
        Responder,
        TrustedBy,
        auth_signed_bytes,
        exchange,
        password_key,
        password_proof,
        transcript_hash,
        trusted_peer_key,
    )
    from agent.wire.messages import build
    from agent.wire.secure_channel import SecureChannel

V = load_vectors("handshake_vectors.json")


def _seed(tag: str) -> bytes:
    return hashlib.sha256(b"rustdesk-vector-" + tag.encode()).digest()


HBBS = SigningKey(_seed(V["hbbs_sign_seed_tag"]))
B_SIGN = SigningKey(_seed(V["peer_b_sign_seed_tag"]))
B_EPH = PrivateKey(_seed(V["b_ephemeral_box_secret_seed_tag"]))
A_EPH = PrivateKey(_seed(V["a_ephemeral_box_secret_seed_tag"]))
SESSION = _seed(V["session_key_tag"])
A_SIGN = SigningKey(hashlib.sha256(b"test-peer-A-ed25519").digest())
B_ID, A_ID = "123456789", "987654321"
A_PK, B_PK = bytes(A_SIGN.verify_key), bytes(B_SIGN.verify_key)
TARGET = "127.0.0.1:22"
PASSWORD = "correct horse battery staple"
TARGETS = frozenset({TARGET})
POLICIES = (
    Policy(allowed_ids=frozenset({A_ID}), allowed_targets=TARGETS),  # with the server's binding of A_ID -> A_PK
    Policy(pinned_keys={A_ID: A_PK}, allowed_targets=TARGETS, allow_no_target=False),
    Policy(password=PASSWORD, allowed_targets=TARGETS),
    Policy(pinned_keys={A_ID: B_PK}, password=PASSWORD, allowed_targets=TARGETS),
)


def make_a(variant: int) -> Initiator:
    return Initiator(
        A_ID,
        A_SIGN,
        B_ID,
        B_PK,
        password=PASSWORD if variant >= 2 else None,
        target=TARGET,
        ephemeral_key=A_EPH,
        session_key=SESSION,
    )


BINDINGS = (Binding(A_ID, A_PK), None, None, None)


def make_b(variant: int) -> Responder:
    return Responder(B_ID, B_SIGN, POLICIES[variant], ephemeral_key=B_EPH, binding=BINDINGS[variant])


class Ref:
    """One real run for a policy: its messages, the direction keys and the sealed plaintexts."""

    def __init__(self, variant: int) -> None:
        run = exchange(make_a(variant), make_b(variant))  # variant 3: B refuses, and says so sealed
        self.m0, self.m1, self.m2, self.m3 = run.signed_id, run.public_key, run.auth, run.reply
        self.inner = pb.Message.FromString(self.m0).signed_id.id[64:]
        self.a_to_b, self.b_to_a = run.keys(SESSION)
        self.transcript = transcript_hash(self.m0, self.m1)
        self.auth_plain = SecureChannel(bytes(32), self.a_to_b).open(self.m2)
        self.result_plain = SecureChannel(bytes(32), self.b_to_a).open(self.m3)


REFS = [Ref(v) for v in range(len(POLICIES))]
assert REFS[0].m0.hex() == V["message_signed_id_hex"] and REFS[0].m1.hex() == V["message_public_key_hex"]


def a_at_auth(variant: int) -> Initiator:
    a = make_a(variant)
    a.start()
    assert a.receive(REFS[variant].m0) == [REFS[variant].m1, REFS[variant].m2]
    return a


def b_at_auth(variant: int) -> Responder:
    b = make_b(variant)
    assert b.start() == [REFS[variant].m0]
    assert b.receive(REFS[variant].m1) == []
    return b


def steps(machine: Initiator | Responder, *payloads: bytes) -> bool:
    """Feed payloads until one fails; True when the machine finished."""
    try:
        for p in payloads:
            machine.receive(p)
            if machine.done:
                return True
    except HandshakeError as exc:
        assert exc.reason and machine.failure == exc.reason and not machine.done
    return False


def parses_ok(plain: bytes) -> bool:
    msg = pb.Message()
    try:
        msg.ParseFromString(plain)
    except Exception:
        return False
    return msg.WhichOneof("union") == "auth_result" and msg.auth_result.ok


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    head = r.byte()
    mode, variant = head & 15, (head >> 4) & 3
    if mode > 10:
        mode -= 8
    p1 = r.take(r.u16())
    p2 = r.rest()
    ref = REFS[variant]
    if mode == 0:
        a = make_a(variant)
        a.start()
        if steps(a, p1, p2):
            assert (p1, p2) == (ref.m0, ref.m3), "A finished a handshake with forged messages"
    elif mode == 1:
        b = make_b(variant)
        b.start()
        if steps(b, p1, p2):
            assert (p1, p2) == (ref.m1, ref.m2), "B finished a handshake with forged messages"
    elif mode == 2:
        a = make_a(variant)
        a.start()
        signed = pb.Message(signed_id=pb.SignedId(id=B_SIGN.sign(p1))).SerializeToString()
        if steps(a, signed, p2):
            assert (p1, p2) == (ref.inner, ref.m3), "A finished with a key exchange it did not verify"
    elif mode == 3:
        a = a_at_auth(variant)
        if steps(a, SecureChannel(ref.b_to_a, bytes(32)).seal(p1)):
            assert parses_ok(p1), "A finished on a sealed answer that is not AuthResult{ok}"
    elif mode in (4, 7):
        b = b_at_auth(variant)
        key = ref.a_to_b if mode == 4 else ref.b_to_a
        try:
            replies = b.receive(SecureChannel(key, bytes(32)).seal(p1))
        except HandshakeError as exc:
            assert not b.done
            for reply in exc.reply:
                assert not steps(a_at_auth(variant), reply), "B's refusal made A finish"
            return
        assert mode == 4 and variant != 3, "B admitted a peer its policy refuses"
        assert b.done and (b.peer_id, b.peer_pk, b.target) == (A_ID, A_PK, TARGET), "B admitted a forged identity"
        a = a_at_auth(variant)
        assert steps(a, *replies), "B finished but A cannot"
        assert b.channel.open(a.channel.seal(b"ping")) == b"ping"
        assert a.channel.open(b.channel.seal(b"pong")) == b"pong"
    elif mode == 8:
        n = p1[0] if p1 else 0
        asym, sym = p1[1 : 1 + n], p1[1 + n :]
        b = make_b(variant)
        b.start()
        msg = pb.Message(public_key=pb.PublicKey(asymmetric_value=asym, symmetric_value=sym)).SerializeToString()
        if steps(b, msg, p2):
            assert (msg, p2) == (ref.m1, ref.m2), "B finished with a forged key exchange"
    elif mode == 9:
        n = p1[0] if p1 else 0
        peer_id, pk = p1[1 : 1 + n].decode("utf-8", "replace"), p1[1 + n :]
        a = make_a(variant)
        a.start()
        inner = pb.IdPk(id=peer_id, pk=pk).SerializeToString()
        signed = pb.Message(signed_id=pb.SignedId(id=B_SIGN.sign(inner))).SerializeToString()
        if steps(a, signed, p2):
            assert (inner, p2) == (ref.inner, ref.m3), "A finished with a key exchange it did not verify"
    elif mode == 10:
        peer_auth(variant, p1, p2)
    elif mode == 5:
        pinned: Any = (None, B_PK, A_PK, p2[:31])[variant]
        for signed, server in ((p1, bytes(HBBS.verify_key)), (HBBS.sign(p2), bytes(HBBS.verify_key)), (p1, None)):
            try:
                key, source = trusted_peer_key(B_ID, server_key=server, signed_id_pk=signed, pinned=pinned)
            except HandshakeError as exc:
                assert exc.reason
                continue
            assert len(key) == 32 and source in ("pinned", "rendezvous-signed")
            if source == "rendezvous-signed":
                assert key == B_PK or signed != p1, "a key the rendezvous server never signed was trusted"
    elif mode == 6:
        try:
            _raise_if_relay_refusal(p1)
        except SessionError as exc:
            assert str(exc).startswith("relay refused: ") and len(str(exc)) <= 215


def peer_auth(variant: int, p1: bytes, p2: bytes) -> None:
    """Mode 10: B judges a well-sealed PeerAuth whose every field the fuzzer picks."""
    ref, policy = REFS[variant], POLICIES[variant]
    r = Reader(p1)
    flags = r.byte()
    peer_id = r.take(r.byte()).decode("utf-8", "replace")
    target = r.take(r.byte()).decode("utf-8", "replace")
    proof = r.rest()
    signer = B_SIGN if flags & 2 else A_SIGN
    pk = p2[:32] if flags & 8 else bytes(signer.verify_key)
    signed_msg = auth_signed_bytes(ref.transcript, peer_id, target)
    signature = signer.sign(signed_msg).signature if flags & 1 else p2[:64]
    if flags & 4:
        proof = password_proof(password_key(PASSWORD, B_ID), ref.transcript)
    auth = pb.PeerAuth(id=peer_id, pk=pk, signature=signature, password_proof=proof, target=target)
    b = b_at_auth(variant)
    try:
        replies = b.receive(SecureChannel(ref.a_to_b, bytes(32)).seal(pb.Message(peer_auth=auth).SerializeToString()))
    except HandshakeError as exc:
        assert not b.done
        for reply in exc.reply:
            assert not steps(a_at_auth(variant), reply), "B's refusal made A finish"
        return
    assert b.done and len(replies) == 1
    assert pk == bytes(signer.verify_key) and signature == signer.sign(signed_msg).signature, "forged signature"
    assert (b.peer_id, b.peer_pk, b.target) == (peer_id, pk, target)
    assert target in policy.allowed_targets or (not target and policy.allow_no_target), f"target {target!r}"
    pinned = policy.pinned_keys.get(peer_id)
    binding = BINDINGS[variant]
    if b.admitted_by is TrustedBy.PINNED:
        assert pinned == pk
    elif b.admitted_by is TrustedBy.SERVER_BINDING:
        assert pinned is None and peer_id in policy.allowed_ids, "a bare ID admitted without the server's binding"
        assert binding is not None and (binding.peer_id, binding.public_key) == (peer_id, pk)
    else:
        assert b.admitted_by is TrustedBy.PASSWORD and pinned is None and peer_id not in policy.allowed_ids
        assert policy.password is not None and proof == password_proof(password_key(PASSWORD, B_ID), ref.transcript)


def seeds() -> list[bytes]:
    out = []
    for v, ref in enumerate(REFS):
        rr = build(relay_response=rdv.RelayResponse(uuid="u", refuse_reason="relay key mismatch"))
        pairs = [
            (ref.m0, ref.m3),
            (ref.m1, ref.m2),
            (ref.inner, ref.m3),
            (ref.result_plain, b""),
            (ref.auth_plain, b""),
            (bytes.fromhex(V["hbbs_signed_idpk_for_b_hex"]), bytes.fromhex(V["idpk_for_b_hex"])),
            (rr, b""),
            (ref.auth_plain, b""),
        ]
        public_key = pb.Message.FromString(ref.m1).public_key
        idpk = pb.IdPk.FromString(ref.inner)
        pairs.append((bytes((32,)) + public_key.asymmetric_value + public_key.symmetric_value, ref.m2))
        out.append(record(bytes((8 | v << 4,)), bytes((32,)) + public_key.asymmetric_value + bytes(48)))
        out.append(record(bytes((1 | v << 4,)), ref.m1) + bytes(2100))
        pairs.append((bytes((len(idpk.id),)) + idpk.id.encode() + idpk.pk, ref.m3))
        for flags in (1, 3, 5, 1 | 8, 0):
            for who, target in ((A_ID, TARGET), (A_ID, ""), ("555", TARGET), (A_ID, "127.0.0.1:23")):
                body = bytes((flags, len(who))) + who.encode() + bytes((len(target),)) + target.encode() + bytes(3)
                out.append(record(bytes((10 | v << 4,)), body) + A_PK + bytes(32))
        out += [record(bytes((mode | v << 4,)), p1) + p2 for mode, (p1, p2) in enumerate(pairs)]
    return out


main = entry("handshake", TestOneInput, seeds)

if __name__ == "__main__":
    main()
