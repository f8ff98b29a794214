"""The agent's identity: created once with mode 0600, stable, and never silently replaced when damaged."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from agent import identity
from agent.common.keyfile import KeyFileError
from agent.identity import IDENTITY_FILE, KEY_FILE, load_or_create, next_id
from agent.wire.peer_ids import derive_id, fingerprint


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(state_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file()}


def test_created_on_first_run_private(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path)
    assert _mode(tmp_path / KEY_FILE) == 0o600
    assert _mode(tmp_path / IDENTITY_FILE) == 0o600
    assert len(ident.peer_id) == 10 and ident.peer_id.isdigit() and ident.peer_id[0] != "0"
    assert ident.peer_id == derive_id(ident.public_key, 0) and ident.salt == 0
    assert len(ident.uuid) == 16
    assert ident.fingerprint == fingerprint(ident.public_key) and ident.fingerprint.startswith("SHA256:")
    # the public half is published next to the key, as hbbs does
    assert (tmp_path / (KEY_FILE + ".pub")).read_text().strip() == base64.b64encode(ident.public_key).decode()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_created_in_missing_nested_dir(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b" / "c"
    load_or_create(state)
    assert (state / KEY_FILE).exists()


def test_stable_across_loads(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    before = _snapshot(tmp_path)
    for _ in range(3):
        again = load_or_create(tmp_path)
        assert (again.peer_id, again.uuid, again.salt, again.public_key) == (
            first.peer_id,
            first.uuid,
            first.salt,
            first.public_key,
        )
    assert _snapshot(tmp_path) == before  # loading never rewrites anything


def test_different_dirs_different_identities(tmp_path: Path) -> None:
    a, b = load_or_create(tmp_path / "a"), load_or_create(tmp_path / "b")
    assert a.peer_id != b.peer_id and a.uuid != b.uuid


def test_derive_id_shape() -> None:
    for seed in range(200):
        key = SigningKey(seed.to_bytes(32, "big")).verify_key
        for salt in (0, 1, 7, 2**32 - 1):
            pid = derive_id(bytes(key), salt)
            assert len(pid) == 10 and pid.isdigit() and pid[0] != "0"


def test_next_id_moves_and_persists(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    second = next_id(tmp_path, first)
    assert second.salt == 1 and second.peer_id != first.peer_id
    assert second.peer_id == derive_id(first.public_key, 1)
    assert second.uuid == first.uuid and second.public_key == first.public_key
    loaded = load_or_create(tmp_path)
    assert (loaded.peer_id, loaded.salt, loaded.uuid) == (second.peer_id, 1, first.uuid)
    third = next_id(tmp_path, loaded)
    assert load_or_create(tmp_path).peer_id == third.peer_id == derive_id(first.public_key, 2)
    assert _mode(tmp_path / IDENTITY_FILE) == 0o600


def test_existing_64_byte_key_is_used(tmp_path: Path) -> None:
    key = SigningKey.generate()
    (tmp_path / KEY_FILE).write_text(base64.b64encode(bytes(key) + bytes(key.verify_key)).decode() + "\n")
    assert load_or_create(tmp_path).public_key == bytes(key.verify_key)


def test_existing_32_byte_seed_is_used(tmp_path: Path) -> None:
    key = SigningKey.generate()
    (tmp_path / KEY_FILE).write_text(base64.b64encode(bytes(key)).decode())
    assert load_or_create(tmp_path).public_key == bytes(key.verify_key)


# ---- damaged key file ----------------------------------------------------------------------------


def _bad_keys() -> dict[str, bytes]:
    good = SigningKey(b"\x01" * 32)
    full = bytes(good) + bytes(good.verify_key)
    other = bytes(SigningKey(b"\x02" * 32).verify_key)
    return {
        "empty": b"",
        "whitespace": b"  \n\t\n",
        "garbage": b"this is not a key!",
        "truncated": base64.b64encode(full)[:40],
        "truncated-decodable": base64.b64encode(full[:48]),
        "one-byte-short": base64.b64encode(full[:63]),
        "too-long": base64.b64encode(full + b"\x00"),
        "wrong-public-half": base64.b64encode(bytes(good) + other),
        "base64-with-junk": base64.b64encode(full)[:20] + b"!!" + base64.b64encode(full)[20:],
        "huge": b"A" * 2_000_000,
        "nul": b"\x00" * 64,
    }


@pytest.mark.parametrize("name", list(_bad_keys()))
def test_damaged_key_file_is_refused_not_replaced(tmp_path: Path, name: str) -> None:
    load_or_create(tmp_path)
    (tmp_path / KEY_FILE).write_bytes(_bad_keys()[name])
    before = _snapshot(tmp_path)
    with pytest.raises(KeyFileError) as info:
        load_or_create(tmp_path)
    assert str(tmp_path / KEY_FILE) in str(info.value) or str(tmp_path / IDENTITY_FILE) in str(info.value)
    assert "\n" not in str(info.value)
    assert _snapshot(tmp_path) == before


def test_key_that_does_not_match_the_id(tmp_path: Path) -> None:
    """A valid key swapped in under an existing identity.json: refused, both files kept."""
    load_or_create(tmp_path)
    other = SigningKey.generate()
    (tmp_path / KEY_FILE).write_text(base64.b64encode(bytes(other) + bytes(other.verify_key)).decode())
    before = _snapshot(tmp_path)
    with pytest.raises(KeyFileError) as info:
        load_or_create(tmp_path)
    assert str(tmp_path / IDENTITY_FILE) in str(info.value) and KEY_FILE in str(info.value)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("data", [b"\xff\xfe\xfd", b"AAAA\x80AAAA"])
def test_non_utf8_key_file(tmp_path: Path, data: bytes) -> None:
    (tmp_path / KEY_FILE).write_bytes(data)
    with pytest.raises(KeyFileError, match=KEY_FILE):
        load_or_create(tmp_path)
    assert (tmp_path / KEY_FILE).read_bytes() == data


# ---- damaged identity.json -----------------------------------------------------------------------


def _bad_identities(raw: dict[str, object]) -> dict[str, bytes]:
    return {
        "empty": b"",
        "truncated": json.dumps(raw).encode()[:20],
        "garbage": b"\x00\x01garbage",
        "non-utf8": b"\xff\xfe{}",
        "list": b"[1, 2]",
        "string": b'"x"',
        "null": b"null",
        "missing-uuid": json.dumps({"id": raw["id"], "salt": 0}).encode(),
        "missing-salt": json.dumps({"id": raw["id"], "uuid": raw["uuid"]}).encode(),
        "missing-id": json.dumps({"salt": 0, "uuid": raw["uuid"]}).encode(),
        "uuid-not-hex": json.dumps(dict(raw, uuid="zz" * 16)).encode(),
        "uuid-short": json.dumps(dict(raw, uuid="00" * 15)).encode(),
        "uuid-long": json.dumps(dict(raw, uuid="00" * 17)).encode(),
        "uuid-int": json.dumps(dict(raw, uuid=5)).encode(),
        "salt-text": json.dumps(dict(raw, salt="one")).encode(),
        "salt-null": json.dumps(dict(raw, salt=None)).encode(),
        "salt-other": json.dumps(dict(raw, salt=3)).encode(),
        "id-other": json.dumps(dict(raw, id="1234567890")).encode(),
        "id-int": json.dumps(dict(raw, id=int(str(raw["id"])))).encode(),
        "huge": b'{"pad": "' + b"x" * 2_000_000 + b'"}',
    }


def _identity_cases() -> list[str]:
    return list(_bad_identities({"id": "1", "salt": 0, "uuid": "00"}))


@pytest.mark.parametrize("name", _identity_cases())
def test_damaged_identity_is_refused_not_replaced(tmp_path: Path, name: str) -> None:
    load_or_create(tmp_path)
    raw = json.loads((tmp_path / IDENTITY_FILE).read_text())
    (tmp_path / IDENTITY_FILE).write_bytes(_bad_identities(raw)[name])
    before = _snapshot(tmp_path)
    with pytest.raises(KeyFileError) as info:
        load_or_create(tmp_path)
    assert str(tmp_path / IDENTITY_FILE) in str(info.value)
    assert "\n" not in str(info.value)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("salt", [-1, 2**32, 10**30])
def test_out_of_range_salt(tmp_path: Path, salt: int) -> None:
    load_or_create(tmp_path)
    raw = json.loads((tmp_path / IDENTITY_FILE).read_text())
    (tmp_path / IDENTITY_FILE).write_text(json.dumps(dict(raw, salt=salt)))
    with pytest.raises(KeyFileError, match=IDENTITY_FILE):
        load_or_create(tmp_path)


def test_deeply_nested_identity(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    (tmp_path / IDENTITY_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(KeyFileError, match=IDENTITY_FILE):
        load_or_create(tmp_path)


def test_identity_path_is_a_directory(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    (tmp_path / IDENTITY_FILE).unlink()
    (tmp_path / IDENTITY_FILE).mkdir()
    with pytest.raises(KeyFileError, match=IDENTITY_FILE):
        load_or_create(tmp_path)


def test_state_dir_is_a_file(tmp_path: Path) -> None:
    bogus = tmp_path / "state"
    bogus.write_text("not a directory")
    with pytest.raises(KeyFileError, match="state"):
        load_or_create(bogus)


# ---- crashes mid-write ---------------------------------------------------------------------------


def test_leftover_tmp_files_do_not_break_loading(tmp_path: Path) -> None:
    """A crash between writing the temp file and the rename leaves `.<name>.<pid>.tmp` behind."""
    first = load_or_create(tmp_path)
    (tmp_path / f".{IDENTITY_FILE}.{os.getpid()}.tmp").write_text('{"id": "99')
    (tmp_path / f".{KEY_FILE}.12345.tmp").write_bytes(b"\xff half a key")
    again = load_or_create(tmp_path)
    assert (again.peer_id, again.uuid) == (first.peer_id, first.uuid)
    # and a later save (next_id) replaces over a stale temp file of the same pid
    moved = next_id(tmp_path, again)
    assert load_or_create(tmp_path).peer_id == moved.peer_id


def test_crash_before_first_identity_file(tmp_path: Path) -> None:
    """Key written, identity.json never renamed into place: the next run finishes the job with the same key."""
    (tmp_path / f".{IDENTITY_FILE}.777.tmp").write_text("{")
    key = SigningKey.generate()
    (tmp_path / KEY_FILE).write_text(base64.b64encode(bytes(key) + bytes(key.verify_key)).decode())
    ident = load_or_create(tmp_path)
    assert ident.public_key == bytes(key.verify_key) and ident.salt == 0
    assert json.loads((tmp_path / IDENTITY_FILE).read_text())["id"] == ident.peer_id


def test_save_is_atomic_replace(tmp_path: Path) -> None:
    """save() never truncates in place: the old inode stays intact for a concurrent reader."""
    ident = load_or_create(tmp_path)
    with open(tmp_path / IDENTITY_FILE, "rb") as reader:
        old = reader.read()
        identity.save(tmp_path, next_id(tmp_path, ident))
        reader.seek(0)
        assert reader.read() == old
    assert json.loads((tmp_path / IDENTITY_FILE).read_text())["salt"] == 1
