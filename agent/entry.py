"""The `punchthrough` console script: `pipe` and `connect` at once, everything else by agent/cli.py.

`pipe` is an ssh ProxyCommand: its start-up is paid on every ssh. The full CLI imports the
config, the path policy (protobuf) and argparse before it knows what to do: ~200-300 ms on
these machines, against ~20 ms for the agent's own part of opening a stream. This reads the
common forms of the two client commands by hand and imports only the client (sockets and
msgpack). Anything else it does not recognise, including --help, --path and --password-file,
goes to the full CLI, which gives the same result and the same errors, only slower.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

CLIENT_COMMANDS = ("pipe", "connect")


class ClientArgs(NamedTuple):
    command: str
    peer: str
    target: str
    forwards: list[str]
    state_dir: str | None
    timeout: float


def parse_client(argv: Sequence[str]) -> ClientArgs | None:
    """`[--state-dir D] [-v] pipe PEER HOST:PORT [--timeout S]` or `... connect PEER -L SPEC ...`,
    options in any order; None for anything else (the full CLI decides)."""
    command: str | None = None
    positional: list[str] = []
    forwards: list[str] = []
    state_dir: str | None = None
    timeout = 30.0
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if arg in ("-v", "--verbose"):
            continue
        if name in ("--state-dir", "--timeout") or arg == "-L" or (arg.startswith("-L") and len(arg) > 2):
            if arg.startswith("-L") and len(arg) > 2:
                value = arg[2:]
            elif not eq:
                value = next(it, "")
                if not value or value.startswith("-"):
                    return None
            if name == "--state-dir":
                state_dir = value
            elif name == "--timeout":
                try:
                    timeout = float(value)
                except ValueError:
                    return None
                if not 0 <= timeout < float("inf"):
                    return None
            else:
                forwards.append(value)
            continue
        if arg.startswith("-"):
            return None  # --help, --path, --password-file, "--", a typo: the full CLI
        if command is None:
            if arg not in CLIENT_COMMANDS:
                return None
            command = arg
        else:
            positional.append(arg)
    if command == "pipe" and len(positional) == 2 and not forwards:
        return ClientArgs(command, positional[0], positional[1], [], state_dir, timeout)
    if command == "connect" and len(positional) == 1 and forwards:
        return ClientArgs(command, positional[0], "", forwards, state_dir, timeout)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parsed = parse_client(args)
    if parsed is None:
        from agent.cli import main as full_cli

        return full_cli(args)
    os.umask(0o077)
    return run_client(parsed)


def run_client(args: ClientArgs) -> int:
    from pathlib import Path

    from agent import client
    from agent.common.paths import default_state_dir
    from agent.wire.addr import AddressError, split_host_port

    state_dir = Path(args.state_dir) if args.state_dir is not None else default_state_dir()
    password = os.environ.get("PUNCHTHROUGH_PASSWORD") or None
    try:
        state_dir = state_dir.resolve()
        if args.command == "pipe":
            split_host_port(args.target)
            return client.run_pipe(state_dir, args.peer, args.target, "", password, args.timeout)
        specs = [client.parse_forward(text) for text in args.forwards]
        return client.run_forward(state_dir, args.peer, specs, "", password, args.timeout)
    except (client.ClientError, AddressError) as exc:
        print(f"punchthrough: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"punchthrough: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
