"""The SQLite ID table: bindings survive reopening, and the first uuid keeps its ID."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.servers.registry import PeerRow, Registry


def test_binding_persists_across_reopen(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "rv.sqlite3"  # parent directory is created
    reg = Registry(db, clock=lambda: 1000.0)
    assert reg.get("123456789") is None
    assert reg.put(PeerRow("123456789", b"uuid-1", b"k" * 32, "203.0.113.5"))
    reg.close()

    reg = Registry(db)
    row = reg.get("123456789")
    assert row == PeerRow("123456789", b"uuid-1", b"k" * 32, "203.0.113.5", 1000.0)
    assert reg.count() == 1
    reg.close()


def test_hijack_refused_and_row_untouched(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "rv.sqlite3")
    assert reg.put(PeerRow("victim01", b"uuid-owner", b"a" * 32, "198.51.100.1"))
    assert not reg.put(PeerRow("victim01", b"uuid-thief", b"b" * 32, "203.0.113.9"))
    row = reg.get("victim01")
    assert row is not None
    assert (row.uuid, row.pk, row.last_ip) == (b"uuid-owner", b"a" * 32, "198.51.100.1")
    reg.close()
    # ... and still after a restart
    reg = Registry(tmp_path / "rv.sqlite3")
    row = reg.get("victim01")
    assert row is not None and row.uuid == b"uuid-owner"
    reg.close()


def test_owner_updates_key_and_ip_keeps_created_at(tmp_path: Path) -> None:
    t = [10.0]
    reg = Registry(tmp_path / "rv.sqlite3", clock=lambda: t[0])
    reg.put(PeerRow("owner001", b"u", b"a" * 32, "198.51.100.1"))
    t[0] = 20.0
    assert reg.put(PeerRow("owner001", b"u", b"c" * 32, "198.51.100.2"))
    assert reg.get("owner001") == PeerRow("owner001", b"u", b"c" * 32, "198.51.100.2", 10.0)
    reg.close()


def test_put_many_is_one_batch_and_counts_refusals(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "rv.sqlite3")
    reg.put(PeerRow("taken001", b"owner", b"a" * 32))
    rows = [PeerRow(f"peer{i:04d}", b"u%d" % i, b"k" * 32) for i in range(50)]
    rows.append(PeerRow("taken001", b"someone-else", b"z" * 32))
    assert reg.put_many(rows) == 1
    assert reg.count() == 51
    assert reg.put_many([]) == 0
    reg.close()


def test_durability_settings(tmp_path: Path) -> None:
    path = tmp_path / "rv.sqlite3"
    reg = Registry(path)
    reg.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    reg = Registry(path)
    assert reg._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    reg.close()


def test_two_connections_see_each_others_commits(tmp_path: Path) -> None:
    """The server reads on the loop thread and writes on a worker: WAL lets both work."""
    reader = Registry(tmp_path / "rv.sqlite3")
    writer = Registry(tmp_path / "rv.sqlite3")
    writer.put(PeerRow("shared01", b"u", b"k" * 32))
    row = reader.get("shared01")
    assert row is not None and row.uuid == b"u"
    reader.close()
    writer.close()


def test_memory_database_works(tmp_path: Path) -> None:
    reg = Registry(":memory:")
    assert reg.put(PeerRow("memory01", b"u", b"k"))
    assert reg.count() == 1
    reg.close()
