"""The rendezvous server's durable ID table (SQLite): which uuid and key own which ID.

An ID is bound to the key that registered it first with its signature (`signed`), or,
for RustDesk's unsigned registrations, to the machine uuid that registered it first;
that binding must survive restarts and crashes, so the database runs in WAL mode with
synchronous=FULL. The ownership rules are also written into the SQL (a signed row is
only updated by a signed row with the same key; an unsigned row only by its own uuid),
so even a caller with a stale in-memory view cannot hand an ID to someone else.
Writes come in batches: one transaction (one fsync) for everything that arrived while
the previous batch was being committed.

The file is created 0600 (SQLite gives its -wal and -shm files the same mode): it
holds every peer's uuid and key, and the uuid is upstream's only proof of ownership.
"""

from __future__ import annotations

import os
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
    last_ip     TEXT NOT NULL DEFAULT '',
    signed      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID
"""
_ADD_SIGNED = "ALTER TABLE peer ADD COLUMN signed INTEGER NOT NULL DEFAULT 0"

# Insert a new ID, or refresh a binding its owner holds: a signed row only with a signed row of the
# same key (uuid and address may change), an unsigned row only with its own uuid (and it may become
# signed). Anything else is left untouched: the WHERE clause turns a hijack into a no-op.
_UPSERT = """
INSERT INTO peer (id, uuid, pk, created_at, last_ip, signed) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET uuid = excluded.uuid, pk = excluded.pk, last_ip = excluded.last_ip,
    signed = excluded.signed
WHERE (peer.signed = 1 AND excluded.signed = 1 AND peer.pk = excluded.pk)
   OR (peer.signed = 0 AND peer.uuid = excluded.uuid)
"""


@dataclass(frozen=True, slots=True)
class PeerRow:
    """One bound ID. `created_at` is Unix time (0.0 until the row is stored)."""

    id: str
    uuid: bytes
    pk: bytes
    last_ip: str = ""
    created_at: float = 0.0
    signed: bool = False


class Registry:
    """One SQLite connection; use one Registry per thread (reads on the event loop, writes elsewhere)."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._clock = clock
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)  # an older file may have been created readable
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is one transaction.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(peer)")}
        if "signed" not in columns:  # a database from before signed registrations
            self._db.execute(_ADD_SIGNED)

    def get(self, peer_id: str) -> PeerRow | None:
        row = self._db.execute(
            "SELECT id, uuid, pk, last_ip, created_at, signed FROM peer WHERE id = ?", (peer_id,)
        ).fetchone()
        if row is None:
            return None
        return PeerRow(row[0], bytes(row[1]), bytes(row[2]), row[3], row[4], bool(row[5]))

    def put_many(self, rows: Iterable[PeerRow]) -> int:
        """Store rows in one transaction; returns how many were refused (ID owned by someone else)."""
        rows = list(rows)
        if not rows:
            return 0
        now = self._clock()
        refused = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for r in rows:
                cur = self._db.execute(_UPSERT, (r.id, r.uuid, r.pk, now, r.last_ip, int(r.signed)))
                if cur.rowcount == 0:
                    refused += 1
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return refused

    def put(self, row: PeerRow) -> bool:
        """Store one row; False when the ID belongs to someone else (nothing changed)."""
        return self.put_many([row]) == 0

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM peer").fetchone()[0])

    def close(self) -> None:
        self._db.close()
