"""The agent's config as it is on disk now: `punchthrough allow`, `revoke`, `allow-target` and
`revoke-target` edit STATE_DIR/config.toml, and a running agent sees the change at its next session.

Only the [access] section acts live (who may connect and where to); a changed server, port or path
policy applies at the next `up`. A file that stops parsing is logged and the last good config kept,
so a half-written edit never opens or closes the door by accident.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent import config as configmod
from agent.config import Config, ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"


class LiveConfig:
    def __init__(self, state_dir: Path, current: Config) -> None:
        self.path = state_dir / CONFIG_FILE
        self._cfg = current
        self._stamp = self._mtime()

    def _mtime(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return 0

    def get(self) -> Config:
        stamp = self._mtime()
        if stamp and stamp != self._stamp:
            self._stamp = stamp
            try:
                self._cfg = configmod.load(self.path)
            except ConfigError as exc:
                log.error("keeping the previous config: %s", exc)
        return self._cfg
