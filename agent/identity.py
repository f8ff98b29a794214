"""This agent's identity: an ed25519 key, the ID it registers, and the uuid that owns the ID.

The ID is ten digits derived from the public key (so an ID names a key, and a
newcomer needs no configuration); `salt` moves to the next candidate if the
rendezvous server says the ID is bound to someone else. Everything is written
atomically with mode 0600, so a crash mid-write never leaves half an identity.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from agent.common.files import read_json_state, write_private
from agent.common.keyfile import KeyFileError, load_or_create_signing_key
from agent.wire.peer_ids import derive_id, fingerprint

KEY_FILE = "id_ed25519"
IDENTITY_FILE = "identity.json"
MAX_SALT = 2**32 - 1
"""derive_id hashes the salt as 4 bytes."""


@dataclass
class Identity:
    signing_key: SigningKey
    peer_id: str
    uuid: bytes
    salt: int

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


def load_or_create(state_dir: Path) -> Identity:
    """Read the identity from `state_dir`, creating key and ID on first run."""
    key = load_or_create_signing_key(state_dir / KEY_FILE)
    path = state_dir / IDENTITY_FILE

    def parse(raw: Any) -> tuple[int, bytes]:
        salt = int(raw["salt"])
        if not 0 <= salt <= MAX_SALT:
            raise ValueError(f"salt {salt} out of range")
        uuid = bytes.fromhex(raw["uuid"])
        if raw["id"] != derive_id(bytes(key.verify_key), salt) or len(uuid) != 16:
            raise KeyFileError(f"{path}: does not belong to the key in {state_dir / KEY_FILE}")
        return salt, uuid

    found = read_json_state(path, "identity", parse, KeyFileError, passthrough=(KeyFileError,))
    if found is None:
        found = 0, secrets.token_bytes(16)
        try:
            save(state_dir, Identity(key, derive_id(bytes(key.verify_key), 0), found[1], 0))
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot write identity ({exc.strerror or exc})") from None
    salt, uuid = found
    return Identity(key, derive_id(bytes(key.verify_key), salt), uuid, salt)


def save(state_dir: Path, ident: Identity) -> None:
    data = {"id": ident.peer_id, "salt": ident.salt, "uuid": ident.uuid.hex()}
    write_private(state_dir / IDENTITY_FILE, (json.dumps(data) + "\n").encode())


def next_id(state_dir: Path, ident: Identity) -> Identity:
    """The ID was taken by another uuid (UUID_MISMATCH): move to the next derived one."""
    new = Identity(ident.signing_key, derive_id(ident.public_key, ident.salt + 1), ident.uuid, ident.salt + 1)
    save(state_dir, new)
    return new


class IdentityCache:
    """This agent's identity as it is now: reloaded when the registrar moved to a new ID (another
    process rewrote identity.json), so every component signs and answers with the current one."""

    def __init__(self, state_dir: Path, current: Identity | None = None) -> None:
        self.state_dir = state_dir
        self._identity = current or load_or_create(state_dir)
        self._stamp = self._mtime()

    def _mtime(self) -> int:
        try:
            return (self.state_dir / IDENTITY_FILE).stat().st_mtime_ns
        except OSError:
            return 0

    def get(self) -> Identity:
        stamp = self._mtime()
        if stamp != self._stamp:
            self._stamp = stamp
            with contextlib.suppress(KeyFileError):  # a damaged file: keep the last good identity
                self._identity = load_or_create(self.state_dir)
        return self._identity
