"""The TOML config: defaults round-trip, and every kind of bad file ends in one ConfigError line naming the key."""

from __future__ import annotations

import base64
import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config
from agent.config import Config, ConfigError
from agent.wire.peer_ids import fingerprint


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "agent.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _error(tmp_path: Path, text: str | bytes) -> str:
    """The ConfigError message for a file holding `text`; asserts it is one line."""
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, text))
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message, message
    return message


# ---- defaults and round trips ------------------------------------------------------------------


def test_defaults_dump_parses_back_to_defaults(tmp_path: Path) -> None:
    text = config.dump(Config())
    assert config.load(_write(tmp_path, text)) == Config()
    # every field is written (nothing relies on an implicit default), each with its documentation
    data = tomllib.loads(text)
    for sec in dataclasses.fields(Config):
        names = {f.name for f in dataclasses.fields(getattr(Config(), sec.name))}
        assert set(data[sec.name]) == names
    assert text.count("\n# ") >= sum(len(v) for v in data.values())


def test_no_file_means_defaults() -> None:
    assert config.load(None) == Config()


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert config.load(_write(tmp_path, "")) == Config()
    assert config.load(_write(tmp_path, "# only a comment\n\n")) == Config()


def test_int_widens_to_float(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, "[agent]\nconnect_timeout = 3\n"))
    assert cfg.agent.connect_timeout == 3.0 and isinstance(cfg.agent.connect_timeout, float)


def test_full_valid_file(tmp_path: Path) -> None:
    text = """
[agent]
server = "[2001:db8::1]:21116"
server_key = "OeVuKk5nlHiXp+APNn0Y3pC1Iwpwn44JGqrQCsWqmBw="
nat_test_port = 21115
relay = "relay.example.org:21117"
relay_key = "k"
path = "relay"
connect_timeout = 2.5

[access]
allow = ["1234567890", "2345678901"]
password_file = "/etc/punchthrough/password"
allow_targets = ["127.0.0.1:22", "[::1]:8080", "db.internal:5432"]

[embedded]
rendezvous_port = 31116
relay_port = 31117
bind = "::"

[ray]
gcs_port = 6380
"""
    cfg = config.load(_write(tmp_path, text))
    assert cfg.agent.server == "[2001:db8::1]:21116"
    assert cfg.agent.path == "relay"
    assert cfg.access.allow_targets == ["127.0.0.1:22", "[::1]:8080", "db.internal:5432"]
    assert cfg.embedded.bind == "::" and cfg.ray.gcs_port == 6380
    assert config.load(_write(tmp_path, config.dump(cfg))) == cfg


_printable = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x10FFFF, exclude_categories=("Cs", "Cc")), max_size=40
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    server_key=st.one_of(st.just(""), st.binary(min_size=32, max_size=32).map(lambda k: base64.b64encode(k).decode())),
    relay_key=_printable,
    allow=st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
            st.one_of(st.just(""), st.binary(min_size=32, max_size=32).map(lambda k: "=" + fingerprint(k))),
        ).map("".join),
        max_size=4,
    ),
    password_file=_printable,
    timeout=st.floats(min_value=1e-6, max_value=1e9, allow_nan=False),
    port=st.integers(1, 0xFFFF),
    path=st.sampled_from(config.PATHS),
)
def test_dump_load_round_trip_printable(
    tmp_path: Path,
    server_key: str,
    relay_key: str,
    allow: list[str],
    password_file: str,
    timeout: float,
    port: int,
    path: str,
) -> None:
    """Quotes, backslashes, non-ASCII text: whatever dump writes, load reads back unchanged."""
    cfg = Config()
    cfg.agent.server_key, cfg.agent.relay_key, cfg.agent.path = server_key, relay_key, path
    cfg.agent.connect_timeout = timeout
    cfg.access.allow, cfg.access.password_file = allow, password_file
    cfg.embedded.rendezvous_port = port
    assert config.load(_write(tmp_path, config.dump(cfg))) == cfg


@pytest.mark.parametrize("value", ["line1\nline2", "nul\x00byte", "del\x7f", "cr\r", "esc\x1b[0m"])
def test_dump_load_round_trip_control_characters(tmp_path: Path, value: str) -> None:
    """A value TOML can hold (as an escape) must survive load -> dump -> load: `up` writes the
    effective config with dump and every actor reads it back with load."""
    cfg = Config()
    cfg.agent.relay_key = value
    cfg.access.password_file = value
    assert config.load(_write(tmp_path, config.dump(cfg))) == cfg


# ---- wrong types ---------------------------------------------------------------------------------

_WRONG: dict[str, list[str]] = {
    "str": ["1", "true", "1.5", "[]", '["x"]', "{a = 1}", "1979-05-27"],
    "int": ['"1"', "true", "1.5", "[]", "{a = 1}", "inf", "1979-05-27T07:32:00Z"],
    "float": ['"1"', "true", "[]", "{a = 1}", "07:32:00"],
    "list[str]": ['"x"', "1", "true", "[1]", '["x", 2]', "[[]]", "{a = 1}"],
}


def _keys() -> list[tuple[str, str, str]]:
    out = []
    for sec in dataclasses.fields(Config):
        section = getattr(Config(), sec.name)
        hints = {f.name: f.type for f in dataclasses.fields(section)}
        for name, kind in hints.items():
            out.append((sec.name, name, str(kind)))
    return out


@pytest.mark.parametrize(("section", "key", "kind"), _keys())
def test_every_key_wrong_type(tmp_path: Path, section: str, key: str, kind: str) -> None:
    assert kind in _WRONG, f"no wrong values listed for type {kind} of {section}.{key}"
    for literal in _WRONG[kind]:
        message = _error(tmp_path, f"[{section}]\n{key} = {literal}\n")
        assert f"{section}.{key}" in message, (literal, message)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[agent]\nservre = 'x'\n", "agent.servre"),
        ("[access]\nallowed = []\n", "access.allowed"),
        ("[ray]\naddress = 'auto'\n", "ray.address"),
        ("[agent.sub]\nx = 1\n", "agent.sub"),
        ("[agents]\nserver = 'x'\n", "[agents]"),
        ("server = 'h:1'\n", "[server]"),
        ("[[agent]]\nserver = 'h:1'\n", "[agent]"),
        ("agent = 5\n", "[agent]"),
        ("agent = 'x'\n", "[agent]"),
    ],
)
def test_unknown_keys_and_sections(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(tmp_path, text)


@pytest.mark.parametrize(
    "text",
    [
        "[agent\nserver = 'x'\n",
        "[agent]\nserver = \n",
        "[agent]\nserver = 'unterminated\n",
        "[agent]\nserver = 'a'\nserver = 'b'\n",
        "[agent]\n[agent]\n",
        "[agent]\nconnect_timeout = 1..0\n",
        "[agent]\nrelay_port = 0x\n",
        "= 1\n",
        "[agent]\nserver = 'x' junk\n",
        '[agent]\nserver = "\\q"\n',
        "\x00",
    ],
)
def test_bad_toml(tmp_path: Path, text: str) -> None:
    message = _error(tmp_path, text)
    assert str(tmp_path / "agent.toml") in message


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe\x00\x00", b"[agent]\nserver = '\xc3\x28'\n", b"\x80" * 100, bytes(range(256))],
)
def test_binary_file(tmp_path: Path, data: bytes) -> None:
    assert str(tmp_path / "agent.toml") in _error(tmp_path, data)


def test_missing_file_is_an_error_not_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value) and "\n" not in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_huge_garbage_file(tmp_path: Path) -> None:
    _error(tmp_path, "x" * 2_000_000)


def test_huge_valid_file_of_comments(tmp_path: Path) -> None:
    assert config.load(_write(tmp_path, "# padding\n" * 200_000 + "[agent]\npath = 'relay'\n")).agent.path == "relay"


def test_huge_list(tmp_path: Path) -> None:
    allow = ", ".join(f'"{i}"' for i in range(100_000))
    assert len(config.load(_write(tmp_path, f"[access]\nallow = [{allow}]\n")).access.allow) == 100_000


def test_deeply_nested_value(tmp_path: Path) -> None:
    _error(tmp_path, "[agent]\nserver = " + "[" * 50_000 + "]" * 50_000 + "\n")


@pytest.mark.parametrize("text", ['[agent]\n"a\\nb" = 1\n', '["a\\nb"]\nx = 1\n'])
def test_unknown_key_with_newline_is_one_line(tmp_path: Path, text: str) -> None:
    _error(tmp_path, text)


def test_oversized_value_error_is_short(tmp_path: Path) -> None:
    message = _error(tmp_path, "[agent]\nserver = '" + "a" * 1_000_000 + "'\n")
    assert len(message) < 1000


def test_integer_too_long_for_python(tmp_path: Path) -> None:
    """tomllib raises a plain ValueError (int max str digits) for this, not TOMLDecodeError."""
    assert "agent.toml" in _error(tmp_path, "[embedded]\nrelay_port = " + "9" * 5000 + "\n")


def test_oversized_wrong_type_value_error_is_short(tmp_path: Path) -> None:
    allow = ", ".join(["1"] * 100_000)
    assert len(_error(tmp_path, f"[access]\nallow = [{allow}]\n")) < 1000


# ---- values that parse but cannot be used ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[agent]\npath = 'fast'\n", "agent.path"),
        ("[agent]\npath = ''\n", "agent.path"),
        ("[agent]\npath = 'AUTO'\n", "agent.path"),
        ("[agent]\nconnect_timeout = -1\n", "agent.connect_timeout"),
        ("[agent]\nconnect_timeout = 0\n", "agent.connect_timeout"),
        ("[agent]\nconnect_timeout = -inf\n", "agent.connect_timeout"),
        ("[embedded]\nrendezvous_port = 0\n", "embedded.rendezvous_port"),
        ("[embedded]\nrendezvous_port = 65536\n", "embedded.rendezvous_port"),
        ("[embedded]\nrelay_port = -1\n", "embedded.relay_port"),
        ("[embedded]\nrelay_port = 70000\n", "embedded.relay_port"),
        ("[embedded]\nrelay_port = 99999999999999999999\n", "embedded.relay_port"),
    ],
)
def test_unusable_values(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(tmp_path, text)


_BAD_ADDRESSES = ["bad host", "h:0", "h:70000", "h:-1", "h:abc", "[::1", "[nope]:1", "::1::2::3::", "h:1:2", " ", "é:1"]


@pytest.mark.parametrize("value", _BAD_ADDRESSES)
def test_bad_server_and_relay_rejected(tmp_path: Path, value: str) -> None:
    for key in ("server", "relay"):
        _error(tmp_path, f'[agent]\n{key} = "{value}"\n')


@pytest.mark.parametrize("value", [*_BAD_ADDRESSES, "host-without-port", "[::1]"])
def test_bad_allow_target_rejected(tmp_path: Path, value: str) -> None:
    _error(tmp_path, f'[access]\nallow_targets = ["127.0.0.1:22", "{value}"]\n')


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[agent]\nserver = 'bad host'\n", "agent.server"),
        ("[agent]\nrelay = 'h:70000'\n", "agent.relay"),
        ("[access]\nallow_targets = ['h']\n", "access.allow_targets"),
    ],
)
def test_bad_address_message_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[agent]\nnat_test_port = 70000\n", "agent.nat_test_port"),
        ("[agent]\nnat_test_port = -5\n", "agent.nat_test_port"),
        ("[ray]\ngcs_port = 99999\n", "ray.gcs_port"),
        ("[ray]\ngcs_port = -1\n", "ray.gcs_port"),
    ],
)
def test_other_ports_out_of_range(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(tmp_path, text)


@pytest.mark.parametrize("literal", ["nan", "inf", "+nan"])
def test_non_finite_timeout(tmp_path: Path, literal: str) -> None:
    assert "agent.connect_timeout" in _error(tmp_path, f"[agent]\nconnect_timeout = {literal}\n")


@pytest.mark.parametrize("value", ["not a host!", "", "1.2.3.4:5"])
def test_bad_embedded_bind(tmp_path: Path, value: str) -> None:
    assert "embedded.bind" in _error(tmp_path, f'[embedded]\nbind = "{value}"\n')


@pytest.mark.parametrize("value", ["garbage!", "AAAA", "OeVuKk5nlHiXp+APNn0Y3pC1Iwpwn44JGqrQCsWqmB=="])
def test_bad_server_key(tmp_path: Path, value: str) -> None:
    assert "agent.server_key" in _error(tmp_path, f'[agent]\nserver_key = "{value}"\n')


def test_validate_is_also_used_for_in_memory_configs() -> None:
    cfg = Config()
    cfg.agent.path = "nope"
    with pytest.raises(ConfigError, match=r"agent\.path"):
        cfg.validate()
    cfg = Config()
    cfg.access.allow_targets = ["no-port"]
    with pytest.raises(ConfigError):
        cfg.validate()


def test_error_messages_are_configerror_and_valueerror(tmp_path: Path) -> None:
    """Callers catching ValueError (as the CLI's generic paths do) see config errors too."""
    with pytest.raises(ValueError):
        config.load(_write(tmp_path, "[nope]\n"))


def test_loading_does_not_share_mutable_defaults(tmp_path: Path) -> None:
    a = config.load(_write(tmp_path, "[access]\nallow = ['1']\n"))
    a.access.allow.append("2")
    assert Config().access.allow == []
    assert config.load(None).access.allow == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(st.characters(codec="utf-8"), max_size=40))
def test_dump_load_round_trip_any_text(tmp_path: Path, value: str) -> None:
    """Control characters included: dump escapes what a TOML basic string cannot hold raw."""
    cfg = Config()
    cfg.agent.relay_key = value
    cfg.access.allow_targets = []
    cfg.access.password_file = value + '"\\'
    assert config.load(_write(tmp_path, config.dump(cfg))) == cfg


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("", "not a peer ID"),
        ("has space", "not a peer ID"),
        ("1234567890=", "not a key fingerprint"),
        ("1234567890=SHA256:short", "not a key fingerprint"),
        ("1234567890=MD5:" + "A" * 43, "not a key fingerprint"),
        ("x" * 65, "not a peer ID"),
    ],
)
def test_allow_entries_must_be_peer_specs(tmp_path: Path, entry: str, why: str) -> None:
    cfg = Config()
    cfg.access.allow = [entry]
    with pytest.raises(ConfigError, match=f"access.allow: {why}"):
        config.load(_write(tmp_path, config.dump(cfg)))
