"""Keys and signatures in RustDesk's formats (libsodium via PyNaCl), pure.

Signatures use the combined form (64-byte signature || message), which is what IdPk travels in.
Key files are `agent.common.keyfile`.
"""

from __future__ import annotations

import base64

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from agent.proto import message_pb2


def public_key_b64(key: SigningKey) -> str:
    """The text RustDesk clients configure as the server `key` (and send as licence_key)."""
    return base64.b64encode(bytes(key.verify_key)).decode()


def sign_id_pk(key: SigningKey, peer_id: str, pk: bytes) -> bytes:
    """Combined signature over IdPk{id, pk}: what hbbs puts in PunchHoleResponse.pk."""
    msg = message_pb2.IdPk(id=peer_id, pk=pk).SerializeToString()
    return bytes(key.sign(msg))


def open_signed_id_pk(verify_key: bytes, signed: bytes) -> tuple[str, bytes]:
    """Check a combined-signed IdPk and return (id, pk); raises ValueError if forged or garbled."""
    try:
        msg = VerifyKey(verify_key).verify(signed)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise ValueError(f"bad signature: {exc}") from None
    idpk = message_pb2.IdPk()
    idpk.ParseFromString(msg)
    return idpk.id, idpk.pk
