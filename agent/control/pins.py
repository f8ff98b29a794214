"""Pinned keys (trust on first use, like ssh's known_hosts): peers' keys and rendezvous servers' keys.

Once a name (a peer ID, a server's HOST:PORT) has been seen with a key, a different
key for that name is refused with a clear error until the user removes the pin.
Written atomically, so a crash mid-write keeps the previous pins.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from agent.common.files import read_json_state, write_private
from agent.wire.peer_ids import fingerprint

PINS_FILE = "known_peers.json"
SERVER_PINS_FILE = "known_servers.json"
KEY_LEN = 32


class PinMismatch(Exception):
    """A name presented a key that differs from the one pinned for it."""


def _key(value: object) -> bytes:
    """A pin is exactly one ed25519 public key: anything else is damage, never a key to trust."""
    if not isinstance(value, str):
        raise TypeError(f"a pin must be a base64 string, got {type(value).__name__}")
    key = base64.b64decode(value, validate=True)
    if len(key) != KEY_LEN:
        raise ValueError(f"a pin must be a {KEY_LEN}-byte key, got {len(key)} bytes")
    return key


class KeyPins:
    """name -> key, in one JSON file of the state dir."""

    what = "name"

    def __init__(self, state_dir: Path, filename: str) -> None:
        self.path = state_dir / filename
        pins = read_json_state(
            self.path, "pins", lambda raw: {str(k): _key(v) for k, v in raw.items()}, hint="; fix or remove it"
        )
        self._pins: dict[str, bytes] = pins or {}

    def get(self, name: str) -> bytes | None:
        return self._pins.get(name)

    def items(self) -> list[tuple[str, bytes]]:
        return sorted(self._pins.items())

    def check_and_pin(self, name: str, key: bytes) -> bool:
        """True if newly pinned; raises PinMismatch if `name` is pinned to another key."""
        if len(key) != KEY_LEN:  # would make the file unreadable on the next load
            raise ValueError(f"refusing to pin a {len(key)}-byte key for {self.what} {name!r}")
        known = self._pins.get(name)
        if known == key:
            return False
        if known is not None:
            raise PinMismatch(
                f"{self.what} {name} presented key {fingerprint(key)} but {fingerprint(known)} is pinned "
                f"(if it really changed its key, remove {name} from {self.path})"
            )
        self._pins[name] = key
        self._save()
        return True

    def forget(self, name: str) -> bool:
        """Remove a pin; False if there was none."""
        if self._pins.pop(name, None) is None:
            return False
        self._save()
        return True

    def _save(self) -> None:
        data = {k: base64.b64encode(v).decode() for k, v in sorted(self._pins.items())}
        write_private(self.path, (json.dumps(data, indent=1) + "\n").encode())


class PinStore(KeyPins):
    """Peers' keys, pinned after every verified session."""

    what = "peer"

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, PINS_FILE)


class ServerPins(KeyPins):
    """Rendezvous servers' keys (by the HOST:PORT this agent uses), pinned on first registration."""

    what = "rendezvous server"

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, SERVER_PINS_FILE)


class PinnedKeys:
    """The key pinned for a peer as PINS_FILE is now, re-read only when the file changed: every
    stream asks, and parsing the file each time cost a quarter of a millisecond."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._pins: tuple[tuple[int, int, int], PinStore] | None = None

    def get(self, peer: str) -> bytes | None:
        try:
            st = (self.state_dir / PINS_FILE).stat()
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError:
            stamp = (-1, -1, -1)
        if self._pins is None or self._pins[0] != stamp:
            self._pins = (stamp, PinStore(self.state_dir))
        return self._pins[1].get(peer)
