"""Both CLIs, in-process: every user mistake is one line on stderr and a non-zero status, never a traceback.

`up` is only ever run here with input that must be refused; as a safety net its
state dir holds a damaged key, so an `up` that wrongly accepts its input stops at
loading the identity (and the test fails on the message) instead of starting an agent.
"""

from __future__ import annotations

import base64
import json
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from agent import cli, config
from agent.config import Config
from agent.identity import KEY_FILE, load_or_create
from ops import cli as ops_cli

Main = Callable[[Sequence[str] | None], int]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may read or write the real state dir or pick up a password from the environment."""
    monkeypatch.setenv("PUNCHTHROUGH_STATE_DIR", str(tmp_path / "default-state"))
    monkeypatch.delenv("PUNCHTHROUGH_PASSWORD", raising=False)


def run(main: Main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit status, stdout, stderr, as the process would have them (SystemExit included)."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            rc = 1
        else:
            rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, prog: str = "punchthrough", statuses: tuple[int, ...] = (2,)) -> str:
    assert rc in statuses, (rc, err)
    assert err.endswith("\n") and err.count("\n") == 1, f"want exactly one line on stderr, got {err!r}"
    assert err.startswith(prog + ": ") or err.startswith(prog + " "), err
    assert "Traceback" not in err
    return err.strip()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "files"
    d.mkdir()
    out = {
        "missing": d / "missing",
        "dir": d / "a-directory",
        "empty": d / "empty",
        "blank": d / "blank",
        "binary": d / "binary",
        "good": d / "password",
    }
    out["dir"].mkdir()
    out["empty"].write_text("")
    out["blank"].write_text("  \n\t\n")
    out["binary"].write_bytes(b"\xff\xfe\x80password")
    out["good"].write_text("correct horse\n")
    return out


@pytest.fixture
def guarded_state(tmp_path: Path) -> Path:
    state = tmp_path / "guarded"
    state.mkdir()
    (state / KEY_FILE).write_text("SAFETY-NET: not a key\n")
    return state


# ---- parser-level errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["--bogus", "id"],
        ["id", "--bogus"],
        ["id", "extra"],
        ["--state-dir"],
        ["rendezvous", "--port", "70000"],
        ["rendezvous", "--port", "65536"],
        ["rendezvous", "--port", "-1"],
        ["rendezvous", "--port", "abc"],
        ["rendezvous", "--port", ""],
        ["rendezvous", "--port", "1e3"],
        ["rendezvous", "--port", "0x50"],
        ["rendezvous", "--port", " 80"],
        ["rendezvous", "--port", "³"],
        ["rendezvous", "--port", "9" * 5000],
        ["rendezvous", "--port"],
        ["rendezvous", "--relay", "nohost"],
        ["rendezvous", "--relay", "h:70000"],
        ["rendezvous", "--relay", "[::1"],
        ["relay", "--port", "99999"],
        ["relay", "--replicas", "abc"],
        ["relay", "--replicas", "0"],
        ["relay", "--replicas", "-3"],
        ["relay", "--stream-limit", "-1"],
        ["relay", "--stream-limit", "fast"],
        ["relay", "--total-limit", "-0.5"],
        ["serve", "--port", "70000"],
        ["serve", "--port", "-1"],
        ["connect", "123"],
        ["connect", "-L", "8080:h:22"],
        ["connect", "123", "-L"],
        ["connect", "123", "-L", "8080:h:22", "--timeout", "-1"],
        ["connect", "123", "-L", "8080:h:22", "--timeout", "soon"],
        ["connect", "123", "-L", "8080:h:22", "--timeout", "nan"],
        ["pipe", "123", "h:22", "--timeout", "inf"],
        ["relay", "--stream-limit", "nan"],
        ["serve", "--port", "65535"],
        ["rendezvous", "--port", "\uff18\uff10"],
        ["connect", "123", "-L", "8080:h:22", "--path", "fast"],
        ["pipe", "123"],
        ["pipe", "123", "nohost"],
        ["pipe", "123", "h:0"],
        ["pipe", "123", "h:70000"],
        ["pipe", "123", "bad host:22"],
        ["pipe", "123", "[::1]"],
        ["pipe", "123", "h:22", "--path", "x"],
        ["pipe", "123", "h:22", "--timeout", "x"],
        ["up", "--server", "bad host"],
        ["up", "--server", "h:0"],
        ["up", "--server", "h:70000"],
        ["up", "--server", ""],
        ["up", "--relay", "h:-1"],
        ["up", "--relay", "[zz]:1"],
        ["up", "--allow-target", "h"],
        ["up", "--allow-target", "h:22", "--allow-target", "x:y"],
        ["up", "--path", "fast"],
        ["up", "--placement", "packed"],
        ["up", "--placement", ""],
        ["config", "--bogus"],
    ],
)
def test_bad_arguments(argv: list[str], guarded_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(
        cli.main, ["--state-dir", str(guarded_state), *argv] if argv[:1] != ["--state-dir"] else argv, capsys
    )
    message = assert_one_line_error(rc, err)
    assert "SAFETY-NET" not in message and "id_ed25519" not in message, message
    assert out == ""


def test_huge_argument_error_is_one_line(guarded_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(cli.main, ["--state-dir", str(guarded_state), "pipe", "123", "\n".join(["h"] * 1000)], capsys)
    assert_one_line_error(rc, err)


@pytest.mark.parametrize("text", ["\u0663", "\uff13", "\u0668\u0660"])
def test_port_rejects_non_ascii_digits(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        cli._port(text)


# ---- files named on the command line ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "dir", "empty", "blank"])
@pytest.mark.parametrize("command", ["connect", "pipe"])
def test_client_password_file_unusable(
    command: str, kind: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["-L", "8080:h:22"] if command == "connect" else ["h:22"]
    argv = ["--state-dir", str(tmp_path / "s"), command, "1234567890", *target, "--password-file", str(files[kind])]
    rc, _, err = run(cli.main, argv, capsys)
    message = assert_one_line_error(rc, err)
    assert "--password-file" in message and str(files[kind]) in message


@pytest.mark.parametrize("command", ["connect", "pipe"])
def test_client_password_file_binary(
    command: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["-L", "8080:h:22"] if command == "connect" else ["h:22"]
    argv = ["--state-dir", str(tmp_path / "s"), command, "1", *target, "--password-file", str(files["binary"])]
    rc, _, err = run(cli.main, argv, capsys)
    assert "--password-file" in assert_one_line_error(rc, err)


@pytest.mark.parametrize("kind", ["missing", "dir"])
def test_up_password_file_unusable(
    kind: str, files: dict[str, Path], guarded_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(cli.main, ["--state-dir", str(guarded_state), "up", "--password-file", str(files[kind])], capsys)
    message = assert_one_line_error(rc, err)
    assert "--password-file" in message and "SAFETY-NET" not in message


@pytest.mark.parametrize("kind", ["empty", "blank", "binary"])
def test_up_password_file_empty_or_binary(
    kind: str, files: dict[str, Path], guarded_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(cli.main, ["--state-dir", str(guarded_state), "up", "--password-file", str(files[kind])], capsys)
    assert "--password-file" in assert_one_line_error(rc, err)


def test_up_config_password_file_missing(
    tmp_path: Path, files: dict[str, Path], guarded_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[access]\npassword_file = "{files["missing"]}"\n')
    rc, _, err = run(cli.main, ["--state-dir", str(guarded_state), "up", "--config", str(cfg)], capsys)
    message = assert_one_line_error(rc, err)
    assert KEY_FILE not in message and str(files["missing"]) in message


@pytest.mark.parametrize("kind", ["dir", "empty", "binary"])
def test_up_config_password_file_unusable(
    kind: str, tmp_path: Path, files: dict[str, Path], guarded_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[access]\npassword_file = "{files[kind]}"\n')
    rc, _, err = run(cli.main, ["--state-dir", str(guarded_state), "up", "--config", str(cfg)], capsys)
    message = assert_one_line_error(rc, err)
    assert "access.password_file" in message and str(files[kind]) in message and "SAFETY-NET" not in message


@pytest.mark.parametrize(
    "text",
    [
        "[agent\n",
        "[agent]\nservre = 'x'\n",
        "[agent]\npath = 'fast'\n",
        "[agent]\nconnect_timeout = -1\n",
        "[embedded]\nrelay_port = 70000\n",
        "[access]\nallow_targets = ['nohost']\n",
        "[agent]\nserver = 'bad host'\n",
        "\xff",
    ],
)
@pytest.mark.parametrize("command", ["up", "config"])
def test_config_file_with_errors(
    command: str, text: str, tmp_path: Path, guarded_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_bytes(text.encode("latin-1"))
    rc, out, err = run(cli.main, ["--state-dir", str(guarded_state), command, "--config", str(cfg)], capsys)
    message = assert_one_line_error(rc, err)
    assert "SAFETY-NET" not in message and out == ""


@pytest.mark.parametrize("kind", ["missing", "dir"])
@pytest.mark.parametrize("command", ["up", "config"])
def test_config_file_unreadable(
    command: str, kind: str, files: dict[str, Path], guarded_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(cli.main, ["--state-dir", str(guarded_state), command, "--config", str(files[kind])], capsys)
    assert str(files[kind]) in assert_one_line_error(rc, err)


def test_up_flag_overrides_are_validated_against_the_file(
    tmp_path: Path, guarded_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid file plus a valid flag still passes through validate(); here the file is the bad part."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[agent]\nconnect_timeout = 0\n")
    rc, _, err = run(
        cli.main, ["--state-dir", str(guarded_state), "up", "--config", str(cfg), "--server", "h:1"], capsys
    )
    assert "connect_timeout" in assert_one_line_error(rc, err)


def test_relay_key_file_missing(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(cli.main, ["relay", "--port", "0", "--key-file", str(files["missing"])], capsys)
    assert str(files["missing"]) in assert_one_line_error(rc, err)


def test_relay_key_file_empty(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """An empty key file would mean "no key required": refused, as empty password files are."""
    rc, _, err = run(cli.main, ["relay", "--port", "0", "--key-file", str(files["blank"])], capsys)
    assert "--key-file" in assert_one_line_error(rc, err)


def test_relay_key_file_binary(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(cli.main, ["relay", "--port", "0", "--key-file", str(files["binary"])], capsys)
    assert "--key-file" in assert_one_line_error(rc, err)


# ---- runtime failures that need no running agent ---------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["pipe", "1234567890", "127.0.0.1:22"],
        ["connect", "1234567890", "-L", "12345:127.0.0.1:22"],  # refuses at once instead of listening for nothing
    ],
)
def test_no_agent_running(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    rc, _, err = run(cli.main, ["--state-dir", str(state), *argv], capsys)
    message = assert_one_line_error(rc, err, statuses=(1, 2))
    assert "no agent running" in message and str(state) in message and "punchthrough up" in message


def test_down_is_idempotent_and_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):
        assert run(cli.main, ["--state-dir", str(tmp_path / "s"), "down"], capsys) == (0, "", "")


def test_global_options_also_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    rc, out, _ = run(cli.main, ["id", "--state-dir", str(state)], capsys)
    assert rc == 0 and (state / "id_ed25519").exists()
    assert run(cli.main, ["--state-dir", str(state), "id"], capsys)[1] == out
    assert run(cli.main, ["--state-dir", str(tmp_path / "other"), "id", "--state-dir", str(state)], capsys)[1] == out


def test_allow_revoke_and_targets_edit_the_config_a_running_agent_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.control.access import load_state_config
    from agent.control.pins import PinStore
    from agent.wire.peer_ids import fingerprint

    state = tmp_path / "s"
    spec = f"1234567890={fingerprint(bytes(32))}"
    rc, out, _ = run(cli.main, ["--state-dir", str(state), "allow", "1234567890"], capsys)
    assert rc == 0 and "allowed 1234567890" in out
    assert run(cli.main, ["--state-dir", str(state), "allow", spec], capsys)[0] == 0  # the key named replaces it
    assert run(cli.main, ["allow-target", "127.0.0.1:22", "--state-dir", str(state)], capsys)[0] == 0
    cfg = load_state_config(state)
    assert (cfg.access.allow, cfg.access.allow_targets) == ([spec], ["127.0.0.1:22"])
    PinStore(state).check_and_pin("1234567890", bytes(32))
    rc, out, _ = run(cli.main, ["--state-dir", str(state), "revoke", "1234567890"], capsys)
    assert rc == 0 and "forgot its pinned key" in out
    assert load_state_config(state).access.allow == [] and PinStore(state).get("1234567890") is None
    assert "was not allowed" in run(cli.main, ["--state-dir", str(state), "revoke", "1234567890"], capsys)[1]
    assert run(cli.main, ["--state-dir", str(state), "revoke-target", "127.0.0.1:22"], capsys)[0] == 0
    assert load_state_config(state).access.allow_targets == []
    for bad in (["allow", "not an id"], ["allow", "1=SHA256:short"], ["allow-target", "nohostport"]):
        rc, _, err = run(cli.main, ["--state-dir", str(state), *bad], capsys)
        assert_one_line_error(rc, err)


def test_allow_catches_the_typos_of_a_hand_typed_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The walk-through: `allow 81751O1709` (letter O) and a wrong digit before a real key were taken silently."""
    from agent.control.access import load_state_config
    from agent.wire.peer_ids import fingerprint

    state = tmp_path / "s"
    rc, _, err = run(cli.main, ["--state-dir", str(state), "allow", "81751O1709"], capsys)
    assert "'81751O1709' is not an agent ID: they are 10 digits" in assert_one_line_error(rc, err)
    key = fingerprint(bytes(32))
    assert run(cli.main, ["--state-dir", str(state), "allow", f"8175101709={key}"], capsys)[0] == 0
    rc, out, _ = run(cli.main, ["--state-dir", str(state), "allow", f"8175101708={key}"], capsys)
    assert rc == 0 and "note: this key is known here as peer 8175101709: is the ID right?" in out
    assert len(load_state_config(state).access.allow) == 2  # said, not refused: one key may have two IDs


def test_peers_lists_allowed_pinned_and_seen_and_forgets_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json as jsonmod
    import time

    from agent.control.pins import PinStore
    from agent.session.seen import SeenPeers
    from agent.wire.peer_ids import fingerprint

    state = tmp_path / "s"
    assert run(cli.main, ["--state-dir", str(state), "peers"], capsys)[1].startswith("no peers yet")
    run(cli.main, ["--state-dir", str(state), "allow", "1111111111"], capsys)
    PinStore(state).check_and_pin("1111111111", bytes(32))
    seen = SeenPeers(state)
    seen.note("2222222222", "tcp_punch", "initiator", fingerprint(b"k" * 32))
    seen.flush()
    rc, out, _ = run(cli.main, ["--state-dir", str(state), "peers", "--json"], capsys)
    rows = {r["id"]: r for r in jsonmod.loads(out)}
    assert rows["1111111111"]["allowed"] == "by ID" and rows["1111111111"]["pinned"]
    assert rows["1111111111"]["key"] == fingerprint(bytes(32))
    assert rows["2222222222"]["allowed"] == "no" and rows["2222222222"]["last_path"] == "tcp_punch"
    assert time.time() - rows["2222222222"]["last_seen"] < 60
    table = run(cli.main, ["--state-dir", str(state), "peers"], capsys)[1]
    assert "via tcp_punch (initiator)" in table and "never" in table
    rc, out, _ = run(cli.main, ["--state-dir", str(state), "peers", "--forget", "1111111111"], capsys)
    assert "forgot the key pinned for 1111111111" in out and rc == 0 and PinStore(state).get("1111111111") is None


@pytest.mark.parametrize(
    "spec",
    ["junk", "8080", "0:h:22", "70000:h:22", "8080:h:0", "8080:[::1:22", "8080:bad host:22", "[nope]]:1:h:22"],
)
def test_connect_bad_forward_spec(spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(cli.main, ["--state-dir", str(tmp_path / "s"), "connect", "123", "-L", spec], capsys)
    assert_one_line_error(rc, err)


def test_rendezvous_cannot_bind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """192.0.2.1 (TEST-NET-1) is on no interface: bind fails at once, no packet is sent."""
    argv = ["--state-dir", str(tmp_path / "s"), "rendezvous", "--bind", "192.0.2.1", "--port", "0"]
    rc, _, err = run(cli.main, argv, capsys)
    assert "192.0.2.1" in assert_one_line_error(rc, err, statuses=(1, 2))


def test_serve_cannot_bind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--state-dir", str(tmp_path / "s"), "serve", "--bind", "192.0.2.1", "--port", "0"]
    rc, _, err = run(cli.main, argv, capsys)
    assert "192.0.2.1" in assert_one_line_error(rc, err, statuses=(1, 2))


def test_relay_cannot_bind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--state-dir", str(tmp_path / "s"), "relay", "--bind", "192.0.2.1", "--port", "0", "--open"]
    rc, _, err = run(cli.main, argv, capsys)
    assert "192.0.2.1" in assert_one_line_error(rc, err, statuses=(1, 2))


def test_relay_bind_node_needs_a_ray_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--state-dir", str(tmp_path / "s"), "relay", "--bind", "node", "--port", "0", "--open"]
    rc, _, err = run(cli.main, argv, capsys)
    assert "--replicas or --ray-address" in assert_one_line_error(rc, err)


def test_relay_needs_the_rendezvous_servers_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a server key (flag, file, or one in its state dir) the relay would pair anyone: it refuses to start."""
    argv = ["--state-dir", str(tmp_path / "s"), "relay", "--bind", "192.0.2.1", "--port", "0"]
    rc, _, err = run(cli.main, argv, capsys)
    assert "--server-key-file" in assert_one_line_error(rc, err)
    for bad in (["--server-key", "nope"], ["--server-key-file", str(tmp_path / "missing")]):
        rc, _, err = run(cli.main, argv + bad, capsys)
        assert_one_line_error(rc, err)


def test_serve_port_leaves_no_room_for_relay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(Bound to TEST-NET so nothing is ever listening: today the bind fails first; the fix refuses the flag.)"""
    argv = ["--state-dir", str(tmp_path / "s"), "serve", "--bind", "192.0.2.1", "--port", "65535"]
    rc, _, err = run(cli.main, argv, capsys)
    message = assert_one_line_error(rc, err, statuses=(2,))
    assert "--port" in message and "cannot bind" not in message


# ---- identity from the command line --------------------------------------------------------------


def test_id_creates_and_is_stable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    rc, out, err = run(cli.main, ["--state-dir", str(state), "id"], capsys)
    assert rc == 0 and err == ""
    ident = load_or_create(state)
    assert out == f"{ident.peer_id}={ident.fingerprint}\n"  # the string a peer allows, as is
    assert run(cli.main, ["--state-dir", str(state), "id"], capsys)[1] == out


def test_id_json_stable_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    rc, out, err = run(cli.main, ["--state-dir", str(state), "id", "--json"], capsys)
    assert rc == 0 and err == "" and out.count("\n") == 1
    data = json.loads(out)
    assert set(data) == {"id", "fingerprint", "public_key", "peer_spec"}
    ident = load_or_create(state)
    assert data == {
        "id": ident.peer_id,
        "fingerprint": ident.fingerprint,
        "public_key": base64.b64encode(ident.public_key).decode(),
        "peer_spec": f"{ident.peer_id}={ident.fingerprint}",
    }


def test_id_uses_state_dir_from_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(cli.main, ["id", "--json"], capsys)
    assert rc == 0
    assert json.loads(out)["id"] == load_or_create(tmp_path / "default-state").peer_id


@pytest.mark.parametrize("content", [b"garbage!", b"", b"AAAA", b"A" * 100_000])
def test_id_with_damaged_key(content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    state.mkdir()
    (state / KEY_FILE).write_bytes(content)
    rc, out, err = run(cli.main, ["--state-dir", str(state), "id"], capsys)
    assert str(state / KEY_FILE) in assert_one_line_error(rc, err) and out == ""
    assert (state / KEY_FILE).read_bytes() == content  # never replaced


def test_id_with_binary_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    state.mkdir()
    (state / KEY_FILE).write_bytes(b"\xff\xfe\x00")
    rc, _, err = run(cli.main, ["--state-dir", str(state), "id"], capsys)
    assert KEY_FILE in assert_one_line_error(rc, err)


def test_id_state_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    state.write_text("not a dir")
    rc, _, err = run(cli.main, ["--state-dir", str(state), "id"], capsys)
    assert str(state) in assert_one_line_error(rc, err)


# ---- config ----------------------------------------------------------------------------------------


def test_config_prints_the_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(cli.main, ["config", "--state-dir", str(tmp_path)], capsys)
    assert rc == 0 and err == ""
    assert out == config.dump(Config())
    tomllib.loads(out)


def test_config_shows_what_the_agent_runs_with(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not the defaults: the walk-through's A saw `server = ""` while its config.toml named B."""
    (tmp_path / "config.toml").write_text("[agent]\nserver = '10.88.0.1'\n")
    rc, out, _ = run(cli.main, ["config", "--state-dir", str(tmp_path)], capsys)
    assert rc == 0 and tomllib.loads(out)["agent"]["server"] == "10.88.0.1"
    assert tomllib.loads(out)["embedded"]["relay_port"] == 21117


def test_config_output_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(cli.main, ["config", "--state-dir", str(tmp_path / "empty")], capsys)[1]
    path = tmp_path / "agent.toml"
    path.write_text(out)
    assert config.load(path) == Config()


def test_config_of_a_file_prints_it_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\nserver = 'rv.example:21116'\npath = 'relay'\n")
    rc, out, err = run(cli.main, ["config", "--config", str(path)], capsys)
    assert rc == 0 and err == ""
    data = tomllib.loads(out)
    assert data["agent"]["server"] == "rv.example:21116" and data["agent"]["path"] == "relay"
    assert data["embedded"]["relay_port"] == 21117  # defaults filled in


# ---- punchthrough-ops without an agent -------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["status", "extra"], ["status", "--bogus"], ["--state-dir"], ["--json"], ["STATUS"]],
)
def test_ops_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(ops_cli.main, argv, capsys)
    assert_one_line_error(rc, err, prog="punchthrough-ops")
    assert out == ""


@pytest.mark.parametrize("command", list(ops_cli.COMMANDS))
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_ops_no_agent(command: str, json_flag: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    rc, out, err = run(ops_cli.main, ["--state-dir", str(state), command, *json_flag], capsys)
    message = assert_one_line_error(rc, err, prog="punchthrough-ops", statuses=(1, 2))
    assert "no agent running" in message and str(state) in message and out == ""


def test_ops_state_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    state.write_text("x")
    rc, _, err = run(ops_cli.main, ["--state-dir", str(state), "status"], capsys)
    assert_one_line_error(rc, err, prog="punchthrough-ops", statuses=(1, 2))


def test_ops_uses_state_dir_from_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(ops_cli.main, ["status"], capsys)
    assert str(tmp_path / "default-state") in assert_one_line_error(rc, err, prog="punchthrough-ops", statuses=(1, 2))


def test_up_flags_merge_into_the_config_the_user_owns(tmp_path: Path) -> None:
    """A later `up --allow-target X` alone keeps who was allowed (it used to reset `allow = []`)."""
    from agent.config import Config
    from agent.control.access import save_state_config

    state = tmp_path / "s"
    state.mkdir()
    cfg = Config()
    cfg.access.allow = ["1111111111"]
    cfg.agent.server = "rv.example:21116"
    save_state_config(state, cfg)
    args = cli.build_parser().parse_args(["up", "--allow-target", "127.0.0.1:22", "--allow", "2222222222"])
    merged = cli._effective_config(args, state)
    assert merged.access.allow == ["1111111111", "2222222222"]
    assert merged.access.allow_targets == ["127.0.0.1:22"]
    assert merged.agent.server == "rv.example:21116"  # kept; a flag would set it
    assert merged.ray.placement == "isolated"


def test_every_up_flag_sets_its_key(tmp_path: Path) -> None:
    """The flags that set one config key each (cli.UP_FLAG_KEYS): each given flag lands in its key."""
    argv = ["up", "--server", "rv.example:1", "--server-key", "A" * 43 + "=", "--relay", "rl.example:2", "--path",
            "relay-only", "--direct-port", "21118", "--placement", "grouped"]
    cfg = cli._effective_config(cli.build_parser().parse_args(argv), tmp_path)
    assert (cfg.agent.server, cfg.agent.server_key, cfg.agent.relay) == ("rv.example:1", "A" * 43 + "=", "rl.example:2")
    assert (cfg.agent.path, cfg.agent.direct_port, cfg.ray.placement) == ("relay-only", 21118, "grouped")
    assert set(cli.UP_FLAG_KEYS) == {"server", "server_key", "relay", "path", "direct_port", "placement"}


@pytest.mark.parametrize(
    ("addresses", "hint"),
    [
        (["127.0.0.1", "192.0.2.2", "fe80::1%eth0", "fd00::2"], "192.0.2.2"),
        (["10.0.0.2", "192.168.1.5"], "<one of 10.0.0.2, 192.168.1.5>"),
        (["127.0.0.1", "::1"], "<this host's address>"),
    ],
)
def test_up_names_the_address_peers_would_use(addresses: list[str], hint: str) -> None:
    """The walk-through: `up` printed a literal `<this host's address>` on a host with one address."""
    from agent.runner import host_address_hint

    assert host_address_hint(addresses) == hint
