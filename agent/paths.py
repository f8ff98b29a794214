"""Where an agent or server keeps its state: one directory, picked by flag or environment."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "PUNCHTHROUGH_STATE_DIR"


def default_state_dir() -> Path:
    """`$PUNCHTHROUGH_STATE_DIR`, else `$XDG_STATE_HOME/punchthrough`, else `~/.local/state/punchthrough`."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "punchthrough"
