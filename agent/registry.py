"""The rendezvous server's durable ID table (SQLite): which uuid and key own which ID.

An ID is bound to the machine uuid that registered it first, and that binding must
survive restarts and crashes, so the database runs in WAL mode with synchronous=FULL.
The ownership rule is also written into the SQL (an update only applies when the
uuid matches), so even a caller with a stale in-memory view cannot hand an ID to a
different uuid. Writes come in batches: one transaction (one fsync) for everything
that arrived while the previous batch was being committed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peer (
    id          TEXT PRIMARY KEY NOT NULL,
    uuid        BLOB NOT NULL,
    pk          BLOB NOT NULL,
    created_at  REAL NOT NULL,
    last_ip     TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID
"""

# Insert a new ID, or refresh pk/last_ip of an ID this uuid already owns; a row owned by
# another uuid is left untouched (the WHERE clause turns the hijack into a no-op).
_UPSERT = """
INSERT INTO peer (id, uuid, pk, created_at, last_ip) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET pk = excluded.pk, last_ip = excluded.last_ip
WHERE peer.uuid = excluded.uuid
"""


@dataclass(frozen=True, slots=True)
class PeerRow:
    """One bound ID. `created_at` is Unix time (0.0 until the row is stored)."""

    id: str
    uuid: bytes
    pk: bytes
    last_ip: str = ""
    created_at: float = 0.0


class Registry:
    """One SQLite connection; use one Registry per thread (reads on the event loop, writes elsewhere)."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._clock = clock
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is one transaction.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute(_SCHEMA)

    def get(self, peer_id: str) -> PeerRow | None:
        row = self._db.execute("SELECT id, uuid, pk, last_ip, created_at FROM peer WHERE id = ?", (peer_id,)).fetchone()
        if row is None:
            return None
        return PeerRow(row[0], bytes(row[1]), bytes(row[2]), row[3], row[4])

    def put_many(self, rows: Iterable[PeerRow]) -> int:
        """Store rows in one transaction; returns how many were refused (ID owned by another uuid)."""
        rows = list(rows)
        if not rows:
            return 0
        now = self._clock()
        refused = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for r in rows:
                cur = self._db.execute(_UPSERT, (r.id, r.uuid, r.pk, now, r.last_ip))
                if cur.rowcount == 0:
                    refused += 1
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return refused

    def put(self, row: PeerRow) -> bool:
        """Store one row; False when the ID belongs to another uuid (nothing changed)."""
        return self.put_many([row]) == 0

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM peer").fetchone()[0])

    def close(self) -> None:
        self._db.close()
