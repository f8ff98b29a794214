"""Where the agent's logs go and how big they may grow, in one place (the actors, `up` and ops read it).

Each component writes STATE_DIR/logs/KIND.log, rotated at LOG_MAX_BYTES with LOG_BACKUPS old files
kept (KIND.log.1 ...), so one component never holds more than (1 + LOG_BACKUPS) x LOG_MAX_BYTES on
disk, however long the agent runs. The supervisor's own agent.log is rotated the same way when `up`
starts it in the background. Under systemd (the `service` units) the supervisor logs to the journal.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path
from typing import Any

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 2
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """Every file it opens, the first and each after a rotation, is 0600 whatever the umask."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def component_handler(path: Path) -> logging.Handler:
    """A size-capped, rotating handler for one component's log (0600: it names peers and keys)."""
    handler = _PrivateRotatingHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def rotate_if_full(path: Path) -> None:
    """Before appending to a log that another process writes by plain appends (agent.log, the
    supervisor's stdout): move a full one aside as the handler would."""
    try:
        if path.stat().st_size < LOG_MAX_BYTES:
            return
    except FileNotFoundError:
        return
    for i in range(LOG_BACKUPS, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        newer = path.with_name(f"{path.name}.{i - 1}") if i > 1 else path
        if newer.exists():
            os.replace(newer, older)


def inventory(logs: Path) -> list[dict[str, Any]]:
    """Every log file in `logs`, with its size: what `punchthrough-ops logs` shows."""
    if not logs.is_dir():
        return []
    out = []
    for path in sorted(logs.iterdir()):
        if path.is_file():
            out.append({"file": str(path), "bytes": path.stat().st_size})
    return out
