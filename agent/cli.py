"""`punchthrough`: the agent (up, down, id, connect, pipe) and the servers (rendezvous, relay, serve).

Every error a user can cause ends in one line on stderr and exit status 2;
no traceback for bad flags, bad addresses or unusable files. Everything it
creates is private to the user (umask 077: state dirs 0700, files 0600).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import config
from agent.common.paths import add_anywhere, add_state_dir, default_state_dir
from agent.config import Config
from agent.placement import PLACEMENTS
from agent.wire.addr import AddressError, parse_port, split_host_port
from agent.wire.ports import RELAY_PORT, RENDEZVOUS_PORT

AGENT_COMMANDS = (
    "up",
    "down",
    "id",
    "config",
    "connect",
    "pipe",
    "allow",
    "revoke",
    "allow-target",
    "revoke-target",
    "peers",
)
ACCESS_COMMANDS = ("allow", "revoke", "allow-target", "revoke-target", "peers")



class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error over several lines; we want one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(message)


def _port(text: str) -> int:
    try:
        return parse_port(text, allow_zero=True)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _serve_port(text: str) -> int:
    port = _port(text)
    if port > 0xFFFF - 1:
        raise argparse.ArgumentTypeError(f"must be at most 65534 (the relay listens on port + 1), got {port}")
    return port


def _host_port(text: str) -> str:
    try:
        split_host_port(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number, not negative: {text!r}")
    return value


def _global_options(p: argparse.ArgumentParser, top: bool) -> None:
    """--state-dir and -v, before the subcommand (top) or after it (each subcommand, not overriding)."""
    add_state_dir(p, top)
    add_anywhere(p, top, "-v", "--verbose", action="store_true", help="debug logging")


EPILOG = """first steps (README, "Use"):
  B:  punchthrough up --allow-target 127.0.0.1:22     prints B's ID and the --server-key A needs
  A:  punchthrough up --server B-ADDRESS --server-key KEY;  punchthrough id
  B:  punchthrough allow A-ID=SHA256:...              live, no restart
  A:  punchthrough-ops ping B-ID;  ssh -o ProxyCommand='punchthrough pipe %n 127.0.0.1:22' B-ID
what it is doing: punchthrough-ops status | sessions | netcheck;  logs: STATE_DIR/logs/"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="punchthrough",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    rv = sub.add_parser("rendezvous", help="run a rendezvous server (the hbbs role)")
    rv.add_argument(
        "--bind", action="append", default=None, help="address to bind (repeatable; default 0.0.0.0 and ::)"
    )
    rv.add_argument("--port", type=_port, default=RENDEZVOUS_PORT, help="UDP+TCP port; NAT-test port is port-1")
    rv.add_argument(
        "--relay", action="append", default=[], type=_host_port, help="relay HOST:PORT handed to peers (repeatable)"
    )
    rv.add_argument("--db", type=Path, default=None, help="SQLite database (default STATE_DIR/rendezvous.sqlite3)")
    rv.add_argument(
        "--key-file", type=Path, default=None, help="ed25519 key (default STATE_DIR/id_ed25519, created if missing)"
    )
    rv.add_argument("--always-relay", action="store_true", help="tell every pair to use the relay")
    _metrics_option(rv, "its Prometheus metrics")
    rv.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="also serve RustDesk clients (unsigned registrations and requests; never over a signed ID)",
    )

    rl = sub.add_parser("relay", help="run a relay server (the hbbr role)")
    rl.add_argument(
        "--bind", action="append", default=None,
        help="address to bind (repeatable; default 0.0.0.0 and ::); with --replicas or --ray-address, "
        "'node' is the address of the Ray node each replica runs on",
    )
    rl.add_argument("--port", type=_port, default=RELAY_PORT)
    rl.add_argument(
        "--key-file", type=Path, default=None, help="file holding the key RequestRelay.licence_key must match"
    )
    rl.add_argument(
        "--server-key",
        action="append",
        default=[],
        metavar="KEY",
        help="base64 key of a rendezvous server whose pairing tickets this relay honours (repeatable; "
        "default: STATE_DIR/id_ed25519.pub, the key of a rendezvous server sharing this state dir)",
    )
    rl.add_argument(
        "--server-key-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="file holding such a key, e.g. a copy of the rendezvous server's id_ed25519.pub (repeatable)",
    )
    rl.add_argument("--open", action="store_true", help="pair any two connections, ticket or not (RustDesk clients)")
    rl.add_argument(
        "--replicas", type=int, default=1, help="relay workers as Ray actors sharing the port (SO_REUSEPORT)"
    )
    rl.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a private one")
    rl.add_argument("--stream-limit", type=_positive, default=0.0, help="per-stream limit in Mbit/s (0 = off)")
    rl.add_argument("--total-limit", type=_positive, default=0.0, help="total limit in Mbit/s (0 = off)")
    _metrics_option(rl, "its Prometheus metrics (with --replicas or --ray-address: per replica and node)")

    up = sub.add_parser("up", help="start this agent (private Ray + actors; embedded servers unless --server)")
    up.add_argument("--config", type=Path, default=None, help="TOML config (see `punchthrough config`)")
    up.add_argument("--server", type=_host_port_default(RENDEZVOUS_PORT), default=None, help="rendezvous HOST[:PORT]")
    up.add_argument("--server-key", default=None, help="base64 public key of the rendezvous server")
    up.add_argument("--relay", type=_host_port_default(RELAY_PORT), default=None, help="relay HOST[:PORT] to use")
    up.add_argument("--allow", action="append", default=None, metavar="PEER_ID", help="peer allowed in (repeatable)")
    up.add_argument("--password-file", default=None, help="file with a password that also admits peers")
    up.add_argument(
        "--allow-target",
        action="append",
        default=None,
        type=_host_port,
        metavar="HOST:PORT",
        help="forward target peers may reach (repeatable)",
    )
    up.add_argument("--path", type=_policy, default=None, metavar="POLICY", help=POLICY_HELP)
    up.add_argument(
        "--direct-port", type=_port, default=None, help="accept direct connections (ID@HOST:PORT) on this TCP port"
    )
    up.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default=None,
        help="isolated: one Ray actor per component (default); grouped: two actors (control, data), for small machines",
    )
    up.add_argument("--foreground", action="store_true", help="stay in the foreground (Ctrl-C stops the agent)")
    up.add_argument("--keep-config", action="store_true", help=argparse.SUPPRESS)

    sub.add_parser("down", help="stop this agent (only its own Ray, never a global `ray stop`)")
    idp = sub.add_parser("id", help="print this agent's ID=SHA256:<key fingerprint>, the string peers allow")
    idp.add_argument("--json", action="store_true")
    cfgp = sub.add_parser(
        "config",
        help="print the config this agent runs with (STATE_DIR/config.toml, every default filled in and "
        "explained), or the given file, checked",
    )
    cfgp.add_argument("--config", type=Path, default=None)

    for name, helptext in (
        ("connect", "forward a local port through a peer (like ssh -L)"),
        ("pipe", "join stdin/stdout to HOST:PORT as seen from a peer (ProxyCommand)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "peer",
            help="peer ID, or ID=SHA256:... to accept only that key (what `punchthrough id` prints on the peer); "
            "add @HOST[:PORT] for the peer's direct port (no rendezvous)",
        )
        if name == "connect":
            p.add_argument(
                "-L",
                dest="forward",
                required=True,
                action="append",
                metavar="[BIND:]PORT:HOST:HOSTPORT",
                help="a local port to forward (repeatable, as with ssh)",
            )
        else:
            p.add_argument("target", type=_host_port, metavar="HOST:PORT")
        p.add_argument(
            "--path", type=_policy, default="", metavar="POLICY", help=POLICY_HELP + " (default: the agent's)"
        )
        p.add_argument("--password-file", type=Path, default=None, help="password for the peer")
        p.add_argument("--timeout", type=_positive, default=30.0, help="seconds to wait for the stream to open")

    sv = sub.add_parser("serve", help="run a rendezvous and a relay server together (both roles, one process)")
    sv.add_argument(
        "--bind", action="append", default=None, help="address to bind (repeatable; default 0.0.0.0 and ::)"
    )
    sv.add_argument(
        "--port", type=_serve_port, default=RENDEZVOUS_PORT, help="rendezvous port; relay is port+1"
    )
    sv.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="also serve RustDesk clients (unsigned registrations and requests; the relay pairs anyone)",
    )
    _metrics_option(sv, "Prometheus metrics of both roles")

    al = sub.add_parser("allow", help="let a peer connect (ID=SHA256:... as `punchthrough id` prints it there)")
    al.add_argument("peer", metavar="ID[=SHA256:FP]")
    rk = sub.add_parser("revoke", help="stop letting a peer connect (and forget its pinned key)")
    rk.add_argument("peer", metavar="ID")
    for name, helptext in (
        ("allow-target", "let peers reach HOST:PORT through this agent"),
        ("revoke-target", "stop forwarding to HOST:PORT"),
    ):
        tp = sub.add_parser(name, help=helptext)
        tp.add_argument("target", type=_host_port, metavar="HOST:PORT")
    sc = sub.add_parser(
        "service", help="systemd units for the agent and the servers (start at boot, logs in the journal)"
    )
    sc.add_argument("action", choices=("unit", "install", "uninstall"), help="print the unit, write it, remove it")
    sc.add_argument("which", choices=("agent", "servers", "both"), nargs="?", default="agent")
    sc.add_argument("--unit-dir", type=Path, default=None, help="where units go (default /etc/systemd/system)")
    sc.add_argument("--port", type=_serve_port, default=RENDEZVOUS_PORT, help="the servers' rendezvous port")
    pe = sub.add_parser("peers", help="the peers this agent knows: allowed, pinned key, last seen and path")
    pe.add_argument("--forget", metavar="ID", default=None, help="forget the key pinned for ID (a reinstalled peer)")
    pe.add_argument("--json", action="store_true")
    for p in sub.choices.values():
        _global_options(p, top=False)
    return parser


POLICY_HELP = (
    "path policy: auto, direct-only or relay-only, plus disable-udp, disable-tcp-punch, disable-ipv6 (comma-separated)"
)


def _metrics_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--metrics", type=_metrics_listen, default="", metavar="[HOST:]PORT",
        help=f"serve {what} on this port (127.0.0.1 unless a host is given; default off)",
    )


def _metrics_listen(text: str) -> str:
    from agent.common.metrics import parse_listen

    if not text:  # the default (argparse passes a string default through `type` too)
        return ""
    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _policy(text: str) -> str:
    from agent.control.plan import Policy

    try:
        Policy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _host_port_default(port: int) -> Any:
    def parse(text: str) -> str:
        try:
            split_host_port(text, port)
        except AddressError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return parse


def _read_secret(path: Path, what: str) -> str:
    """A password or key file: readable, UTF-8 and not blank, or one line saying which file and why.
    An empty file is refused: read as "no secret" it would silently turn the password (or relay key) off."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{what} {path} is not UTF-8 text") from None
    except ValueError as exc:  # a NUL in the name (possible from a config file)
        raise CliError(f"cannot read {what} {str(path)!r}: {exc}") from None
    if not text:
        raise CliError(f"{what} {path} is empty")
    return text


def _password(path: Path | None) -> str | None:
    """The peer's password: --password-file, else PUNCHTHROUGH_PASSWORD, never a flag value."""
    if path is None:
        return os.environ.get("PUNCHTHROUGH_PASSWORD") or None
    return _read_secret(path, "--password-file")


UP_FLAG_KEYS = {
    "server": ("agent", "server"),
    "server_key": ("agent", "server_key"),
    "relay": ("agent", "relay"),
    "path": ("agent", "path"),
    "direct_port": ("agent", "direct_port"),
    "placement": ("ray", "placement"),
}
"""`up` flags that set one config key each (None: not given, the config decides)."""


def _effective_config(args: argparse.Namespace, state_dir: Path) -> Config:
    """The config `up` runs with and keeps: STATE_DIR/config.toml (the user's), then what --config sets,
    then the flags. A flag sets its value; --allow and --allow-target add to the lists (`punchthrough
    revoke` and `revoke-target` take entries out), so a later `up` never drops what an earlier one allowed."""
    from agent.control.access import add_allow, load_state_config
    from agent.wire.peer_ids import parse_peer_spec

    try:
        cfg = config.load(args.config, base=load_state_config(state_dir))
        for flag, (section, key) in UP_FLAG_KEYS.items():
            if getattr(args, flag) is not None:
                setattr(getattr(cfg, section), key, getattr(args, flag))
        for entry in args.allow or []:
            try:
                cfg.access.allow = add_allow(cfg.access.allow, parse_peer_spec(entry))
            except ValueError as exc:
                raise config.ConfigError(f"--allow: {exc}") from None
        for target in args.allow_target or []:
            if target not in cfg.access.allow_targets:
                cfg.access.allow_targets.append(target)
        cfg.validate()
    except config.ConfigError as exc:
        raise CliError(str(exc)) from None
    # The agent reads the password file later, from another process and directory: check it now
    # (an empty one would silently admit nobody by password) and hand the agent an absolute path.
    if args.password_file is not None:
        cfg.access.password_file = _checked_secret_path(args.password_file, "--password-file")
    elif cfg.access.password_file:
        what = f"access.password_file of {args.config}" if args.config else "access.password_file"
        cfg.access.password_file = _checked_secret_path(cfg.access.password_file, what)
    return cfg


def _checked_secret_path(text: str, what: str) -> str:
    path = Path(text)
    _read_secret(path, what)
    return str(path.resolve())


def _run_client_command(args: argparse.Namespace, state_dir: Path) -> int:
    """`pipe` and `connect`: kept light (no agent internals, no crypto imports) so they start fast."""
    from agent import client

    try:
        password = _password(args.password_file)
        if args.command == "pipe":
            return client.run_pipe(state_dir, args.peer, args.target, args.path, password, args.timeout)
        specs = [client.parse_forward(text) for text in args.forward]
        return client.run_forward(state_dir, args.peer, specs, args.path, password, args.timeout)
    except (client.ClientError, AddressError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise CliError(f"{exc.strerror or exc}{where}") from None


def _run_access_command(args: argparse.Namespace, state_dir: Path) -> int:
    """allow / revoke / allow-target / revoke-target / peers: edit or show who may connect (live)."""
    from agent.common.files import private_dir
    from agent.control import access

    try:
        private_dir(state_dir)
        if args.command == "allow":
            print(access.allow_peer(state_dir, args.peer))
        elif args.command == "revoke":
            print(access.revoke_peer(state_dir, args.peer))
        elif args.command in ("allow-target", "revoke-target"):
            print(access.edit_target(state_dir, args.target, args.command == "allow-target"))
        else:
            if args.forget:
                from agent.control.pins import PinStore

                forgot = PinStore(state_dir).forget(args.forget)
                print(f"forgot the key pinned for {args.forget}" if forgot else f"no key was pinned for {args.forget}")
                return 0
            rows = access.known_peers(state_dir)
            print(json.dumps(rows, indent=2) if args.json else render_peers(rows))
        return 0
    except (ValueError, config.ConfigError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise CliError(f"{exc.strerror or exc}{where}") from None


def render_peers(rows: list[dict[str, Any]]) -> str:
    """`punchthrough peers`: one line per peer, most recently seen first."""
    import time

    if not rows:
        return "no peers yet: `punchthrough allow ID=SHA256:...` lets one in"
    lines = [f"{'PEER':12} {'ALLOWED':8} {'KEY':52} {'PINNED':6} LAST SEEN"]
    for r in rows:
        seen = "never"
        if r.get("last_seen"):
            ago = time.time() - float(r["last_seen"])
            when = f"{ago:.0f}s" if ago < 120 else f"{ago / 60:.0f}m" if ago < 7200 else f"{ago / 3600:.1f}h"
            seen = f"{when} ago via {r.get('last_path') or '?'} ({r.get('last_role') or '?'})"
        pinned = "yes" if r.get("pinned") else "no"
        lines.append(f"{r['id']:12} {r['allowed']:8} {r.get('key') or '-':52} {pinned:6} {seen}")
    return "\n".join(lines)


def _run_agent_command(args: argparse.Namespace, state_dir: Path) -> int:
    state_dir = state_dir.resolve()
    if args.command in ("pipe", "connect"):
        return _run_client_command(args, state_dir)
    if args.command in ACCESS_COMMANDS:
        return _run_access_command(args, state_dir)
    from agent import identity, runner
    from agent.common.files import private_dir
    from agent.common.keyfile import KeyFileError
    from agent.control.access import save_state_config
    from agent.runtime_paths import leave_udp_blocked_hint
    from agent.wire.peer_ids import spec_for

    try:
        if args.command == "up":
            udp_blocked = ""
            if not args.keep_config:
                cfg = _effective_config(args, state_dir)
                if runner.running_pid(state_dir) is not None:
                    raise CliError(
                        f"an agent already runs for state dir {state_dir} (`punchthrough allow` and `allow-target` "
                        "change who and what without a restart; `punchthrough down` stops it)"
                    )
                private_dir(state_dir)
                if cfg.agent.server:  # seconds to learn what a Ray start would take ~10 s to find
                    udp_blocked = runner.preflight(state_dir, cfg)
                leave_udp_blocked_hint(state_dir, udp_blocked)
                save_state_config(state_dir, cfg)
            identity.load_or_create(state_dir)
            if args.foreground:
                return runner.supervise(state_dir, announce=not args.keep_config, udp_blocked=udp_blocked)
            return runner.start_background(state_dir, udp_blocked=udp_blocked)
        if args.command == "down":
            return runner.down(state_dir)
        if args.command == "id":
            ident = identity.load_or_create(private_dir(state_dir))
            spec = spec_for(ident.peer_id, ident.public_key)
            if args.json:
                info = {
                    "id": ident.peer_id,
                    "fingerprint": ident.fingerprint,
                    "public_key": base64.b64encode(ident.public_key).decode(),
                    "peer_spec": spec,
                }
                embedded_key = state_dir / "server" / "id_ed25519.pub"
                if embedded_key.exists():  # what peers give as --server-key for this machine's servers
                    info["embedded_server_key"] = embedded_key.read_text().strip()
                print(json.dumps(info))
            else:
                print(spec)
            return 0
        if args.command == "config":
            from agent.control.access import load_state_config

            cfg = config.load(args.config) if args.config else load_state_config(state_dir)
            print(config.dump(cfg), end="")
            return 0
        raise CliError(f"unknown command {args.command!r}")
    except (runner.RunnerError, config.ConfigError, AddressError, KeyFileError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # e.g. a state dir that is a file, a directory we may not write
        where = f": {exc.filename}" if exc.filename else ""
        raise CliError(f"{exc.strerror or exc}{where}") from None


def _run_service(args: argparse.Namespace) -> int:
    from agent import service

    unit_dir = args.unit_dir or service.UNIT_DIR
    try:
        if args.action == "unit":
            print("\n".join(u.text for u in service.units(args.which, port=args.port)), end="")
            return 0
        if args.action == "install":
            lines = service.install(args.which, unit_dir, port=args.port)
        else:
            lines = service.uninstall(args.which, unit_dir)
    except OSError as exc:
        raise CliError(f"service {args.action}: {unit_dir}: {exc.strerror or exc}") from None
    print("\n".join(lines))
    return 0


def _run(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir or default_state_dir()
    if args.command in AGENT_COMMANDS:
        return _run_agent_command(args, state_dir)
    if args.command == "service":
        return _run_service(args)
    if args.command == "serve":
        from agent.servers.serve import run_servers

        return run_servers(
            args.bind or ["0.0.0.0", "::"], args.port, state_dir, allow_unsigned=args.allow_unsigned,
            metrics=args.metrics,
        )
    if args.command == "rendezvous":
        from agent.servers.rendezvous_server import RendezvousConfig, run_rendezvous

        return run_rendezvous(
            RendezvousConfig(
                binds=args.bind or ["0.0.0.0", "::"],
                port=args.port,
                relays=args.relay,
                db_path=args.db or state_dir / "rendezvous.sqlite3",
                key_file=args.key_file or state_dir / "id_ed25519",
                always_relay=args.always_relay,
                allow_unsigned=args.allow_unsigned,
                metrics=args.metrics,
            )
        )
    if args.command == "relay":
        from agent.servers.relay_server import RelayConfig, run_relay

        if args.replicas < 1:
            raise CliError("--replicas must be at least 1")
        key = "" if args.key_file is None else _read_secret(args.key_file, "--key-file")
        binds = args.bind or ["0.0.0.0", "::"]
        if "node" in binds and not (args.replicas > 1 or args.ray_address):
            raise CliError("--bind node names a Ray node's address: it needs --replicas or --ray-address")
        server_keys = [] if args.open else _relay_server_keys(args, state_dir)
        try:
            run = run_relay
            if args.replicas > 1 or args.ray_address:
                from actors.relay_pool import run_pool as run
            return run(
                RelayConfig(
                    binds=binds,
                    port=args.port,
                    key=key,
                    server_keys=server_keys,
                    open=args.open,
                    replicas=args.replicas,
                    ray_address=args.ray_address,
                    stream_limit_bps=args.stream_limit * 1e6 / 8,
                    total_limit_bps=args.total_limit * 1e6 / 8,
                    metrics=args.metrics,
                )
            )
        except OSError as exc:  # relay_server lets the bind error escape as is
            raise CliError(f"relay cannot bind {', '.join(binds)} port {args.port}: {exc.strerror or exc}") from None
    raise CliError(f"unknown command {args.command!r}")


def _server_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise CliError(f"{where}: not a base64 32-byte ed25519 public key")
    return key


def _relay_server_keys(args: argparse.Namespace, state_dir: Path) -> list[bytes]:
    """The rendezvous servers whose tickets the relay honours: given, else the one sharing our state dir."""
    keys = [_server_key(k, "--server-key") for k in args.server_key]
    keys += [_server_key(_read_secret(f, "--server-key-file"), f"--server-key-file {f}") for f in args.server_key_file]
    if keys:
        return keys
    default = state_dir / "id_ed25519.pub"
    if default.exists():
        return [_server_key(_read_secret(default, "server key"), str(default))]
    raise CliError(
        "the relay needs the key of the rendezvous server whose pairs it carries: --server-key-file "
        "(a copy of that server's id_ed25519.pub) or --server-key KEY; or --open to pair anyone"
    )


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    os.umask(0o077)  # state dirs, keys, databases and logs: the owner's only
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return _run(args)
    except CliError as exc:
        print(f"punchthrough: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
