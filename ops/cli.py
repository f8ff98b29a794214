"""`punchthrough-ops`: what a running agent is doing, from its coordinator's control socket.

No Ray driver is attached (a query takes ~0.15 s and works while Ray is sick).
Tables for people, `--json` for scripts (the JSON keys are stable).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.client import loopback_pair
from agent.common import ctlproto, logfiles
from agent.common.paths import add_anywhere, add_state_dir, default_state_dir
from agent.runtime_paths import control_socket
from ops import relays_view

COMMANDS = ("status", "actors", "sessions", "links", "netcheck")


class OpsError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise OpsError(message)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


UNANSWERED_NOTE = 2.0
"""Seconds without an answer to a registration before status says so (one normally takes milliseconds)."""


NAT_WORDS = {"ASYMMETRIC": "endpoint-independent mapping", "SYMMETRIC": "endpoint-dependent mapping (symmetric)"}


def _nat_words(nat: dict[str, Any]) -> str:
    name = str(nat.get("nat_name") or "")
    return f"{NAT_WORDS[name]} [RustDesk: {name}]" if name in NAT_WORDS else (name or "unknown")


def render_status(st: dict[str, Any]) -> str:
    reg = st.get("registration", {})
    nat = st.get("nat") or {}
    lines = [
        f"id            {st.get('peer_spec') or st.get('id')}",
        f"server        {st.get('server')}{'  (embedded)' if st.get('embedded') else ''}"
        + (f"  key {st['server_key']}" if st.get("server_key") else "  key not known yet"),
        f"registration  {reg.get('state', '-')}  last reply {_age(reg.get('last_reply_age'))} ago"
        + (
            f"  (no answer for {_age(reg['unanswered_for'])}: the server may be down)"
            if (reg.get("unanswered_for") or 0) > UNANSWERED_NOTE
            else ""
        )
        + (f"  ({reg['server_key_problem']})" if reg.get("server_key_problem") else "")
        + (f"  over TCP ({reg.get('why_tcp') or 'UDP does not get through'})" if reg.get("transport") == "tcp" else ""),
        f"nat           {_nat_words(nat)}"
        + (f"  measured {_age(time.time() - nat['measured_at'])} ago" if nat.get("measured_at") else "")
        + (f"  error: {nat['error']}" if nat.get("error") else ""),
        f"sessions      {st.get('sessions_active', 0)} active, {st.get('sessions_total', 0)} total",
        f"pushes        {sum((st.get('pushes') or {}).values())} received, "
        f"{sum((st.get('pushes_refused') or {}).values())} refused (a peer this agent does not admit)",
        f"uptime        {_age(st.get('uptime'))}",
    ]
    net = reg.get("network") if isinstance(reg, dict) else None
    if isinstance(net, dict):
        view = net.get("view") or {}
        text = f"network       route {view.get('route') or 'none'}, {net.get('changes', 0)} changes"
        if net.get("last_change"):
            text += f", last {_age(net.get('last_change_age'))} ago: {net['last_change']}"
        lines.insert(4, text)
    peers = st.get("peers")
    if isinstance(peers, list):
        lines += ["", render_peer_table(peers)]
    return "\n".join(lines)


def render_peer_table(peers: list[dict[str, Any]]) -> str:
    """One line per peer, like `tailscale status`: who, which key, allowed how, what is happening now."""
    if not peers:
        return "no peers yet (`punchthrough allow ID=SHA256:...` lets one in; `punchthrough-ops ping ID` tries one)"
    rows = []
    for p in peers:
        if p.get("active"):
            now = (
                f"active: {p['active']} session{'s' if p['active'] != 1 else ''} via {', '.join(p.get('paths') or [])}"
            )
        elif p.get("last_seen"):
            now = f"idle, last seen {_age(time.time() - float(p['last_seen']))} ago via {p.get('last_path') or '?'}"
        else:
            now = "never seen"
        key = str(p.get("key") or "")
        rows.append([p.get("id", "?"), key[:18] + "..." if len(key) > 18 else key or "-", p.get("allowed", "-"), now])
    return table(["PEER", "KEY", "ALLOWED IN", "NOW"], rows)


def render_actors(st: dict[str, Any]) -> str:
    """One row per component; in the grouped placement several share an actor (and its pid)."""
    rows = [
        [
            a["name"],
            a.get("actor", a["name"]),
            a.get("pid", "-"),
            a.get("state", "-"),
            a.get("restarts", 0),
            f"{a.get('cpu_percent', 0.0):.1f}%",
            _bytes(a.get("rss", 0)),
        ]
        for a in st.get("actors", [])
    ]
    actors = {a.get("actor", a["name"]) for a in st.get("actors", [])}
    head = f"placement: {st.get('placement', '?')}, {len(actors)} actor{'s' if len(actors) != 1 else ''}\n"
    return head + table(["COMPONENT", "ACTOR", "PID", "STATE", "RESTARTS", "CPU", "RSS"], rows)


def render_sessions(st: dict[str, Any]) -> str:
    rows = []
    for s in st.get("sessions", []):
        attempts = ", ".join(
            f"{a['strategy']}:{a['outcome']}" + (f"({a['reason']})" if a.get("reason") else "")
            for a in s.get("attempts", [])
        )
        key = str(s.get("peer_key") or "")
        trust = f"{key[:18]}... {s.get('admitted_by') or '?'}" if key else "-"
        if key and not s.get("id_verified", True):
            trust += " (ID unverified)"
        rows.append(
            [
                s["id"],
                s.get("peer", "-") or "-",
                s.get("role", "-"),
                s.get("path", "-") or "-",
                s.get("state", "-"),
                trust,
                _bytes(s.get("bytes_out", 0)),
                _bytes(s.get("bytes_in", 0)),
                _age(s.get("age")),
                attempts or one_line(s.get("error") or "-", 120),
            ]
        )
    if not rows:
        return "no sessions"
    headers = ["SESSION", "PEER", "ROLE", "PATH", "STATE", "KEY / TRUSTED BY", "OUT", "IN", "AGE", "ATTEMPTS / ERROR"]
    return table(headers, rows)


def _history(moves: list[dict[str, Any]]) -> str:
    """`relay 14:02:01 (won the race) -> lan 14:02:09 (...)`: the link's paths, oldest first."""
    parts = []
    for move in moves:
        at = time.strftime("%H:%M:%S", time.localtime(float(move.get("at", 0))))
        why = f" ({move['why']})" if move.get("why") else ""
        parts.append(f"{move.get('path', '?')} {at}{why}")
    return " -> ".join(parts)


def render_links(st: dict[str, Any]) -> str:
    rows = []
    for link in st.get("links", []):
        key = str(link.get("peer_key") or "")
        rows.append(
            [
                link["id"],
                link.get("peer", "-") or "-",
                link.get("role", "-"),
                link.get("path", "-") or "-",
                link.get("state", "-"),
                f"{key[:18]}..." if key else "-",
                f"{link.get('streams', 0)}/{link.get('streams_total', 0)}",
                _bytes(link.get("bytes_out", 0)),
                _bytes(link.get("bytes_in", 0)),
                _age(link.get("age")),
                one_line(link.get("error") or _history(link.get("history") or []) or "-", 160),
            ]
        )
    if not rows:
        return "no links"
    headers = ["LINK", "PEER", "ROLE", "PATH", "STATE", "PEER KEY", "STREAMS", "OUT", "IN", "AGE", "PATHS / ERROR"]
    return table(headers, rows)


def _ms(value: object) -> str:
    return f"{float(value):.1f} ms" if isinstance(value, int | float) else "-"


MAPPING_WORDS = {
    "ASYMMETRIC": "endpoint-independent: one public port for every destination (hole punching can work)",
    "SYMMETRIC": "endpoint-dependent (symmetric NAT): a new public port per destination; expect the relay",
}
UDP_MAPPING_WORDS = {
    "ENDPOINT_INDEPENDENT": "endpoint-independent (one public port per socket: a cone)",
    "ENDPOINT_DEPENDENT": "endpoint-dependent (a new public port per destination: symmetric)",
}
ALLOCATION_WORDS = {
    "PRESERVING": "the local port is kept",
    "SEQUENTIAL": "new ports in sequence, step {step} (the next ones can be predicted)",
    "RANDOM": "new ports at random",
}
FILTERING_WORDS = {
    "OPEN": "open: a reply from a port we never sent to gets in (full or address-restricted cone)",
    "PORT_DEPENDENT": "port-dependent: only from the exact address and port we sent to (port-restricted)",
}


def _behavior_lines(nat: dict[str, Any]) -> list[str]:
    """UDP mapping, port allocation and filtering, as agent/wire/nat_behavior.py measured them."""
    b = nat.get("behavior") or {}
    if b.get("udp_blocked"):
        return ["udp mapping   -  (UDP does not get through)", "filtering     -"]
    mapping = UDP_MAPPING_WORDS.get(str(b.get("mapping")), "not measured (no UDP answer from the NAT-test port)")
    allocation = ALLOCATION_WORDS.get(str(b.get("allocation")), "")
    if allocation:
        mapping += "; " + allocation.format(step=b.get("step"))
    unmeasured = "not measured (the server did not answer from its other port)"
    filtering = FILTERING_WORDS.get(str(b.get("filtering")), unmeasured)
    return [f"udp mapping   {mapping}", f"filtering     {filtering}"]


def _global_unicast(text: str) -> bool:
    """2000::/3, the test the IPv6 strategy uses for the addresses it offers and dials."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return ip.version == 6 and (int(ip) >> 125) == 0b001


def _is(text: str, prop: str) -> bool:
    try:
        return bool(getattr(ipaddress.ip_address(text), prop))
    except ValueError:
        return False


def render_netcheck(st: dict[str, Any]) -> str:
    """The measurement in words, like `tailscale netcheck`; `--json` keeps every raw field."""
    nat = st.get("nat") or {}
    addresses = [str(a) for a in st.get("addresses") or []]
    public = str(nat.get("public_ip") or "")
    if nat.get("udp_mapped_port"):
        seen = f"{nat.get('udp_public_ip') or '?'}:{nat['udp_mapped_port']}"
        udp = f"works (the server saw {seen} from local port {nat.get('udp_local_port')})"
    else:
        udp = f"does not get through: {nat.get('udp_error') or 'no answer'} (UDP hole punching is off the table)"
    name = str(nat.get("nat_name") or "UNKNOWN_NAT")
    if name in MAPPING_WORDS:
        mapping = f"{MAPPING_WORDS[name]}  [RustDesk: {name}]"
    else:
        mapping = f"unknown: {nat.get('error') or 'not measured'}"
    if not public:
        where = "unknown (the server did not say)"
    elif _is(public, "is_loopback"):
        where = f"{public} (the server is on this host: ask a server elsewhere to learn the public address)"
    elif public in addresses:
        where = f"{public} (on this host: no NAT between here and the server)"
    else:
        where = f"{public} (behind a NAT: this host's addresses are {', '.join(addresses) or 'none'})"
    if nat.get("port1") and nat.get("port1") == nat.get("local_tcp_port"):
        where += ", TCP port preserved"
    relay = st.get("relay") or {}
    relay_text = (
        f"{relay.get('address')}  TCP handshake {_ms(relay.get('rtt_ms'))}"
        if relay.get("rtt_ms") is not None
        else f"{relay.get('address') or '-'}  unreachable: {relay.get('error') or 'no answer'}"
    )
    v6 = [a for a in addresses if ":" in a and _global_unicast(a)]
    v6_local = [a for a in addresses if ":" in a and a not in v6]
    lines = [
        f"UDP           {udp}",
        f"mapping       {mapping}",
        *_behavior_lines(nat),
        f"public IP     {where}",
        f"IPv6          {', '.join(v6) if v6 else 'no global address on this host'}"
        + (f" (only {', '.join(v6_local)}, which peers elsewhere cannot reach)" if v6_local and not v6 else ""),
        f"server        {st.get('server') or '-'}  TCP handshake {_ms(nat.get('server_rtt_ms'))}",
        f"relay         {relay_text}",
    ]
    return "\n".join(lines)


def one_line(text: object, limit: int = 300) -> str:
    """An agent's error for stderr: its first line (a Ray actor error carries a whole traceback), cut short."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else "agent refused the request"
    if len(first) > limit:
        first = first[:limit] + "..."
    return first + (f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else "")


RENDER = {
    "status": render_status,
    "actors": render_actors,
    "sessions": render_sessions,
    "links": render_links,
    "netcheck": render_netcheck,
}


PING_SIZE = 32
PING_GAP = 0.2
"""Seconds between pings, as `ping -i 0.2`."""


def ping(state_dir: Path, peer: str, count: int, path: str, timeout: float) -> dict[str, Any]:
    """Open a session to `peer` with no target (the peer echoes) and time `count` round trips through it.

    The first number is what a new connection costs (the race and handshake); the round trips are
    what every byte pays on the path that won.
    """
    mine, theirs = loopback_pair()
    request = {
        "op": "open",
        "peer": peer,
        "target": "",
        "policy": path,
        "password": os.environ.get("PUNCHTHROUGH_PASSWORD"),
    }
    started = time.perf_counter()
    try:
        try:
            reply = ctlproto.call(control_socket(state_dir), request, [theirs.fileno()], timeout=timeout + 5)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OpsError(f"no agent running for state dir {state_dir} (start it with `punchthrough up`)") from None
        except ctlproto.ControlError as exc:
            raise OpsError(f"the agent for {state_dir} did not answer properly: {exc}") from None
        finally:
            theirs.close()
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else None
            raise OpsError(f"cannot reach {peer}: {one_line(error or 'the agent refused')}")
        setup_ms = (time.perf_counter() - started) * 1000
        mine.settimeout(timeout)
        rtts = []
        for seq in range(count):
            if seq:
                time.sleep(PING_GAP)
            probe = struct.pack("!Q", seq) + os.urandom(PING_SIZE - 8)
            sent = time.perf_counter()
            mine.sendall(probe)
            echoed = b""
            while len(echoed) < len(probe):
                chunk = mine.recv(len(probe) - len(echoed))
                if not chunk:
                    raise OpsError(f"{peer} closed the session after {seq} of {count} pings (an older agent?)")
                echoed += chunk
            if echoed != probe:
                raise OpsError(f"{peer} echoed something else than was sent (ping {seq})")
            rtts.append(round((time.perf_counter() - sent) * 1000, 3))
    except TimeoutError:
        raise OpsError(f"{peer} did not answer a ping within {timeout:g} s") from None
    except OSError as exc:
        raise OpsError(f"ping {peer}: {exc.strerror or exc}") from None
    finally:
        mine.close()
    won = str(reply.get("path", ""))
    return {
        "peer": peer,
        "path": won,
        "direct": won not in ("relay", ""),
        "session": reply.get("session"),
        "setup_ms": round(setup_ms, 3),
        "agent_setup_ms": reply.get("elapsed_ms"),
        "rtt_ms": rtts,
    }


def render_ping(result: dict[str, Any]) -> str:
    rtts = [float(r) for r in result.get("rtt_ms") or []]
    how = "direct" if result.get("direct") else "through the relay"
    lines = [f"session to {result['peer']} via {result.get('path') or '?'} ({how}) in {result['setup_ms']:.1f} ms"]
    lines += [
        f"pong from {result['peer']} via {result.get('path')}: seq={i} time={r:.2f} ms" for i, r in enumerate(rtts)
    ]
    if rtts:
        low, mean, high = min(rtts), sum(rtts) / len(rtts), max(rtts)
        lines.append(f"{len(rtts)} pings, round trip min/avg/max = {low:.2f}/{mean:.2f}/{high:.2f} ms")
    return "\n".join(lines)


def render_logs(where: Path, files: list[dict[str, Any]]) -> str:
    cap = logfiles.LOG_MAX_BYTES
    head = (
        f"{where}: one file per component, each rotated at {_bytes(cap)} with {logfiles.LOG_BACKUPS} old files "
        f"kept (at most {_bytes(cap * (1 + logfiles.LOG_BACKUPS))} per component); under systemd the "
        "supervisor logs to the journal (journalctl -u punchthrough-agent)"
    )
    if not files:
        return head + "\nno logs yet"
    rows = [[Path(f["file"]).name, _bytes(f["bytes"])] for f in files]
    return head + "\n" + table(["FILE", "SIZE"], rows)


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """--state-dir and --json before the subcommand or after it."""
    add_state_dir(p, top)
    add_anywhere(p, top, "--json", action="store_true", help="machine-readable output")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be within 1-1000, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be within 0-3600 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="punchthrough-ops", description="show what a running punchthrough agent is doing")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helps = {
        "status": "this agent: ID, server, registration, NAT, peers and their paths",
        "actors": "the agent's actors: pid, state, restarts, CPU, memory",
        "sessions": "every session: peer, path, state, bytes, attempts",
        "links": "every peer link: peer, path and its moves, streams open/total, bytes",
        "netcheck": "measure the network now: UDP, NAT mapping, public address, server and relay round trips",
    }
    for name in COMMANDS:
        _common(sub.add_parser(name, help=helps[name]), top=False)
    lg = sub.add_parser("logs", help="where this agent's logs are, how big each is and may grow (no agent needed)")
    _common(lg, top=False)
    pg = sub.add_parser("ping", help="open a session to a peer and time round trips through it (path, direct or not)")
    _common(pg, top=False)
    pg.add_argument("peer", help="peer ID (or ID@HOST[:PORT], ID=SHA256:...)")
    pg.add_argument("-c", "--count", type=_count, default=3, help="round trips to time (default 3)")
    pg.add_argument("--path", default="", help="path policy for this session (default: the agent's)")
    pg.add_argument("--timeout", type=_seconds, default=15.0, help="seconds to wait (default 15)")
    rl = sub.add_parser("relays", help="relays per node: replicas up, pairs, load and health (from servers' metrics)")
    _common(rl, top=False)
    rl.add_argument("endpoints", nargs="+", metavar="HOST:PORT",
                    help="metrics endpoints: a rendezvous server's and/or a relay pool's (--metrics)")
    rl.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait per endpoint (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        state_dir = args.state_dir or default_state_dir()
        path = control_socket(state_dir)
        if args.command == "logs":
            files = logfiles.inventory(state_dir / "logs")
            print(json.dumps(files, indent=2) if args.json else render_logs(state_dir / "logs", files))
            return 0
        if args.command == "relays":
            try:
                nodes = relays_view.relays_view(args.endpoints, args.timeout)
            except relays_view.ViewError as exc:
                raise OpsError(str(exc)) from None
            print(json.dumps({h: vars(n) for h, n in nodes.items()}, indent=2, sort_keys=True) if args.json
                  else relays_view.render(nodes))
            return 0
        if args.command == "ping":
            result = ping(state_dir, args.peer, args.count, args.path, args.timeout)
            print(json.dumps(result, indent=2, sort_keys=True) if args.json else render_ping(result))
            return 0
        try:
            reply = ctlproto.call(path, {"op": args.command}, timeout=30 if args.command == "netcheck" else 5)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OpsError(f"no agent running for state dir {state_dir} (start it with `punchthrough up`)") from None
        except (TimeoutError, OSError, ctlproto.ControlError) as exc:
            raise OpsError(f"agent at {path} did not answer: {exc}") from None
        if not isinstance(reply, dict):
            raise OpsError(f"agent at {path} sent a malformed reply (a {type(reply).__name__}, not a map)")
        if not reply.get("ok", False):
            raise OpsError(one_line(reply.get("error") or "agent refused the request"))
        if args.json:
            reply.pop("ok", None)
            print(json.dumps(reply, indent=2, sort_keys=True, default=str))
        else:
            try:
                text = RENDER[args.command](reply)
            except (KeyError, TypeError, AttributeError, ValueError, ArithmeticError) as exc:
                detail = one_line(f"{type(exc).__name__}: {exc}")
                raise OpsError(f"agent at {path} sent a malformed {args.command} reply ({detail})") from None
            print(text)
        return 0
    except OpsError as exc:
        print(f"punchthrough-ops: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
