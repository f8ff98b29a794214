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


class PinMismatch(Exception):
    """A peer presented a key that differs from the one pinned for its ID."""


class PinStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PINS_FILE
        self._pins: dict[str, bytes] = {}
        try:
            raw = json.loads(self.path.read_text())
            self._pins = {str(k): base64.b64decode(v) for k, v in raw.items()}
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{self.path}: unreadable pins ({exc}); fix or remove it") from None

    def get(self, peer_id: str) -> bytes | None:
        return self._pins.get(peer_id)

    def check_and_pin(self, peer_id: str, key: bytes) -> bool:
        """True if newly pinned; raises PinMismatch if `peer_id` is pinned to another key."""
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
