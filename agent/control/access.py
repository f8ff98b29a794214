"""Who may connect to this agent: the access policy, built afresh from config and state for each use,
and the edits `punchthrough allow`, `revoke`, `allow-target`, `revoke-target` and `peers` make.

Built for every push and every session (cheap: the config as last read, two small files), so an
edit of the config's [access] section or of `allowed_peers`, or a newly pinned key, takes effect at
once, without a restart (agent/control/live_config.py).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from agent import config as configmod
from agent.common.files import write_private
from agent.config import Config
from agent.control.live_config import CONFIG_FILE
from agent.control.pins import PinStore
from agent.session.seen import load as seen_table
from agent.wire.handshake import Policy
from agent.wire.peer_ids import PeerSpec, fingerprint, parse_peer_spec

log = logging.getLogger(__name__)


ALLOWED_PEERS_FILE = "allowed_peers"
"""In the state dir: one peer spec per line (`ID` or `ID=SHA256:...`), `#` comments. Read at every
session, so an edit takes effect without a restart."""
MAX_ALLOWED_PEERS_BYTES = 1 << 20


def line_spec(line: str) -> str:
    """The peer spec a line of an allowed_peers file holds ("" for a blank or comment line)."""
    words = line.split("#", 1)[0].split()
    return words[0] if words else ""


def parse_allowed_peers(text: str, where: str) -> list[PeerSpec]:
    """Lines of an allowed_peers file; ValueError naming `where:line` for the first bad one."""
    out: list[PeerSpec] = []
    for number, raw in enumerate(text.splitlines(), 1):
        spec = line_spec(raw)
        if not spec:
            continue
        try:
            out.append(parse_peer_spec(spec))
        except ValueError as exc:
            raise ValueError(f"{where}:{number}: {exc}") from None
    return out


def read_allowed_peers(state_dir: Path) -> list[PeerSpec]:
    """The state dir's allowed_peers file ([] when there is none); ValueError if it is unusable."""
    path = state_dir / ALLOWED_PEERS_FILE
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ALLOWED_PEERS_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_ALLOWED_PEERS_BYTES:
        raise ValueError(f"{path} is larger than {MAX_ALLOWED_PEERS_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return parse_allowed_peers(text, str(path))


def merge(specs: list[PeerSpec]) -> dict[str, str | None]:
    """ID -> fingerprint (None for a bare ID). A fingerprint named anywhere wins over a bare entry;
    two different fingerprints for one ID are a mistake worth refusing."""
    out: dict[str, str | None] = {}
    for spec in specs:
        have = out.get(spec.peer_id)
        if have is not None and spec.fingerprint is not None and have != spec.fingerprint:
            raise ValueError(f"peer {spec.peer_id} is allowed with two different keys ({have}, {spec.fingerprint})")
        out[spec.peer_id] = spec.fingerprint or have
    return out


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


# --------------------------------------------------------------------------- editing who may connect


def load_state_config(state_dir: Path) -> Config:
    """STATE_DIR/config.toml, the config the user owns (`up` flags and these edits land there)."""
    path = state_dir / CONFIG_FILE
    return configmod.load(path if path.exists() else None)


def save_state_config(state_dir: Path, cfg: Config) -> None:
    cfg.validate()
    write_private(state_dir / CONFIG_FILE, configmod.dump(cfg).encode())


def add_allow(entries: list[str], spec: PeerSpec) -> list[str]:
    """`entries` with `spec` in, replacing an entry for the same ID (a key named now wins)."""
    kept = [e for e in entries if parse_peer_spec(e).peer_id != spec.peer_id]
    return [*kept, str(spec)]


def allow_peer(state_dir: Path, text: str) -> str:
    """`punchthrough allow`: stricter than the config (a typed ID is checked against what agent IDs look
    like, and a key already known under another ID is pointed out), because it is typed by hand."""
    spec = parse_peer_spec(text)
    if not AGENT_ID.fullmatch(spec.peer_id):
        raise ValueError(
            f"{spec.peer_id!r} is not an agent ID: they are 10 digits, as `punchthrough id` prints them on the peer"
        )
    elsewhere = [p["id"] for p in known_peers(state_dir) if spec.fingerprint and p["key"] == spec.fingerprint]
    cfg = load_state_config(state_dir)
    cfg.access.allow = add_allow(cfg.access.allow, spec)
    save_state_config(state_dir, cfg)
    how = "that key only" if spec.fingerprint else "the key the rendezvous server has bound to it"
    text = f"allowed {spec} ({how}); a running agent admits it from its next session"
    others = [p for p in elsewhere if p != spec.peer_id]
    if others:
        text += f"\nnote: this key is known here as peer {', '.join(others)}: is the ID right?"
    return text


AGENT_ID = re.compile(r"[1-9][0-9]{9}")
"""What `derive_id` makes: RustDesk-style, ten digits."""


def revoke_peer(state_dir: Path, peer_id: str) -> str:
    """Out of the config and the allowed_peers file, and its pinned key forgotten."""
    peer_id = parse_peer_spec(peer_id).peer_id
    cfg = load_state_config(state_dir)
    before = len(cfg.access.allow)
    cfg.access.allow = [e for e in cfg.access.allow if parse_peer_spec(e).peer_id != peer_id]
    found = len(cfg.access.allow) != before
    save_state_config(state_dir, cfg)
    path = state_dir / ALLOWED_PEERS_FILE
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [line for line in lines if line_spec(line).partition("=")[0] != peer_id]
        if len(keep) != len(lines):
            found = True
            write_private(path, "".join(keep).encode())
    forgot = PinStore(state_dir).forget(peer_id)
    if not found and not forgot:
        return f"{peer_id} was not allowed"
    return (
        f"revoked {peer_id}"
        + (" and forgot its pinned key" if forgot else "")
        + " (a running agent refuses its next session; sessions already open run on until they end)"
    )


def edit_target(state_dir: Path, target: str, add: bool) -> str:
    cfg = load_state_config(state_dir)
    targets = [t for t in cfg.access.allow_targets if t != target]
    if add:
        targets.append(target)
    elif len(targets) == len(cfg.access.allow_targets):
        return f"{target} was not an allowed target"
    cfg.access.allow_targets = targets
    save_state_config(state_dir, cfg)
    return f"{'allowed' if add else 'revoked'} target {target} (a running agent: from its next session)"


def known_peers(state_dir: Path) -> list[dict[str, Any]]:
    """Every peer this agent knows of: allowed, pinned or seen; with how it is allowed, its key, when and how
    it was last seen."""
    entries = allowed(load_state_config(state_dir), state_dir)
    pins = dict(PinStore(state_dir).items())
    seen = seen_table(state_dir)
    out = []
    for peer in sorted(set(entries) | set(pins) | set(seen), key=lambda p: -float(seen.get(p, {}).get("last_seen", 0))):
        fp = entries.get(peer) or (fingerprint(pins[peer]) if peer in pins else str(seen.get(peer, {}).get("key", "")))
        out.append(
            {
                "id": peer,
                "allowed": ("by key" if entries[peer] else "by ID") if peer in entries else "no",
                "key": fp,
                "pinned": peer in pins,
                "last_seen": seen.get(peer, {}).get("last_seen"),
                "last_path": seen.get(peer, {}).get("path", ""),
                "last_role": seen.get(peer, {}).get("role", ""),
            }
        )
    return out
