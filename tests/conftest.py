"""Shared test helpers: vector loading and free loopback ports."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).parent / "vectors"

# A run started in the background (`cmd &` in a shell without job control, as CI runners and nohup
# do) inherits SIGINT ignored, and so would every CLI a test starts and then stops with SIGINT as a
# user's Ctrl-C: `connect -L` would never see it. A handler here makes the children start with the
# default disposition again (exec resets handled signals, not ignored ones).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())
