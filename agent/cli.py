"""`punchthrough`: the user-facing command (servers now; agent subcommands join later).

Every error a user can cause ends in one line on stderr and exit status 2;
no traceback for bad flags, bad addresses or unusable files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.addr import AddressError, split_host_port
from agent.paths import default_state_dir

DEFAULT_RENDEZVOUS_PORT = 21116
DEFAULT_RELAY_PORT = 21117


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error over several lines; we want one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(message)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


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
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="punchthrough", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--state-dir", type=Path, default=None, help="state directory (env PUNCHTHROUGH_STATE_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    rv = sub.add_parser("rendezvous", help="run a rendezvous server (the hbbs role)")
    rv.add_argument(
        "--bind", action="append", default=None, help="address to bind (repeatable; default 0.0.0.0 and ::)"
    )
    rv.add_argument("--port", type=_port, default=DEFAULT_RENDEZVOUS_PORT, help="UDP+TCP port; NAT-test port is port-1")
    rv.add_argument(
        "--relay", action="append", default=[], type=_host_port, help="relay HOST:PORT handed to peers (repeatable)"
    )
    rv.add_argument("--db", type=Path, default=None, help="SQLite database (default STATE_DIR/rendezvous.sqlite3)")
    rv.add_argument(
        "--key-file", type=Path, default=None, help="ed25519 key (default STATE_DIR/id_ed25519, created if missing)"
    )
    rv.add_argument("--always-relay", action="store_true", help="tell every pair to use the relay")

    rl = sub.add_parser("relay", help="run a relay server (the hbbr role)")
    rl.add_argument(
        "--bind", action="append", default=None, help="address to bind (repeatable; default 0.0.0.0 and ::)"
    )
    rl.add_argument("--port", type=_port, default=DEFAULT_RELAY_PORT)
    rl.add_argument(
        "--key-file", type=Path, default=None, help="file holding the key RequestRelay.licence_key must match"
    )
    rl.add_argument(
        "--replicas", type=int, default=1, help="relay workers as Ray actors sharing the port (SO_REUSEPORT)"
    )
    rl.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a private one")
    rl.add_argument("--stream-limit", type=_positive, default=0.0, help="per-stream limit in Mbit/s (0 = off)")
    rl.add_argument("--total-limit", type=_positive, default=0.0, help="total limit in Mbit/s (0 = off)")
    return parser


def _run(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir or default_state_dir()
    if args.command == "rendezvous":
        from agent.rendezvous_server import RendezvousConfig, run_rendezvous

        return run_rendezvous(
            RendezvousConfig(
                binds=args.bind or ["0.0.0.0", "::"],
                port=args.port,
                relays=args.relay,
                db_path=args.db or state_dir / "rendezvous.sqlite3",
                key_file=args.key_file or state_dir / "id_ed25519",
                always_relay=args.always_relay,
            )
        )
    if args.command == "relay":
        from agent.relay_server import RelayConfig, run_relay

        if args.replicas < 1:
            raise CliError("--replicas must be at least 1")
        key = ""
        if args.key_file is not None:
            try:
                key = args.key_file.read_text().strip()
            except OSError as exc:
                raise CliError(f"cannot read --key-file: {exc.strerror}: {args.key_file}") from None
        return run_relay(
            RelayConfig(
                binds=args.bind or ["0.0.0.0", "::"],
                port=args.port,
                key=key,
                replicas=args.replicas,
                ray_address=args.ray_address,
                stream_limit_bps=args.stream_limit * 1e6 / 8,
                total_limit_bps=args.total_limit * 1e6 / 8,
            )
        )
    raise CliError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    import logging

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
