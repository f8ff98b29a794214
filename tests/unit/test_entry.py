"""The console script's fast path for `pipe` and `connect` (agent/entry.py): what it takes itself,
what it leaves to the full CLI, and that it imports none of the heavy machinery."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.entry import ClientArgs, parse_client


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["pipe", "1234567890", "127.0.0.1:22"], ClientArgs("pipe", "1234567890", "127.0.0.1:22", [], None, 30.0)),
        (
            ["--state-dir", "/s", "-v", "pipe", "1234567890", "[::1]:22", "--timeout=5"],
            ClientArgs("pipe", "1234567890", "[::1]:22", [], "/s", 5.0),
        ),
        (
            ["pipe", "--state-dir=/s", "ID=SHA256:x", "h:22", "--timeout", "2.5"],
            ClientArgs("pipe", "ID=SHA256:x", "h:22", [], "/s", 2.5),
        ),
        (
            ["connect", "1234567890", "-L", "8080:127.0.0.1:80", "-L9090:h:90"],
            ClientArgs("connect", "1234567890", "", ["8080:127.0.0.1:80", "9090:h:90"], None, 30.0),
        ),
    ],
)
def test_the_common_forms_are_read_here(argv: list[str], expected: ClientArgs) -> None:
    assert parse_client(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["up"],
        ["id", "--json"],
        ["pipe", "--help"],
        ["pipe", "1234567890"],
        ["pipe", "1234567890", "h:22", "extra"],
        ["pipe", "1234567890", "h:22", "--path", "relay"],
        ["pipe", "1234567890", "h:22", "--password-file", "/p"],
        ["pipe", "1234567890", "h:22", "--timeout"],
        ["pipe", "1234567890", "h:22", "--timeout", "soon"],
        ["pipe", "1234567890", "h:22", "--timeout", "-1"],
        ["pipe", "1234567890", "h:22", "--timeout", "inf"],
        ["pipe", "1234567890", "h:22", "--state-dir"],
        ["pipe", "1234567890", "h:22", "-L", "1:h:2"],
        ["connect", "1234567890"],
        ["connect", "1234567890", "-L"],
        ["connect", "-L", "1:h:2"],
        ["--", "pipe", "1234567890", "h:22"],
        ["pipe", "1234567890", "h:22", "-x"],
    ],
)
def test_everything_else_goes_to_the_full_cli(argv: list[str]) -> None:
    """None means agent/cli.py parses it: the same result, or the same one-line error, only slower."""
    assert parse_client(argv) is None


def test_the_client_path_imports_nothing_heavy() -> None:
    """What the fast path would import for `pipe` (it stops short of talking to an agent): no asyncio,
    no argparse, no protobuf, no crypto, no Ray. Checked by module name, not by a clock."""
    code = (
        "import sys, agent.entry as e\n"
        "assert e.parse_client(['pipe', '1234567890', '127.0.0.1:22']) is not None\n"
        "import agent.client, agent.common.paths, agent.wire.addr\n"
        "heavy = ('asyncio', 'argparse', 'google', 'nacl', 'ray', 'agent.config', 'agent.cli', 'psutil')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
