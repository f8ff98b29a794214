"""Signed rendezvous messages and relay tickets: who vouches for what, sans-IO.

Every trust rule of the rendezvous protocol rests on one mechanism: an ed25519
signature over a domain, a context and the exact bytes of a RendezvousMessage,
carried in that message's field 100 (`signature`). Protobuf writes fields in
number order, so the signature is the last field on the wire and the signed bytes
are simply everything before it: no canonical re-encoding, and a RustDesk peer that
does not know field 100 skips it.

| domain   | signer | signed message                       | context     | proves                                |
|----------|--------|--------------------------------------|-------------|---------------------------------------|
| REGISTER | agent  | RegisterPk with the server challenge | -           | it holds the key its ID is bound to   |
| SERVER   | server | RegisterPkResponse                   | agent nonce | the server's key, fresh               |
| PUSH     | server | PunchHole, FetchLocalAddr, RequestRelay | B's ID   | the push is the server's, for B       |
| REQUEST  | A      | PunchHoleRequest, RequestRelay       | -           | who asks (requester_id), and when     |
| TICKET   | server | a relay pairing ticket               | -           | the server arranged this relay pair   |

The domain strings keep one kind of signature from ever passing as another.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

REGISTER = b"punchthrough-register-v1\0"
SERVER = b"punchthrough-server-v1\0"
PUSH = b"punchthrough-push-v1\0"
REQUEST = b"punchthrough-request-v1\0"
TICKET = b"punchthrough-relay-ticket-v1\0"

SIGNATURE_BYTES = 64
KEY_BYTES = 32
SIGNATURE_FIELD = b"\xa2\x06\x40"
"""Tag of RendezvousMessage field 100 (wire type 2) and the length 64: what precedes a signature."""
SIGNED_SUFFIX = len(SIGNATURE_FIELD) + SIGNATURE_BYTES

TICKET_TTL = 120.0
"""Seconds a relay ticket is good for after it was issued (both halves join within moments)."""
TICKET_SKEW = 60.0
"""Seconds a ticket may look issued in the future: the relay's clock may run behind the server's."""
TICKET_BYTES = 8 + SIGNATURE_BYTES


class SignatureError(ValueError):
    """A signature that is missing, misplaced or does not verify; the message is one line."""


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _signed_bytes(domain: bytes, context: bytes, body: bytes) -> bytes:
    return domain + _lp(context) + body


def seal(key: SigningKey, domain: bytes, context: bytes, body: bytes) -> bytes:
    """`body` (a serialized RendezvousMessage without a signature) with its signature appended."""
    return body + SIGNATURE_FIELD + key.sign(_signed_bytes(domain, context, body)).signature


def split(data: bytes) -> tuple[bytes, bytes | None]:
    """(signed body, signature), or (data, None) when the message does not end in a signature."""
    if len(data) > SIGNED_SUFFIX and data[-SIGNED_SUFFIX:-SIGNATURE_BYTES] == SIGNATURE_FIELD:
        return data[:-SIGNED_SUFFIX], data[-SIGNATURE_BYTES:]
    return data, None


def verify(public_key: bytes, domain: bytes, context: bytes, body: bytes, signature: bytes | None) -> bool:
    """True when `signature` is `public_key`'s over (domain, context, body)."""
    if signature is None or len(signature) != SIGNATURE_BYTES or len(public_key) != KEY_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(_signed_bytes(domain, context, body), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def opened(public_key: bytes, domain: bytes, context: bytes, data: bytes) -> bytes:
    """The signed body of `data`; SignatureError when it carries no valid signature by `public_key`."""
    body, signature = split(data)
    if signature is None:
        raise SignatureError("the message is not signed")
    if not verify(public_key, domain, context, body, signature):
        raise SignatureError("the signature does not verify")
    return body


# --------------------------------------------------------------------------- relay tickets


def _ticket_bytes(uuid: str, relay: str, issued_ms: int) -> bytes:
    return TICKET + _lp(uuid.encode()) + _lp(relay.encode()) + struct.pack(">Q", issued_ms)


def make_ticket(key: SigningKey, uuid: str, relay: str, issued_ms: int) -> bytes:
    """The server's word that `uuid` may pair at `relay` (as the server named it), from `issued_ms`."""
    return struct.pack(">Q", issued_ms) + key.sign(_ticket_bytes(uuid, relay, issued_ms)).signature


@dataclass(frozen=True)
class Ticket:
    uuid: str
    relay: str
    issued: float
    """Unix seconds."""

    @property
    def expires(self) -> float:
        return self.issued + TICKET_TTL


def check_ticket(
    server_keys: list[bytes] | tuple[bytes, ...], ticket: bytes, uuid: str, relay: str, now: float
) -> Ticket:
    """The ticket if one of `server_keys` issued it for `uuid` at `relay` and it is current at `now`
    (Unix seconds); SignatureError saying why not otherwise."""
    if not ticket:
        raise SignatureError("no ticket from the rendezvous server")
    if len(ticket) != TICKET_BYTES:
        raise SignatureError(f"a ticket is {TICKET_BYTES} bytes, got {len(ticket)}")
    issued_ms = struct.unpack(">Q", ticket[:8])[0]
    signed = _ticket_bytes(uuid, relay, issued_ms)
    if not any(_verify_raw(key, signed, ticket[8:]) for key in server_keys):
        raise SignatureError("the ticket is not signed by a rendezvous server this relay trusts")
    issued = issued_ms / 1000.0
    if issued > now + TICKET_SKEW:
        raise SignatureError(f"the ticket is issued {issued - now:.0f} s in the future (clocks apart?)")
    if now > issued + TICKET_TTL:
        raise SignatureError(f"the ticket expired {now - issued - TICKET_TTL:.0f} s ago")
    return Ticket(uuid, relay, issued)


def _verify_raw(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(public_key) != KEY_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True
