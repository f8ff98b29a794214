"""When each peer was last seen, and on which path: what `punchthrough peers` shows after a restart too.

The session owner notes every session that opens (either side) in memory and writes the table at
most every few seconds (atomically, 0600), so a burst of sessions costs one small write, not one
per session; at most `MAX_PEERS` peers are kept, the longest unseen forgotten first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.common.files import write_private

SEEN_FILE = "peers_seen.json"
MAX_PEERS = 1024
FLUSH_EVERY = 5.0


def load(state_dir: Path) -> dict[str, dict[str, Any]]:
    """peer ID -> {"last_seen": unix time, "path": ..., "role": ..., "key": fingerprint}; {} when unreadable."""
    try:
        raw = json.loads((state_dir / SEEN_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, dict)}


class SeenPeers:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SEEN_FILE
        self.table = load(state_dir)
        self.dirty = False
        self._flushed = 0.0

    def note(self, peer: str, path: str, role: str, key: str) -> None:
        if not peer:
            return
        self.table.pop(peer, None)
        self.table[peer] = {"last_seen": round(time.time(), 1), "path": path, "role": role, "key": key}
        while len(self.table) > MAX_PEERS:
            self.table.pop(next(iter(self.table)))
        self.dirty = True
        if time.monotonic() - self._flushed >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.dirty:
            self.dirty = False
            self._flushed = time.monotonic()
            write_private(self.path, (json.dumps(self.table, indent=1) + "\n").encode())
