"""Naming a peer by its key: `ID=SHA256:...` specs and the `allowed_peers` file, sans-IO.

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
from pathlib import Path

ALLOWED_PEERS_FILE = "allowed_peers"
"""In the state dir: one peer spec per line (`ID` or `ID=SHA256:...`), `#` comments. Read at every
session, so an edit takes effect without a restart."""
MAX_ID_LEN = 64
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a peer ID may look like (agent/rendezvous_core.py valid_id asks for 6 characters at least)."""
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
MAX_ALLOWED_PEERS_BYTES = 1 << 20


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


def line_spec(line: str) -> str:
    """The peer spec a line of an allowed_peers file holds ("" for a blank or comment line)."""
    words = line.split("#", 1)[0].split()
    return words[0] if words else ""


def parse_allowed_peers(text: str, where: str) -> list[PeerSpec]:
    """Lines of an allowed_peers file; ValueError naming `where:line` for the first bad one."""
    out: list[PeerSpec] = []
    for number, raw in enumerate(text.splitlines(), 1):
        spec = line_spec(raw)
        if not spec:
            continue
        try:
            out.append(parse_peer_spec(spec))
        except ValueError as exc:
            raise ValueError(f"{where}:{number}: {exc}") from None
    return out


def read_allowed_peers(state_dir: Path) -> list[PeerSpec]:
    """The state dir's allowed_peers file ([] when there is none); ValueError if it is unusable."""
    path = state_dir / ALLOWED_PEERS_FILE
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ALLOWED_PEERS_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_ALLOWED_PEERS_BYTES:
        raise ValueError(f"{path} is larger than {MAX_ALLOWED_PEERS_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return parse_allowed_peers(text, str(path))


def merge(specs: list[PeerSpec]) -> dict[str, str | None]:
    """ID -> fingerprint (None for a bare ID). A fingerprint named anywhere wins over a bare entry;
    two different fingerprints for one ID are a mistake worth refusing."""
    out: dict[str, str | None] = {}
    for spec in specs:
        have = out.get(spec.peer_id)
        if have is not None and spec.fingerprint is not None and have != spec.fingerprint:
            raise ValueError(f"peer {spec.peer_id} is allowed with two different keys ({have}, {spec.fingerprint})")
        out[spec.peer_id] = spec.fingerprint or have
    return out
