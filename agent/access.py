"""Who may connect to this agent: the access policy, built afresh from config and state for each use.

Built for every push and every session (cheap: a config already in memory, two small files), so
an edit of `allowed_peers` or a newly pinned key takes effect at once, without a restart.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.config import Config
from agent.handshake import Policy
from agent.pins import PinStore
from agent.trust import merge, parse_peer_spec, read_allowed_peers

log = logging.getLogger(__name__)


def read_password(cfg: Config) -> str | None:
    """PUNCHTHROUGH_PASSWORD, else the configured password file; never a command-line argument."""
    env = os.environ.get("PUNCHTHROUGH_PASSWORD")
    if env:
        return env
    if cfg.access.password_file:
        text = Path(cfg.access.password_file).read_text().strip()
        return text or None
    return None


def allowed(cfg: Config, state_dir: Path) -> dict[str, str | None]:
    """Allowed peer ID -> the fingerprint its key must have (None: whatever the server binds to it).

    From the config's `access.allow` and the state dir's `allowed_peers` file. A broken file
    admits nobody through it (logged), rather than guessing what it meant."""
    specs = [parse_peer_spec(entry) for entry in cfg.access.allow]
    try:
        specs += read_allowed_peers(state_dir)
    except ValueError as exc:
        log.error("ignoring the allowed_peers file: %s", exc)
    try:
        return merge(specs)
    except ValueError as exc:
        log.error("allow list: %s; admitting no peer by ID", exc)
        return {}


def build_policy(cfg: Config, state_dir: Path) -> Policy | None:
    """Who may connect to us, from the config and the state dir; None when nobody is admitted."""
    password = read_password(cfg)
    entries = allowed(cfg, state_dir)
    if not entries and password is None:
        return None
    pins = PinStore(state_dir)
    pinned = {pid: key for pid in entries if (key := pins.get(pid)) is not None}
    return Policy.of(
        allowed_ids=[pid for pid, fp in entries.items() if fp is None],
        pinned_keys=pinned,
        password=password,
        allowed_targets=cfg.access.allow_targets,
        allowed_keys={pid: fp for pid, fp in entries.items() if fp is not None},
    )
