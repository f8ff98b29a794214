"""Pinned peer keys (trust on first use, like ssh's known_hosts).

Once a peer ID has been seen with a key, a different key for that ID is refused
with a clear error until the user removes the pin. Written atomically, so a
crash mid-write keeps the previous pins.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from agent.files import write_private
from agent.identity import fingerprint

PINS_FILE = "known_peers.json"
KEY_LEN = 32


class PinMismatch(Exception):
    """A peer presented a key that differs from the one pinned for its ID."""


def _key(value: object) -> bytes:
    """A pin is exactly one ed25519 public key: anything else is damage, never a key to trust."""
    if not isinstance(value, str):
        raise TypeError(f"a pin must be a base64 string, got {type(value).__name__}")
    key = base64.b64decode(value, validate=True)
    if len(key) != KEY_LEN:
        raise ValueError(f"a pin must be a {KEY_LEN}-byte key, got {len(key)} bytes")
    return key


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:120] + "..."


class PinStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PINS_FILE
        self._pins: dict[str, bytes] = {}
        try:
            raw = json.loads(self.path.read_text())
            self._pins = {str(k): _key(v) for k, v in raw.items()}
        except FileNotFoundError:
            pass
        except OSError as exc:  # a directory, no permission
            raise ValueError(f"{self.path}: cannot read pins ({exc.strerror or exc})") from None
        except RecursionError:
            raise ValueError(f"{self.path}: unreadable pins (nested too deeply); fix or remove it") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{self.path}: unreadable pins ({_short(exc)}); fix or remove it") from None

    def get(self, peer_id: str) -> bytes | None:
        return self._pins.get(peer_id)

    def check_and_pin(self, peer_id: str, key: bytes) -> bool:
        """True if newly pinned; raises PinMismatch if `peer_id` is pinned to another key."""
        if len(key) != KEY_LEN:  # would make the file unreadable on the next load
            raise ValueError(f"refusing to pin a {len(key)}-byte key for peer {peer_id!r}")
        known = self._pins.get(peer_id)
        if known == key:
            return False
        if known is not None:
            raise PinMismatch(
                f"peer {peer_id} presented key {fingerprint(key)} but {fingerprint(known)} is pinned "
                f"(remove it from {self.path} if the peer really changed its key)"
            )
        self._pins[peer_id] = key
        data = {k: base64.b64encode(v).decode() for k, v in sorted(self._pins.items())}
        write_private(self.path, (json.dumps(data, indent=1) + "\n").encode())
        return True
