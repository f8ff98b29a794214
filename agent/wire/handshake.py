"""RustDesk's peer handshake plus mutual authentication, as two sans-IO state machines.

The machines consume and produce frame *payloads*; a shell frames them with
`agent.wire.frames` and owns sockets and timeouts. The flow (A = Initiator, B = Responder):

    B -> A  Message{signed_id}       B's ed25519 signature over IdPk{B's ID, B's ephemeral box key}
    A -> B  Message{public_key}      A's ephemeral box key + session key, crypto_box, zero nonce
    A -> B  seal(Message{peer_auth}) A's ID, long-term key, signature, password proof, target
    B -> A  seal(Message{auth_result})

The first two messages are byte-compatible with RustDesk (protocol notes 7.1), but
there is no plaintext fallback: every deviation raises HandshakeError and the
machine stays dead. PeerAuth/AuthResult are ours (field numbers >= 100). They
travel sealed, so A's first frame uses send counter 1 and so does B's answer.

One deliberate change to the channel: RustDesk seals both directions with the
session key itself, so A's and B's n-th frames share a nonce (see
agent/wire/secure_channel.py). Here each direction gets its own key, HMAC-SHA256 of
the session key over a label and the transcript hash. Same framing, same
counter nonces, no repeated (key, nonce) pair.

A shell, on either side (a chunk may carry the last handshake frame *and* the
first data frames, so the rest of that feed already belongs to the channel):

    send(m.start())                               # each payload goes out as encode_frame(p)
    for payload in decoder.feed(chunk):
        if m.done:
            deliver(m.channel.open(payload))
            continue
        try:
            send(m.receive(payload))
        except HandshakeError as exc:
            send(exc.reply); close(); record(exc.reason)
    # afterwards: encode_frame(m.channel.seal(data)) out, m.channel.open(payload) in

Why the auth step binds a transcript: a signature or password proof over
sha256(B's signed_id payload, A's public_key payload) is worthless in any other
session, because B's ephemeral key and A's session key are fresh each time. A
peer that A legitimately talks to can therefore not replay A's credentials to a
third agent. B's sealed AuthResult is also A's key confirmation: a recorded
signed_id replayed at A leads nowhere, since the replayer cannot open A's
session key, so A never reports success.

Why the password proof uses a slow KDF: the proof is only ever sent to a B
whose long-term key A has verified, but a B that is impersonated (stolen key) or
whose transcripts leak would otherwise hand out an HMAC that is cheap to
brute-force. Argon2id (libsodium's "interactive" cost, about 70 ms and 64 MiB,
cached per process) salted with B's ID makes each guess expensive and
per-responder.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from google.protobuf.message import DecodeError
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.pwhash import argon2id
from nacl.signing import SigningKey, VerifyKey

from agent.proto import message_pb2 as pb
from agent.wire.addr import AddressError, split_host_port
from agent.wire.peer_ids import ID_RE, fingerprint, spec_for
from agent.wire.secure_channel import ChannelError, SecureChannel

ZERO_NONCE = bytes(24)
"""RustDesk seals the session key with an all-zero nonce; safe because both box keys are fresh."""

KEY_BYTES = 32
SIGNATURE_BYTES = 64
SEALED_KEY_BYTES = 48
PROOF_BYTES = 32
MAX_HANDSHAKE_PAYLOAD = 1024
"""Real signed_id/public_key payloads are about 115 and 86 bytes."""
MAX_AUTH_PAYLOAD = 2048
"""A sealed PeerAuth/AuthResult; real ones are a few hundred bytes."""
MAX_ID_LEN = 64
MAX_TARGET_LEN = 262
MAX_REASON_LEN = 200

_SESSION_DOMAIN = b"punchthrough-session-v1\0"
_AUTH_DOMAIN = b"punchthrough-peer-auth-v1\0"
_PROOF_DOMAIN = b"punchthrough-password-proof-v1\0"
_CHANNEL_DOMAIN = b"punchthrough-channel-v1 "
_PASSWORD_SALT_DOMAIN = b"punchthrough-password:"


class HandshakeError(Exception):
    """The session cannot be established; `reason` is one line for people and logs.

    `reply` holds payloads the shell should still send before closing (B's sealed
    refusal, so A learns why); it is empty when there is nothing to say.
    """

    def __init__(self, reason: str, reply: list[bytes] | None = None, *, refused_by_peer: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply: list[bytes] = reply or []
        self.refused_by_peer = refused_by_peer
        """The peer said no (its policy, the same on every path), as opposed to a path that failed."""


def _clean(text: str | bytes, limit: int) -> str:
    """Peer-controlled text made safe for a one-line log: printable and bounded."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text[:limit]) + ("..." if len(text) > limit else "")


def _show(text: str | bytes, limit: int = 80) -> str:
    """A peer-supplied ID or address: as is when it looks like one, quoted otherwise."""
    clean = _clean(text, limit)
    return clean if clean and all(c.isalnum() or c in ".-_:[]" for c in clean) else repr(clean)


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def transcript_hash(signed_id_payload: bytes, public_key_payload: bytes) -> bytes:
    """What every credential in PeerAuth is bound to: both key-exchange payloads, as sent."""
    return hashlib.sha256(_SESSION_DOMAIN + _lp(signed_id_payload) + _lp(public_key_payload)).digest()


def direction_keys(session_key: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(A->B key, B->A key): one secretbox key per direction, so counter nonces never repeat under a key."""
    a_to_b = hmac.new(session_key, _CHANNEL_DOMAIN + b"A->B\0" + transcript, hashlib.sha256).digest()
    b_to_a = hmac.new(session_key, _CHANNEL_DOMAIN + b"B->A\0" + transcript, hashlib.sha256).digest()
    return a_to_b, b_to_a


def auth_signed_bytes(transcript: bytes, peer_id: str, target: str) -> bytes:
    """The bytes A's long-term key signs: the session, A's claimed ID and the target it asks for."""
    return _AUTH_DOMAIN + transcript + _lp(peer_id.encode()) + _lp(target.encode())


@lru_cache(maxsize=64)
def password_key(password: str, responder_id: str) -> bytes:
    """Argon2id(password, salt = sha256("punchthrough-password:" + B's ID)[:16]), cached."""
    salt = hashlib.sha256(_PASSWORD_SALT_DOMAIN + responder_id.encode()).digest()[: argon2id.SALTBYTES]
    return argon2id.kdf(
        KEY_BYTES,
        password.encode(),
        salt,
        opslimit=argon2id.OPSLIMIT_INTERACTIVE,
        memlimit=argon2id.MEMLIMIT_INTERACTIVE,
    )


def password_proof(key: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, _PROOF_DOMAIN + transcript, hashlib.sha256).digest()


def trusted_peer_key(
    peer_id: str,
    *,
    server_key: bytes | None = None,
    signed_id_pk: bytes | None = None,
    pinned: bytes | None = None,
    want_fingerprint: str | None = None,
) -> tuple[bytes, str]:
    """B's long-term ed25519 key and where it came from ("rendezvous-signed", "pinned").

    `signed_id_pk` is PunchHoleResponse.pk / RelayResponse.pk, checked with the
    rendezvous server's key; `pinned` is a key configured or remembered for the
    ID. With both, they must agree. With neither, there is nothing to trust and
    RustDesk would go plaintext; we refuse. `want_fingerprint` (from `ID=SHA256:...`)
    names the only key acceptable, whoever vouches for it.
    """
    key, source = _trusted_peer_key(peer_id, server_key, signed_id_pk, pinned)
    if want_fingerprint is not None and fingerprint(key) != want_fingerprint:
        raise HandshakeError(
            f"peer {peer_id} has key {fingerprint(key)} ({source}), not {want_fingerprint} as you named it"
        )
    return key, source


def _trusted_peer_key(
    peer_id: str, server_key: bytes | None, signed_id_pk: bytes | None, pinned: bytes | None
) -> tuple[bytes, str]:
    if pinned is not None and len(pinned) != KEY_BYTES:
        raise HandshakeError(f"pinned key for peer {peer_id} is {len(pinned)} bytes, expected {KEY_BYTES}")
    from_server: bytes | None = None
    if signed_id_pk:
        if server_key is None:
            raise HandshakeError(f"cannot check the rendezvous-signed key for peer {peer_id}: no server key known")
        try:
            verified = VerifyKey(server_key).verify(signed_id_pk)
        except (BadSignatureError, ValueError, TypeError):
            raise HandshakeError(
                f"rendezvous-signed key for peer {peer_id} does not verify with the server key (forged or wrong server)"
            ) from None
        idpk = pb.IdPk()
        try:
            idpk.ParseFromString(verified)
        except (DecodeError, RecursionError, ValueError):
            raise HandshakeError(f"rendezvous server signed a malformed IdPk for peer {peer_id}") from None
        if idpk.id != peer_id:
            raise HandshakeError(f"rendezvous-signed key is for peer {_show(idpk.id)}, not {peer_id}")
        if len(idpk.pk) != KEY_BYTES:
            raise HandshakeError(f"rendezvous-signed key for peer {peer_id} is {len(idpk.pk)} bytes, expected 32")
        from_server = idpk.pk
    if from_server is not None and pinned is not None:
        if not hmac.compare_digest(from_server, pinned):
            raise HandshakeError(f"rendezvous-signed key for peer {peer_id} does not match the pinned key")
        return pinned, "pinned"
    if pinned is not None:
        return pinned, "pinned"
    if from_server is not None:
        return from_server, "rendezvous-signed"
    raise HandshakeError(f"no key for peer {peer_id}: the rendezvous server gave none and none is pinned")


def _parse(payload: bytes, want: str, who: str, limit: int) -> Any:
    """The `want` member of a serialized Message, or HandshakeError saying what arrived instead."""
    if not payload:
        raise HandshakeError(f"{who} sent an empty message (RustDesk's plaintext fallback); encryption is mandatory")
    if len(payload) > limit:
        raise HandshakeError(f"{who} sent a {len(payload)}-byte handshake message (limit {limit})")
    msg = pb.Message()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, RecursionError, ValueError):
        raise HandshakeError(f"{who} sent a malformed message ({len(payload)} bytes)") from None
    kind = msg.WhichOneof("union")
    if kind is None:
        raise HandshakeError(f"{who} sent a message with no known member ({len(payload)} bytes)")
    if kind != want:
        raise HandshakeError(f"{who} sent {kind} where {want} was expected")
    return getattr(msg, kind)


class _State(enum.Enum):
    NEW = "new"
    KEY_EXCHANGE = "key exchange"
    AUTH = "authentication"
    DONE = "done"
    FAILED = "failed"


class _Machine:
    """Shared life cycle: one failure kills the machine; finished machines hand over a channel."""

    def __init__(self) -> None:
        self._state = _State.NEW
        self._failure = ""
        self._channel: SecureChannel | None = None

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def failure(self) -> str | None:
        """Why the handshake failed, or None."""
        return self._failure if self._state is _State.FAILED else None

    @property
    def channel(self) -> SecureChannel:
        """The session channel, counters already past the auth frames; only once `done`."""
        if self._state is not _State.DONE or self._channel is None:
            raise RuntimeError(f"handshake is not finished (state: {self._state.value})")
        return self._channel

    def receive(self, payload: bytes) -> list[bytes]:
        """Feed one frame payload from the peer; returns payloads to send, raises HandshakeError."""
        if self._state is _State.FAILED:
            raise HandshakeError(f"handshake already failed: {self._failure}")
        if self._state is _State.DONE:
            raise RuntimeError("handshake is finished; pass further payloads to .channel.open()")
        if self._state is _State.NEW:
            raise RuntimeError("call start() first")
        try:
            return self._step(bytes(payload))
        except HandshakeError as exc:
            self._die(exc.reason)
            raise
        except BaseException:
            self._die("internal error")
            raise

    def _die(self, reason: str) -> None:
        self._state = _State.FAILED
        self._failure = reason
        self._channel = None

    def _step(self, payload: bytes) -> list[bytes]:
        raise NotImplementedError


class Initiator(_Machine):
    """A, the connecting side: verifies B, sends the session key and its own credentials."""

    def __init__(
        self,
        my_id: str,
        my_signing_key: SigningKey,
        peer_id: str,
        peer_sign_pk: bytes,
        password: str | None = None,
        target: str = "",
        *,
        key_source: str = "expected",
        ephemeral_key: PrivateKey | None = None,
        session_key: bytes | None = None,
    ) -> None:
        super().__init__()
        if len(peer_sign_pk) != KEY_BYTES:
            raise ValueError(f"peer key must be {KEY_BYTES} bytes, got {len(peer_sign_pk)}")
        if not 0 < len(my_id.encode()) <= MAX_ID_LEN:
            raise ValueError(f"own ID must be 1..{MAX_ID_LEN} bytes")
        if target:
            try:
                split_host_port(target)
            except AddressError as exc:
                raise ValueError(f"bad target: {exc}") from None
        if session_key is not None and len(session_key) != KEY_BYTES:
            raise ValueError(f"session key must be {KEY_BYTES} bytes")
        self.my_id = my_id
        self.peer_id = peer_id
        self.target = target
        self._sign = my_signing_key
        self._peer_vk = VerifyKey(bytes(peer_sign_pk))
        self._key_source = key_source
        self._eph = ephemeral_key or PrivateKey.generate()
        self._session_key = session_key or secrets.token_bytes(KEY_BYTES)
        self._pw_key = password_key(password, peer_id) if password is not None else None

    def start(self) -> list[bytes]:
        """A says nothing first: B speaks first with its signed ephemeral key."""
        if self._state is not _State.NEW:
            raise RuntimeError("start() called twice")
        self._state = _State.KEY_EXCHANGE
        return []

    def _step(self, payload: bytes) -> list[bytes]:
        if self._state is _State.KEY_EXCHANGE:
            return self._on_signed_id(payload)
        return self._on_auth_result(payload)

    def _on_signed_id(self, payload: bytes) -> list[bytes]:
        who = f"peer {self.peer_id}"
        signed = _parse(payload, "signed_id", who, MAX_HANDSHAKE_PAYLOAD).id
        if len(signed) <= SIGNATURE_BYTES:
            raise HandshakeError(f"{who} sent a SignedId of {len(signed)} bytes, too short to be signed")
        try:
            inner = self._peer_vk.verify(signed)
        except (BadSignatureError, ValueError):
            raise HandshakeError(f"{who} presented a key that does not match the {self._key_source} key") from None
        idpk = pb.IdPk()
        try:
            idpk.ParseFromString(inner)
        except (DecodeError, RecursionError, ValueError):
            raise HandshakeError(f"{who} signed a malformed IdPk") from None
        if idpk.id != self.peer_id:
            raise HandshakeError(f"{who} signed its key exchange as peer {_show(idpk.id)}")
        if len(idpk.pk) != KEY_BYTES:
            raise HandshakeError(f"{who} sent an ephemeral key of {len(idpk.pk)} bytes, expected {KEY_BYTES}")
        if idpk.pk[31] & 0x80:
            raise HandshakeError(f"{who} sent a non-canonical ephemeral key (top bit set)")
        try:
            box = Box(self._eph, PublicKey(idpk.pk))
            sealed = box.encrypt(self._session_key, ZERO_NONCE).ciphertext
        except CryptoError:
            raise HandshakeError(f"{who} sent an unusable ephemeral key (low-order point)") from None
        pk_payload = pb.Message(
            public_key=pb.PublicKey(asymmetric_value=bytes(self._eph.public_key), symmetric_value=sealed)
        ).SerializeToString()
        transcript = transcript_hash(payload, pk_payload)
        auth = pb.PeerAuth(
            id=self.my_id,
            pk=bytes(self._sign.verify_key),
            signature=self._sign.sign(auth_signed_bytes(transcript, self.my_id, self.target)).signature,
            password_proof=password_proof(self._pw_key, transcript) if self._pw_key is not None else b"",
            target=self.target,
        )
        a_to_b, b_to_a = direction_keys(self._session_key, transcript)
        channel = SecureChannel(a_to_b, b_to_a)
        sealed_auth = channel.seal(pb.Message(peer_auth=auth).SerializeToString())
        self._channel = channel
        self._state = _State.AUTH
        return [pk_payload, sealed_auth]

    def _on_auth_result(self, payload: bytes) -> list[bytes]:
        who = f"peer {self.peer_id}"
        if len(payload) > MAX_AUTH_PAYLOAD:
            raise HandshakeError(f"{who} sent a {len(payload)}-byte auth answer (limit {MAX_AUTH_PAYLOAD})")
        assert self._channel is not None
        try:
            plain = self._channel.open(payload)
        except ChannelError:
            raise HandshakeError(
                f"{who} answered with a frame that failed authentication (no key confirmation)"
            ) from None
        result = _parse(plain, "auth_result", who, MAX_AUTH_PAYLOAD)
        if not result.ok:
            raise HandshakeError(
                f"{who} refused the session: {_clean(result.reason, MAX_REASON_LEN)}", refused_by_peer=True
            )
        self._state = _State.DONE
        return []


def _frozen_keys(keys: Mapping[str, bytes]) -> Mapping[str, bytes]:
    for peer_id, pk in keys.items():
        if len(pk) != KEY_BYTES:
            raise ValueError(f"pinned key for peer {peer_id} is {len(pk)} bytes, expected {KEY_BYTES}")
    return MappingProxyType(dict(keys))


class TrustedBy(enum.StrEnum):
    """How B came to trust the key a peer presented for its ID (shown in logs and `sessions`)."""

    PINNED = "pinned key"
    """The key this ID showed in an earlier verified session."""
    ALLOW_KEY = "allow-list key"
    """The allow entry names the key (`ID=SHA256:...`)."""
    SERVER_BINDING = "server-signed binding"
    """A bare allow entry, and the rendezvous server vouched (in the signed push that brought this
    transport) that this key is bound to this ID."""
    PASSWORD = "password"
    """Not listed: the password proof admitted it (the ID is then only a name it gave)."""


@dataclass(frozen=True)
class Binding:
    """The rendezvous server's word, from the signed push that brought a transport: the peer that
    asked for us is `peer_id`, and `public_key` is the key bound to that ID."""

    peer_id: str
    public_key: bytes


PasswordGate = Callable[[str], str | None]
"""Called with the claimed ID before a password proof is checked; a reason to refuse (back-off) or None."""


@dataclass(frozen=True, eq=False)
class Policy:
    """Who may connect to B and where they may go.

    A peer proves possession of its key (signature over the session transcript);
    the question is only whether something B trusts binds that key to the ID it
    claims. In order: an allow entry naming the key's fingerprint (`allowed_keys`);
    a key pinned by an earlier verified session (`pinned_keys`; a different key for
    a pinned ID is refused even with the password, as ssh does on a changed host key);
    a bare allowed ID (`allowed_ids`) whose key the rendezvous server bound to it
    (the Responder's `binding`); the password. Never "whatever key shows up first".
    An empty target means "no forward" and is allowed unless `allow_no_target` is
    False; any other target must be listed exactly.
    """

    allowed_ids: frozenset[str] = frozenset()
    pinned_keys: Mapping[str, bytes] = field(default_factory=dict)
    password: str | None = None
    allowed_targets: frozenset[str] = frozenset()
    allow_no_target: bool = True
    allowed_keys: Mapping[str, str] = field(default_factory=dict)
    """ID -> the fingerprint (SHA256:...) of the only key admitted for it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_ids", frozenset(self.allowed_ids))
        object.__setattr__(self, "allowed_targets", frozenset(self.allowed_targets))
        object.__setattr__(self, "pinned_keys", _frozen_keys(self.pinned_keys))
        object.__setattr__(self, "allowed_keys", MappingProxyType(dict(self.allowed_keys)))
        if self.password == "":
            raise ValueError("an empty password admits nobody; use None for no password")
        if not (self.allowed_ids or self.allowed_keys or self.pinned_keys or self.password is not None):
            raise ValueError("policy admits nobody: give allowed IDs, pinned keys or a password")

    @classmethod
    def of(
        cls,
        allowed_ids: Iterable[str] = (),
        pinned_keys: Mapping[str, bytes] | None = None,
        password: str | None = None,
        allowed_targets: Iterable[str] = (),
        allow_no_target: bool = True,
        allowed_keys: Mapping[str, str] | None = None,
    ) -> Policy:
        """Build from any iterables (lists from a config file)."""
        return cls(
            frozenset(allowed_ids),
            pinned_keys or {},
            password,
            frozenset(allowed_targets),
            allow_no_target,
            allowed_keys or {},
        )

    def would_admit(self, binding: Binding | None) -> bool:
        """Could a peer the server vouches for (`binding`) get in? Decides whether B acts on a push at
        all: an agent does nothing on the network for a peer it would not admit."""
        if self.password is not None:
            return True  # anyone may try the password (it is rate limited, agent/session/guess_limiter.py)
        if binding is None:
            return False
        peer = binding.peer_id
        if peer in self.allowed_keys:
            return fingerprint(binding.public_key) == self.allowed_keys[peer]
        if peer in self.pinned_keys:
            return hmac.compare_digest(self.pinned_keys[peer], binding.public_key)
        return peer in self.allowed_ids


def not_admitted_text(my_id: str, peer_id: str, peer_pk: bytes, reason: str, typo_ids: Iterable[str] = ()) -> str:
    """What a refused peer reads: why, the command that lets it in, and a likely typo in an allow entry.
    One wording for a refused push (agent/control/answers.py) and a refused stream on a link."""
    text = f"{reason}: on {my_id}, run `punchthrough allow {spec_for(peer_id, peer_pk)}`"
    if typos := ", ".join(typo_ids):
        text += f" (its key is allowed here as {typos}: a typo in that ID?)"
    return text


def stream_refusal(
    policy: Policy | None,
    my_id: str,
    peer_id: str,
    peer_pk: bytes,
    admitted_by: TrustedBy,
    password_then: str | None,
    target: str,
) -> str | None:
    """A new stream on a link this peer opened earlier: does the policy as it is *now* still admit it,
    and allow `target`? None if so, else the reason to tell the peer. The key was proved when the link
    came up; what may have changed since is the policy (an allow entry removed, a password changed)."""
    if policy is None:
        return not_admitted_text(my_id, peer_id, peer_pk, "this agent admits nobody yet")
    admitted = False
    want = policy.allowed_keys.get(peer_id)
    pinned = policy.pinned_keys.get(peer_id)
    if want is not None:
        admitted = fingerprint(peer_pk) == want
    elif pinned is not None:
        admitted = hmac.compare_digest(pinned, peer_pk)
    elif peer_id in policy.allowed_ids:
        admitted = admitted_by is not TrustedBy.PASSWORD
    if not admitted and admitted_by is TrustedBy.PASSWORD and want is None and pinned is None:
        admitted = policy.password is not None and hmac.compare_digest(
            policy.password.encode(), (password_then or "").encode()
        )
    if not admitted:
        fp = fingerprint(peer_pk)
        typos = [other for other, key in policy.allowed_keys.items() if key == fp and other != peer_id]
        return not_admitted_text(my_id, peer_id, peer_pk, f"{_show(peer_id)} is not on this agent's allow list", typos)
    if not target and not policy.allow_no_target:
        return "a forward target is required"
    if target and target not in policy.allowed_targets:
        return f"target {_show(target)} is not allowed: on {my_id}, run `punchthrough allow-target {_show(target)}`"
    return None


class Responder(_Machine):
    """B, the connected-to side: proves its identity, receives the session key, judges A.

    `binding` is what the rendezvous server said about the peer that asked for us (None on paths
    without a server: the direct port). `password_gate` may refuse a password attempt before it
    is checked (back-off after failures); `password_failed` tells the shell one more failed.
    """

    def __init__(
        self,
        my_id: str,
        my_signing_key: SigningKey,
        policy: Policy,
        *,
        binding: Binding | None = None,
        password_gate: PasswordGate | None = None,
        ephemeral_key: PrivateKey | None = None,
    ) -> None:
        super().__init__()
        self.my_id = my_id
        self.policy = policy
        self.binding = binding
        self.password_gate = password_gate
        self._sign = my_signing_key
        self._eph = ephemeral_key or PrivateKey.generate()
        self._pw_key = password_key(policy.password, my_id) if policy.password is not None else None
        self._signed_id_payload = b""
        self._transcript = b""
        self.peer_id: str | None = None
        self.peer_pk: bytes | None = None
        self.target: str | None = None
        self.admitted_by: TrustedBy | None = None
        self.id_verified = False
        """Once done: something B trusts binds peer_pk to peer_id (always, except for a password
        admission on a path where no server vouched for the peer)."""
        self.password_failed = False
        self.claimed_id: str | None = None
        self.claimed_pk: bytes | None = None
        """The ID and key the peer presented, once its signature verified (also when refused)."""

    def start(self) -> list[bytes]:
        """B's first payload: Message{signed_id} over IdPk{my ID, my ephemeral box key}."""
        if self._state is not _State.NEW:
            raise RuntimeError("start() called twice")
        idpk = pb.IdPk(id=self.my_id, pk=bytes(self._eph.public_key)).SerializeToString()
        payload = pb.Message(signed_id=pb.SignedId(id=bytes(self._sign.sign(idpk)))).SerializeToString()
        self._signed_id_payload = payload
        self._state = _State.KEY_EXCHANGE
        return [payload]

    def _step(self, payload: bytes) -> list[bytes]:
        if self._state is _State.KEY_EXCHANGE:
            return self._on_public_key(payload)
        return self._on_peer_auth(payload)

    def _on_public_key(self, payload: bytes) -> list[bytes]:
        who = "connecting peer"
        pk = _parse(payload, "public_key", who, MAX_HANDSHAKE_PAYLOAD)
        if not pk.asymmetric_value:
            raise HandshakeError(f"{who} sent an empty PublicKey (it could not verify us); encryption is mandatory")
        if len(pk.asymmetric_value) != KEY_BYTES:
            raise HandshakeError(f"{who} sent an ephemeral key of {len(pk.asymmetric_value)} bytes, expected 32")
        if pk.asymmetric_value[31] & 0x80:
            # X25519 ignores this bit: accepting it would let a bit flip pass the key exchange unnoticed
            raise HandshakeError(f"{who} sent a non-canonical ephemeral key (top bit set)")
        if len(pk.symmetric_value) != SEALED_KEY_BYTES:
            raise HandshakeError(
                f"{who} sent a sealed session key of {len(pk.symmetric_value)} bytes, expected {SEALED_KEY_BYTES}"
            )
        try:
            key = Box(self._eph, PublicKey(pk.asymmetric_value)).decrypt(pk.symmetric_value, ZERO_NONCE)
        except CryptoError:
            raise HandshakeError(f"{who}'s session key does not open (not sealed for this session)") from None
        self._transcript = transcript_hash(self._signed_id_payload, payload)
        a_to_b, b_to_a = direction_keys(key, self._transcript)
        self._channel = SecureChannel(b_to_a, a_to_b)
        self._state = _State.AUTH
        return []

    def _refuse(self, local: str, public: str) -> HandshakeError:
        """Tell A `public` (no secrets, no allow-list details) and log `local`."""
        assert self._channel is not None
        reply = pb.Message(auth_result=pb.AuthResult(ok=False, reason=public)).SerializeToString()
        return HandshakeError(local, reply=[self._channel.seal(reply)])

    def _on_peer_auth(self, payload: bytes) -> list[bytes]:
        if len(payload) > MAX_AUTH_PAYLOAD:
            raise HandshakeError(f"connecting peer sent a {len(payload)}-byte auth frame (limit {MAX_AUTH_PAYLOAD})")
        assert self._channel is not None
        try:
            plain = self._channel.open(payload)
        except ChannelError:
            raise HandshakeError("connecting peer's auth frame failed authentication (wrong session key)") from None
        try:
            auth = _parse(plain, "peer_auth", "connecting peer", MAX_AUTH_PAYLOAD)
        except HandshakeError as exc:
            raise self._refuse(exc.reason, "malformed auth message") from None
        shown = _show(auth.id)
        problem = (
            (not 0 < len(auth.id.encode()) <= MAX_ID_LEN and f"ID of {len(auth.id.encode())} bytes")
            or (len(auth.pk) != KEY_BYTES and f"key of {len(auth.pk)} bytes")
            or (len(auth.signature) != SIGNATURE_BYTES and f"signature of {len(auth.signature)} bytes")
            or (len(auth.password_proof) not in (0, PROOF_BYTES) and f"proof of {len(auth.password_proof)} bytes")
            or (len(auth.target.encode()) > MAX_TARGET_LEN and f"target of {len(auth.target.encode())} bytes")
        )
        if problem:
            raise self._refuse(
                f"connecting peer {shown} sent a malformed auth message: {problem}", "malformed auth message"
            )
        try:
            VerifyKey(auth.pk).verify(auth_signed_bytes(self._transcript, auth.id, auth.target), auth.signature)
        except (BadSignatureError, ValueError):
            raise self._refuse(
                f"peer {shown}: authentication signature does not verify for this session (forged or replayed)",
                "authentication signature does not verify for this session",
            ) from None
        self.claimed_id, self.claimed_pk = auth.id, bytes(auth.pk)
        admitted_by = self._admit(auth, shown)
        target = auth.target
        if not target and not self.policy.allow_no_target:
            raise self._refuse(
                f"peer {shown} asked for no target; a target is required", "a forward target is required"
            )
        if target and target not in self.policy.allowed_targets:
            raise self._refuse(
                f"peer {shown} asked for target {_show(target)}, which is not allowed",
                f"target {_show(target)} is not allowed: on {self.my_id}, run "
                f"`punchthrough allow-target {_show(target)}`",
            )
        assert self._channel is not None
        reply = self._channel.seal(pb.Message(auth_result=pb.AuthResult(ok=True)).SerializeToString())
        self.peer_id, self.peer_pk, self.target, self.admitted_by = auth.id, bytes(auth.pk), target, admitted_by
        self.id_verified = admitted_by is not TrustedBy.PASSWORD or (
            self.binding is not None and hmac.compare_digest(self.binding.public_key, self.peer_pk)
        )
        self._state = _State.DONE
        return [reply]

    def _admit(self, auth: Any, shown: str) -> TrustedBy:
        """Which rule binds this authenticated key to the claimed ID; refuse otherwise."""
        pol = self.policy
        pk = bytes(auth.pk)
        spec = f"{auth.id}={fingerprint(pk)}" if ID_RE.fullmatch(auth.id) else shown
        binding = self.binding
        if binding is not None and binding.peer_id != auth.id:
            raise self._refuse(
                f"peer claims to be {shown} but the rendezvous server says the requester is {_show(binding.peer_id)}",
                f"you claim to be {shown} but the rendezvous server says you are {_show(binding.peer_id)}",
            )
        bound = binding is not None and hmac.compare_digest(binding.public_key, pk)
        want = pol.allowed_keys.get(auth.id)
        if want is not None:
            if fingerprint(pk) == want:
                return TrustedBy.ALLOW_KEY
            raise self._refuse(
                f"peer {shown} presented key {fingerprint(pk)}, but its allow entry names {want}",
                f"peer {shown}: your key {fingerprint(pk)} is not the one on this agent's allow list",
            )
        pinned = pol.pinned_keys.get(auth.id)
        if pinned is not None:
            if hmac.compare_digest(pinned, pk):
                return TrustedBy.PINNED
            raise self._refuse(
                f"peer {shown} presented key {fingerprint(pk)}, not its pinned key {fingerprint(pinned)}",
                f"peer {shown}: your key {fingerprint(pk)} is not the key this agent pinned for {shown}",
            )
        if auth.id in pol.allowed_ids:
            if bound:
                return TrustedBy.SERVER_BINDING
            if binding is not None:
                raise self._refuse(
                    f"peer {shown} presented key {fingerprint(pk)}, not the key the rendezvous server bound to it",
                    f"peer {shown}: your key is not the one the rendezvous server has for {shown}",
                )
            if self._pw_key is None:
                raise self._refuse(
                    f"peer {shown} is allowed by ID only and nothing vouched for its key {fingerprint(pk)} "
                    f"on this path (`punchthrough allow {spec}` admits that key here)",
                    f"peer {shown}: this agent allows your ID but cannot check your key on this path; "
                    f"on {self.my_id}, run `punchthrough allow {spec}`",
                )
        if self._pw_key is None:
            raise self._refuse(
                f"peer {shown} is not allowed (not listed, no password set; `punchthrough allow {spec}` lets it in)",
                f"{shown} is not on this agent's allow list: on {self.my_id}, run `punchthrough allow {spec}`",
            )
        if not auth.password_proof:
            raise self._refuse(f"peer {shown} is not listed and gave no password", "password required")
        if self.password_gate is not None and (blocked := self.password_gate(auth.id)):
            raise self._refuse(f"peer {shown}: password attempt refused: {blocked}", blocked)
        if not hmac.compare_digest(password_proof(self._pw_key, self._transcript), auth.password_proof):
            self.password_failed = True
            raise self._refuse(f"peer {shown} gave a wrong password", "wrong password")
        return TrustedBy.PASSWORD


@dataclass(frozen=True)
class Exchange:
    """The four messages of one handshake, in order; `refused` when B turned A away (then `reply` is
    B's sealed refusal and A has not read it)."""

    signed_id: bytes
    public_key: bytes
    auth: bytes
    reply: bytes
    refused: HandshakeError | None = None

    def keys(self, session_key: bytes) -> tuple[bytes, bytes]:
        """(A->B, B->A) channel keys, given the session key A chose."""
        return direction_keys(session_key, transcript_hash(self.signed_id, self.public_key))


def exchange(a: Initiator, b: Responder) -> Exchange:
    """Both machines of one handshake in one process, no I/O: what benchmarks, fuzz harnesses and
    tests use to get a real run without copying its five steps."""
    a.start()
    (signed_id,) = b.start()
    public_key, auth = a.receive(signed_id)
    b.receive(public_key)
    try:
        (reply,) = b.receive(auth)
    except HandshakeError as exc:
        return Exchange(signed_id, public_key, auth, exc.reply[0], exc)
    a.receive(reply)
    return Exchange(signed_id, public_key, auth, reply)
