"""The state a running agent re-reads or keeps: the live config and the table of peers last seen."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.config import Config
from agent.control.access import load_state_config, save_state_config
from agent.control.live_config import CONFIG_FILE, LiveConfig
from agent.session import seen as seenmod
from agent.session.seen import SeenPeers


def bump(path: Path) -> None:
    """A later mtime than the last read (two edits within one clock tick must still be seen)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_an_edit_is_seen_at_the_next_get(tmp_path: Path) -> None:
    start = Config()
    save_state_config(tmp_path, start)
    live = LiveConfig(tmp_path, start)
    assert live.get() is start  # unchanged file: no re-read
    cfg = load_state_config(tmp_path)
    cfg.access.allow_targets = ["127.0.0.1:22"]
    save_state_config(tmp_path, cfg)
    bump(tmp_path / CONFIG_FILE)
    assert live.get().access.allow_targets == ["127.0.0.1:22"]


@pytest.mark.parametrize(
    "text", ["[access\nallow = [", "[access]\nallow = ['not a peer']\n", "[agent]\npath = 'sideways'\n", "\x00\xff"]
)
def test_a_broken_edit_keeps_the_last_good_config(tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture) -> None:
    """A half-written or wrong file never opens or closes the door by accident; the log says why."""
    good = Config()
    good.access.allow_targets = ["127.0.0.1:22"]
    save_state_config(tmp_path, good)
    live = LiveConfig(tmp_path, good)
    (tmp_path / CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    bump(tmp_path / CONFIG_FILE)
    assert live.get().access.allow_targets == ["127.0.0.1:22"]
    assert "keeping the previous config" in caplog.text


def test_a_missing_file_keeps_what_the_agent_started_with(tmp_path: Path) -> None:
    start = Config()
    assert LiveConfig(tmp_path, start).get() is start


def test_seen_peers_survive_a_restart_most_recent_last(tmp_path: Path) -> None:
    seen = SeenPeers(tmp_path)
    seen.note("1111111111", "lan", "initiator", "SHA256:a")
    seen.note("2222222222", "relay", "responder", "SHA256:b")
    seen.note("1111111111", "tcp_punch", "initiator", "SHA256:a")
    seen.flush()
    table = seenmod.load(tmp_path)
    assert list(table) == ["2222222222", "1111111111"]
    assert table["1111111111"]["path"] == "tcp_punch" and table["2222222222"]["role"] == "responder"
    assert (tmp_path / seenmod.SEEN_FILE).stat().st_mode & 0o777 == 0o600


def test_seen_peers_are_bounded_and_writes_are_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seenmod, "MAX_PEERS", 3)
    seen = SeenPeers(tmp_path)
    seen.note("1", "lan", "initiator", "")  # first note writes at once
    for n in range(2, 7):
        seen.note(str(n), "lan", "initiator", "")
    assert list(seenmod.load(tmp_path)) == ["1"]  # the rest waits for the next flush
    seen.flush()
    assert list(seenmod.load(tmp_path)) == ["4", "5", "6"]


@pytest.mark.parametrize("text", ["", "[]", "{", '{"1": 5}', "\x00" * 10, '{"1": {"last_seen": 1}}'])
def test_an_unreadable_seen_file_is_an_empty_or_partial_table(tmp_path: Path, text: str) -> None:
    (tmp_path / seenmod.SEEN_FILE).write_text(text)
    table = seenmod.load(tmp_path)
    assert all(isinstance(v, dict) for v in table.values())
    assert json.dumps(table)
