"""agent/wire/peer_ids.py and agent/control/access.py: peers named by key, allowed_peers, the access policy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from agent.config import Config
from agent.control.access import (
    ALLOWED_PEERS_FILE,
    MAX_ALLOWED_PEERS_BYTES,
    allowed,
    build_policy,
    merge,
    parse_allowed_peers,
    read_allowed_peers,
)
from agent.control.pins import PinStore
from agent.wire.peer_ids import PeerSpec, fingerprint, parse_peer_spec, spec_for

PK = bytes(SigningKey(b"p" * 32).verify_key)
FP = fingerprint(PK)


def test_a_spec_names_an_id_and_maybe_its_key() -> None:
    assert parse_peer_spec("1234567890") == PeerSpec("1234567890")
    spec = parse_peer_spec(f" 1234567890={FP} ")
    assert spec == PeerSpec("1234567890", FP) and str(spec) == f"1234567890={FP}"
    assert spec.matches(PK) and not spec.matches(bytes(32)) and PeerSpec("1").matches(bytes(32))
    assert spec_for("1234567890", PK) == f"1234567890={FP}"
    assert FP.startswith("SHA256:") and len(FP) == 50


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a peer ID"),
        ("with space", "not a peer ID"),
        ("x" * 65, "not a peer ID"),
        ("ünïcode", "not a peer ID"),
        ("123=", "not a key fingerprint"),
        ("123=SHA256:", "not a key fingerprint"),
        (f"123={FP}x", "not a key fingerprint"),
        (f"123={FP[:-1]}", "not a key fingerprint"),
        ("123=sha256:" + "A" * 43, "not a key fingerprint"),
        (f"123={FP}={FP}", "not a key fingerprint"),
        ("1" * 10_000, "not a peer ID"),
    ],
)
def test_bad_specs_are_one_line_errors(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_peer_spec(text)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_allowed_peers_file_comments_and_errors_name_the_line(tmp_path: Path) -> None:
    text = f"# who may connect\n\n1111111111={FP}   # laptop\n2222222222 extra words are ignored\n"
    assert parse_allowed_peers(text, "f") == [PeerSpec("1111111111", FP), PeerSpec("2222222222")]
    with pytest.raises(ValueError, match=r"^f:3: not a key fingerprint"):
        parse_allowed_peers("1\n2\n3=nope\n", "f")
    assert read_allowed_peers(tmp_path) == []
    (tmp_path / ALLOWED_PEERS_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_allowed_peers(tmp_path)
    (tmp_path / ALLOWED_PEERS_FILE).write_bytes(b"1\n" * (MAX_ALLOWED_PEERS_BYTES // 2 + 1))
    with pytest.raises(ValueError, match="larger than"):
        read_allowed_peers(tmp_path)
    (tmp_path / ALLOWED_PEERS_FILE).unlink()
    (tmp_path / ALLOWED_PEERS_FILE).mkdir()
    with pytest.raises(ValueError, match="cannot read"):
        read_allowed_peers(tmp_path)


def test_merge_keeps_a_named_key_and_refuses_two() -> None:
    assert merge([PeerSpec("1"), PeerSpec("1", FP), PeerSpec("1")]) == {"1": FP}
    assert merge([PeerSpec("2")]) == {"2": None}
    with pytest.raises(ValueError, match="two different keys"):
        merge([PeerSpec("1", FP), PeerSpec("1", fingerprint(bytes(32)))])


def test_the_policy_comes_from_config_file_and_pins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = Config()
    assert build_policy(cfg, tmp_path) is None  # nobody allowed, no password: nobody gets in
    cfg.access.allow = ["1111111111", f"2222222222={FP}"]
    cfg.access.allow_targets = ["127.0.0.1:22"]
    (tmp_path / ALLOWED_PEERS_FILE).write_text("3333333333\n")
    PinStore(tmp_path).check_and_pin("1111111111", PK)
    PinStore(tmp_path).check_and_pin("4444444444", PK)  # pinned, but not allowed: not consulted
    policy = build_policy(cfg, tmp_path)
    assert policy is not None
    assert policy.allowed_ids == {"1111111111", "3333333333"}
    assert dict(policy.allowed_keys) == {"2222222222": FP}
    assert dict(policy.pinned_keys) == {"1111111111": PK}
    assert policy.allowed_targets == {"127.0.0.1:22"}
    # a broken file admits nobody through it (logged), the config still counts
    (tmp_path / ALLOWED_PEERS_FILE).write_text("3333333333=bad\n")
    with caplog.at_level(logging.ERROR):
        assert set(allowed(cfg, tmp_path)) == {"1111111111", "2222222222"}
    assert "ignoring the allowed_peers file" in caplog.text
    # two keys for one ID: nobody by ID until it is fixed
    (tmp_path / ALLOWED_PEERS_FILE).write_text(f"2222222222={fingerprint(bytes(32))}\n")
    assert allowed(cfg, tmp_path) == {}
