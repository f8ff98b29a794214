"""Key files: an ed25519 secret key kept as libsodium's 64 bytes (seed || public key), base64 in a file
with mode 0600 (like hbbs's `id_ed25519`), and its public half beside it in `<name>.pub`."""

from __future__ import annotations

import base64
from pathlib import Path

from nacl.signing import SigningKey

from agent.common.files import write_private
from agent.wire.keys import public_key_b64


class KeyFileError(ValueError):
    """A key file that exists but cannot be used; never silently replaced."""


def load_or_create_signing_key(path: Path) -> SigningKey:
    """Read a base64 64-byte (or 32-byte seed) ed25519 key; create one atomically if missing."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        try:
            key = SigningKey.generate()
            write_private(path, base64.b64encode(bytes(key) + bytes(key.verify_key)) + b"\n")
            write_private(path.with_name(path.name + ".pub"), (public_key_b64(key) + "\n").encode())
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot create key ({exc.strerror or exc})") from None
        return key
    except OSError as exc:  # a directory, a state dir that is a file, no permission
        raise KeyFileError(f"{path}: cannot read key ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not base64 (binary data)") from None
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise KeyFileError(f"{path}: not base64") from None
    if len(raw) == 64:
        key = SigningKey(raw[:32])
        if bytes(key.verify_key) != raw[32:]:
            raise KeyFileError(f"{path}: public half does not match the seed")
        return key
    if len(raw) == 32:
        return SigningKey(raw)
    raise KeyFileError(f"{path}: expected a 64-byte ed25519 key, got {len(raw)} bytes")
