"""Naming a peer by its key: IDs derived from keys, `ID=SHA256:...` specs and fingerprints, sans-IO.

An ID alone is a claim: it is only as good as whatever binds it to a key (the
rendezvous server's signed binding, or a key pinned by an earlier verified session).
An ID with its key's fingerprint (`punchthrough id` prints exactly that string) names
the key itself, so a first contact needs no trust in any server, as a line of ssh's
`authorized_keys` does.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

MAX_ID_LEN = 64
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a peer ID may look like (agent/servers/rendezvous_core.py valid_id asks for 6 characters at least)."""
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def fingerprint(public_key: bytes) -> str:
    """Short, comparable form of a key for people: SHA256:<base64 of the hash>, as ssh prints."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public_key).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class PeerSpec:
    """A peer as a user names it: an ID, and optionally the fingerprint of the key it must hold."""

    peer_id: str
    fingerprint: str | None = None

    def __str__(self) -> str:
        return f"{self.peer_id}={self.fingerprint}" if self.fingerprint else self.peer_id

    def matches(self, public_key: bytes) -> bool:
        """True if no fingerprint is named, or the key has it."""
        return self.fingerprint is None or fingerprint(public_key) == self.fingerprint


def parse_peer_spec(text: str) -> PeerSpec:
    """`ID` or `ID=SHA256:<43 base64 characters>`; ValueError with one line otherwise."""
    shown = text if len(text) <= 100 else text[:100] + "..."
    peer_id, sep, fp = text.strip().partition("=")
    if not ID_RE.fullmatch(peer_id):
        raise ValueError(
            f"not a peer ID: {shown!r} (a peer's ID is what `punchthrough id` prints on it: letters, digits, "
            f"'-' and '_', at most {MAX_ID_LEN})"
        )
    if not sep:
        return PeerSpec(peer_id)
    if not _FINGERPRINT.fullmatch(fp):
        raise ValueError(f"not a key fingerprint after '=': {shown!r} (want SHA256: and 43 base64 characters)")
    return PeerSpec(peer_id, fp)


def spec_for(peer_id: str, public_key: bytes) -> str:
    """The string to paste on the other side: `ID=SHA256:...`."""
    return str(PeerSpec(peer_id, fingerprint(public_key)))


def derive_id(public_key: bytes, salt: int = 0) -> str:
    """Ten digits, first one non-zero (RustDesk-style numeric IDs are easy to read out)."""
    digest = hashlib.sha256(b"punchthrough-id:" + salt.to_bytes(4, "big") + public_key).digest()
    return str(1_000_000_000 + int.from_bytes(digest[:8], "big") % 9_000_000_000)
