"""TOFU pins: first key wins, a different key is a loud error, and the file is never half-written."""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control.pins import PINS_FILE, PinMismatch, PinStore
from agent.wire.peer_ids import fingerprint

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def test_first_contact_pins(tmp_path: Path) -> None:
    store = PinStore(tmp_path)
    assert store.get("1234567890") is None
    assert store.check_and_pin("1234567890", KEY_A) is True
    assert store.get("1234567890") == KEY_A
    assert store.check_and_pin("1234567890", KEY_A) is False  # known key: nothing to do
    assert stat.S_IMODE((tmp_path / PINS_FILE).stat().st_mode) == 0o600
    assert json.loads((tmp_path / PINS_FILE).read_text()) == {"1234567890": base64.b64encode(KEY_A).decode()}


def test_pins_persist(tmp_path: Path) -> None:
    PinStore(tmp_path).check_and_pin("111", KEY_A)
    PinStore(tmp_path).check_and_pin("222", KEY_B)
    store = PinStore(tmp_path)
    assert store.get("111") == KEY_A and store.get("222") == KEY_B


def test_no_file_no_pins_and_nothing_written(tmp_path: Path) -> None:
    store = PinStore(tmp_path)
    assert store.get("x") is None
    assert not (tmp_path / PINS_FILE).exists()


def test_mismatch_names_both_fingerprints_and_the_file(tmp_path: Path) -> None:
    PinStore(tmp_path).check_and_pin("1234567890", KEY_A)
    before = (tmp_path / PINS_FILE).read_bytes()
    store = PinStore(tmp_path)
    with pytest.raises(PinMismatch) as info:
        store.check_and_pin("1234567890", KEY_B)
    message = str(info.value)
    assert fingerprint(KEY_A) in message and fingerprint(KEY_B) in message
    assert str(tmp_path / PINS_FILE) in message and "1234567890" in message
    assert "\n" not in message
    # the pin is not replaced, in memory or on disk
    assert store.get("1234567890") == KEY_A
    assert (tmp_path / PINS_FILE).read_bytes() == before


def test_mismatch_does_not_block_other_peers(tmp_path: Path) -> None:
    store = PinStore(tmp_path)
    store.check_and_pin("a", KEY_A)
    with pytest.raises(PinMismatch):
        store.check_and_pin("a", KEY_B)
    assert store.check_and_pin("b", KEY_B) is True
    assert PinStore(tmp_path).get("a") == KEY_A


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b'{"1": "AAA',
        b"\xff\xfe",
        b"[1, 2]",
        b"null",
        b"5",
        b'"text"',
        b'{"1": 5}',
        b'{"1": null}',
        b'{"1": ["x"]}',
        b"\x00" * 100,
    ],
)
def test_corrupted_file_is_a_clear_error_and_kept(tmp_path: Path, data: bytes) -> None:
    (tmp_path / PINS_FILE).write_bytes(data)
    with pytest.raises(ValueError) as info:
        PinStore(tmp_path)
    message = str(info.value)
    assert str(tmp_path / PINS_FILE) in message and "\n" not in message
    assert (tmp_path / PINS_FILE).read_bytes() == data


@pytest.mark.parametrize("value", ["!!!!", "AA!AA", "AAAA", base64.b64encode(KEY_A).decode()[:-4], ""])
def test_bad_pin_value_is_a_clear_error(tmp_path: Path, value: str) -> None:
    data = json.dumps({"1234567890": value}).encode()
    (tmp_path / PINS_FILE).write_bytes(data)
    with pytest.raises(ValueError, match=PINS_FILE):
        PinStore(tmp_path)
    assert (tmp_path / PINS_FILE).read_bytes() == data


def test_deeply_nested_file(tmp_path: Path) -> None:
    (tmp_path / PINS_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=PINS_FILE):
        PinStore(tmp_path)


def test_pins_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / PINS_FILE).mkdir()
    with pytest.raises(ValueError, match=PINS_FILE):
        PinStore(tmp_path)


@pytest.mark.parametrize("key", [b"", KEY_A[:31], KEY_A + b"\x00"])
def test_wrong_length_key_is_never_pinned(tmp_path: Path, key: bytes) -> None:
    """Pinning it would write a file the next load refuses."""
    store = PinStore(tmp_path)
    with pytest.raises(ValueError):
        store.check_and_pin("1", key)
    assert store.get("1") is None and not (tmp_path / PINS_FILE).exists()


def test_atomic_replace_keeps_old_content_for_readers(tmp_path: Path) -> None:
    store = PinStore(tmp_path)
    store.check_and_pin("a", KEY_A)
    with open(tmp_path / PINS_FILE, "rb") as reader:
        old = reader.read()
        store.check_and_pin("b", KEY_B)
        reader.seek(0)
        assert reader.read() == old  # replaced by rename, never truncated in place
    assert set(json.loads((tmp_path / PINS_FILE).read_text())) == {"a", "b"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_leftover_tmp_file_is_harmless(tmp_path: Path) -> None:
    PinStore(tmp_path).check_and_pin("a", KEY_A)
    (tmp_path / f".{PINS_FILE}.{os.getpid()}.tmp").write_text('{"a": "tru')
    store = PinStore(tmp_path)
    assert store.get("a") == KEY_A
    store.check_and_pin("b", KEY_B)
    assert PinStore(tmp_path).get("b") == KEY_B


_ids = st.text(min_size=1, max_size=20)
_keys = st.binary(min_size=32, max_size=32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_ids, _keys), max_size=12))
def test_file_always_parses_and_matches_memory(tmp_path: Path, ops: list[tuple[str, bytes]]) -> None:
    """After every pin the file on disk is complete JSON equal to what the store believes, any ID text."""
    state = Path(tempfile.mkdtemp(dir=tmp_path))
    store = PinStore(state)
    expected: dict[str, bytes] = {}
    for peer, key in ops:
        if peer in expected and expected[peer] != key:
            with pytest.raises(PinMismatch):
                store.check_and_pin(peer, key)
        else:
            store.check_and_pin(peer, key)
            expected.setdefault(peer, key)
        if expected:
            on_disk = json.loads((state / PINS_FILE).read_text())
            assert {k: base64.b64decode(v) for k, v in on_disk.items()} == expected
    reloaded = PinStore(state)
    assert all(reloaded.get(k) == v for k, v in expected.items())
