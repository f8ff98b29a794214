"""The agent's typed configuration: one TOML file, every default written down here.

`punchthrough config` prints the defaults as a TOML file; every option is also a
flag of `punchthrough up`. Loading rejects unknown keys and wrong types with one
line naming the key, so a typo never turns silently into a default.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import ipaddress
import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from agent.common.metrics import parse_listen
from agent.control.plan import POLICY_WORDS, Policy
from agent.placement import PLACEMENTS
from agent.strategies.birthday_core import Budget
from agent.wire.addr import AddressError, shown, split_host_port
from agent.wire.peer_ids import parse_peer_spec
from agent.wire.ports import RELAY_PORT, RENDEZVOUS_PORT

PATHS = POLICY_WORDS


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message is one line for people."""


@dataclass
class AgentSection:
    server: str = ""
    """Rendezvous server HOST[:PORT] (port 21116). Empty: run an embedded rendezvous and relay here."""
    server_key: str = ""
    """Base64 ed25519 key of the rendezvous server. Empty: the embedded server's key, else the key it shows
    on first contact, pinned in STATE_DIR/known_servers.json (trust on first use, like ssh)."""
    nat_test_port: int = 0
    """The rendezvous server's NAT-test port; 0 means its port - 1, as RustDesk does."""
    relay: str = ""
    """Relay HOST:PORT to use when the rendezvous server names none (it names one when it has one).
    Empty: the rendezvous host, port + 1 (RustDesk's default)."""
    relay_key: str = ""
    """Key the relay wants in RequestRelay.licence_key (empty: none)."""
    path: str = "auto"
    """Path policy for outgoing sessions: auto, direct-only or relay-only, plus any of disable-udp,
    disable-tcp-punch, disable-ipv6 (comma-separated)."""
    direct_port: int = 0
    """Accept direct connections on this TCP port (RustDesk's direct-server, usually 21118); 0 = off.
    Peers then reach this agent as ID@HOST[:PORT] without any rendezvous server."""
    connect_timeout: float = 10.0
    """Seconds a session may take to come up before `connect`/`pipe` give up."""
    link_idle: float = 300.0
    """Seconds a link to a peer is kept once its last stream ended, so the next `pipe` or `-L`
    connection to that peer opens in one round trip; 0 ends a link with its last stream."""
    birthday_sockets: int = 256
    """Birthday probing (a random-port symmetric NAT facing a cone, while the link runs on the relay):
    mappings the symmetric side opens, one UDP socket each (1-1024)."""
    birthday_probes: int = 2000
    """... ports the cone side tries, each once (1-64512)."""
    birthday_rate: float = 1000.0
    """... probes per second."""
    birthday_interval: float = 30.0
    """... at most once per peer per this many seconds (0: never probe)."""
    metrics: str = ""
    """Serve Prometheus metrics on [HOST:]PORT (127.0.0.1 unless a host is given); empty: off."""


@dataclass
class AccessSection:
    allow: list[str] = field(default_factory=list)
    """Peers allowed to connect: ID=SHA256:<fingerprint> (what `punchthrough id` prints there) admits that key
    only; a bare ID admits the key the rendezvous server has bound to it. Also read: STATE_DIR/allowed_peers."""
    password_file: str = ""
    """File holding a password that also admits a peer (or set PUNCHTHROUGH_PASSWORD)."""
    allow_targets: list[str] = field(default_factory=list)
    """HOST:PORT targets peers may reach through this agent; nothing else is forwarded."""


@dataclass
class EmbeddedSection:
    rendezvous_port: int = RENDEZVOUS_PORT
    """Port of the embedded rendezvous server (NAT-test port is one below)."""
    relay_port: int = RELAY_PORT
    """Port of the embedded relay server."""
    bind: str = "0.0.0.0"
    """Address the embedded servers bind."""


@dataclass
class RaySection:
    gcs_port: int = 0
    """Port of this agent's private Ray head; 0 picks a free one."""
    placement: str = "isolated"
    """isolated: one Ray actor per component, each restarted alone (the default); grouped: two actors
    (control; data: sessions, strategies, embedded servers) for small machines, about half the memory."""


@dataclass
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    access: AccessSection = field(default_factory=AccessSection)
    embedded: EmbeddedSection = field(default_factory=EmbeddedSection)
    ray: RaySection = field(default_factory=RaySection)

    def birthday_budget(self) -> Budget:
        a = self.agent
        return Budget(sockets=a.birthday_sockets, probes=a.birthday_probes, rate=a.birthday_rate)

    def validate(self) -> Config:
        try:
            if not self.agent.path.strip():
                raise ValueError("must not be empty (use auto)")
            Policy.parse(self.agent.path)
        except ValueError as exc:
            raise ConfigError(f"agent.path: {exc}") from None
        _check_address("agent.server", self.agent.server, RENDEZVOUS_PORT)
        _check_address("agent.relay", self.agent.relay, RELAY_PORT)
        for target in self.access.allow_targets:
            _check_address("access.allow_targets", target, None)
        for entry in self.access.allow:
            try:
                parse_peer_spec(entry)
            except ValueError as exc:
                raise ConfigError(f"access.allow: {exc}") from None
        for where, port, low in (
            ("embedded.rendezvous_port", self.embedded.rendezvous_port, 1),
            ("embedded.relay_port", self.embedded.relay_port, 1),
            ("agent.nat_test_port", self.agent.nat_test_port, 0),
            ("agent.direct_port", self.agent.direct_port, 0),
            ("ray.gcs_port", self.ray.gcs_port, 0),
        ):
            if not low <= port <= 0xFFFF:
                raise ConfigError(f"{where} must be within {low}-65535, got {port}")
        if self.ray.placement not in PLACEMENTS:
            raise ConfigError(
                f"ray.placement must be {' or '.join(PLACEMENTS)}, got {shown(self.ray.placement)}"
            )
        idle = self.agent.link_idle
        if not (math.isfinite(idle) and idle >= 0):
            raise ConfigError(f"agent.link_idle must be 0 or a positive number of seconds, got {idle}")
        try:
            self.birthday_budget()
        except ValueError as exc:
            raise ConfigError(f"agent.{exc}") from None
        if not (math.isfinite(self.agent.birthday_interval) and self.agent.birthday_interval >= 0):
            raise ConfigError(f"agent.birthday_interval must be 0 or a positive number of seconds, got "
                              f"{self.agent.birthday_interval}")
        if self.agent.metrics:
            try:
                parse_listen(self.agent.metrics)
            except ValueError as exc:
                raise ConfigError(f"agent.{exc}") from None
        timeout = self.agent.connect_timeout
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"agent.connect_timeout must be a positive number of seconds, got {timeout}")
        try:
            ipaddress.ip_address(self.embedded.bind)
        except ValueError:
            raise ConfigError(
                f"embedded.bind must be an IP address such as 0.0.0.0 or ::, got {shown(self.embedded.bind)}"
            ) from None
        if self.agent.server_key:
            _check_server_key(self.agent.server_key)
        return self


def _check_address(where: str, text: str, default_port: int | None) -> None:
    """Empty means "not set" for server/relay; a target list never holds empty strings legitimately."""
    if not text and default_port is not None:
        return
    try:
        split_host_port(text, default_port)
    except AddressError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_server_key(text: str) -> None:
    """Caught here, at load, rather than inside the started agent where the error is much harder to see."""
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        hint = (
            " (that is a fingerprint: give the base64 key that `punchthrough up` prints on the server's machine)"
            if text.startswith("SHA256:")
            else ""
        )
        raise ConfigError(f"agent.server_key must be a base64 32-byte ed25519 public key, got {shown(text)}{hint}")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _name(key: str) -> str:
    """A TOML key as it goes into a message: bare keys as written, anything else quoted (one line, short)."""
    return key if _BARE_KEY.fullmatch(key) and len(key) <= 80 else shown(key)


def _fill(section: Any, values: dict[str, Any], where: str) -> None:
    hints = get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {where}.{_name(key)}")
        want = hints[key]
        ok = (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
            if want == list[str]
            else isinstance(value, want) and not (want is int and isinstance(value, bool))
        )
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{where}.{key} must be {getattr(want, '__name__', str(want))}, got {_short(value)}")
        setattr(section, key, value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text)} chars)"


def load(path: Path | None, base: Config | None = None) -> Config:
    """`base` (default: the defaults), overlaid with the keys `path` sets when given (a missing file is
    an error, not a default)."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if path is None:
        return cfg
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ConfigError(f"config {path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config {path}: values nested too deeply") from None
    for name, values in data.items():
        if name not in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"unknown section [{_name(name)}] in {path}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table")
        _fill(getattr(cfg, name), values, name)
    return cfg.validate()


def _toml_char(c: str) -> str:
    """TOML basic strings forbid raw control characters; \\uXXXX holds any of them."""
    if c in '"\\':
        return "\\" + c
    if c < " " or c == "\x7f":
        return f"\\u{ord(c):04X}"
    return c


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def _docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right after each field) from the class source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # one comment line
    return docs


def dump(cfg: Config) -> str:
    """The whole config as TOML, each key with its documentation."""
    lines: list[str] = []
    for sec in dataclasses.fields(Config):
        section = getattr(cfg, sec.name)
        docs = _docs(type(section))
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(section):
            if f.name in docs:
                lines.append(f"# {docs[f.name]}")
            lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)
