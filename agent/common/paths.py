"""Where an agent or server keeps its state: one directory, picked by flag or environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

STATE_ENV = "PUNCHTHROUGH_STATE_DIR"
_SHOWN = "~/.local/state/punchthrough"


def default_state_dir() -> Path:
    """`$PUNCHTHROUGH_STATE_DIR`, else `$XDG_STATE_HOME/punchthrough`, else `~/.local/state/punchthrough`."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "punchthrough"


def add_anywhere(p: argparse.ArgumentParser, top: bool, *flags: str, **options: Any) -> None:
    """An option the user may give before the subcommand (`top`: it holds the default) or after it
    (on each subcommand, where leaving it out must not reset what was given before)."""
    import argparse  # here, not at the top: `pipe`'s fast start (agent/entry.py) needs only the default

    p.add_argument(*flags, **(options if top else {**options, "default": argparse.SUPPRESS}))


def add_state_dir(p: argparse.ArgumentParser, top: bool) -> None:
    add_anywhere(
        p, top, "--state-dir", type=Path, default=None, help=f"state directory (env {STATE_ENV}; default {_SHOWN})"
    )
