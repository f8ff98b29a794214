"""The README's command table says what `--help` says: every subcommand of `punchthrough` and
`punchthrough-ops` has a row, and the row names every option the parser takes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from agent import cli
from ops import cli as ops_cli

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
COMMON = {"--help", "--state-dir", "--verbose", "--json"}
"""Taken by every command and said once under the table."""


def rows(prog: str) -> dict[str, str]:
    """Each table row whose first cell starts with `prog SUBCOMMAND` (alternatives like a|b both count)."""
    out: dict[str, str] = {}
    for line in README.splitlines():
        m = re.match(rf"\| `{re.escape(prog)} ([^`]*)`", line)
        if not m:
            continue
        first = m.group(1).split()[0] if m.group(1).split() else ""
        for name in re.split(r"\\\\?\|", first):
            out.setdefault(name, "")
            out[name] += line
        for alt in re.findall(rf"/ `(?:{re.escape(prog)} )?([a-z-]+)", line):  # "allow PEER` / `revoke ID"
            out.setdefault(alt, "")
            out[alt] += line
    return out


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


CASES = [("punchthrough", name, p) for name, p in subparsers(cli.build_parser()).items()] + [
    ("punchthrough-ops", name, p) for name, p in subparsers(ops_cli.build_parser()).items()
]


@pytest.mark.parametrize(("prog", "name", "parser"), CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_every_command_and_option_is_in_the_readme_table(prog: str, name: str, parser: argparse.ArgumentParser) -> None:
    table = rows(prog)
    assert name in table, f"`{prog} {name}` has no row in the README's command table"
    row = table[name]
    missing = [
        opt
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt not in COMMON and action.help != argparse.SUPPRESS
        and not any(o in row for o in action.option_strings)
    ]
    assert not missing, f"`{prog} {name}`: {missing} not in its README row"
