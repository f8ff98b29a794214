"""A third-party ICE agent (aioice) between two hosts of the NAT lab: connect time and the pair it selects.

    python -m bench.ice_agent [--scenarios both-cone,cone-symmetric] [--runs 10] [--timeout 15]
                              [--turn-transport udp|tcp] [--no-turn]

Needs root (network namespaces). Prints numbers, asserts nothing; every lab is torn down in `finally`.

What is measured, per run (a fresh pair of processes each time, so every run is a first connection):

* Two `aioice.Connection`s (aioice 0.13.0 when this was written; the version in use is printed), one
  component, UDP only, non-trickle: each runs in its own process inside its host's namespace (host `a`
  controlling, host `b` controlled). Candidates: every v4/v6 address of the host's interfaces (aioice
  skips 127.0.0.1 and link-local v6) as host candidates, a server-reflexive one from the STUN server
  (v4 only), and a relayed one from the TURN server (UDP, or TCP to the server with `--turn-transport
  tcp`). Both servers are one coturn (`turnserver`, Debian package `coturn`) on the lab's first server
  address in "wan", port 3478, long-term credentials, relaying to private (RFC 1918) peers denied;
  without coturn, a minimal STUN binding responder from this file stands in and there is no relay
  candidate. In udp-blocked only TURN over TCP gets through (`--turn-transport tcp`).
* Signalling: the parent relays one JSON line each way (ufrag, pwd, all candidates as SDP lines, then
  end-of-candidates) between the two processes' stdin/stdout, i.e. a local signalling channel of well
  under a millisecond, included in the time.
* Time: both processes are started and import aioice first (not timed); then both are told to go at
  once, and the time runs from the earlier of the two `gather_candidates()` starts to the return of
  `connect()` on the controlling side (CLOCK_MONOTONIC is one clock for every process of the machine).
  It includes STUN/TURN gathering (a server that does not answer holds gathering for aioice's 5 s).
* Data: after connect the controlling side sends "ping" datagrams (every 200 ms, at most 3 s) over the
  selected pair and the controlled side answers "pong"; a run counts as successful only if both arrive.
* Path: the selected (nominated) pair of the controlling side, `connection._nominated[1]`. aioice forms
  pairs from its sockets only, so their local candidate is always "host" or "relay" (a srflx candidate is
  the host socket seen through the NAT); the path is therefore "relay" if either end of the pair is a
  relayed candidate, else the remote candidate's type: "host" (no NAT between them), "srflx" (the peer's
  STUN-learned mapping) or "prflx" (an address first seen in a check, e.g. a symmetric NAT's new port).
  The raw "local->remote" types are kept under "pairs". A run that times out, fails ICE or moves no data
  counts as "failed".

aioice behaviour that shows in the numbers: it nominates aggressively as the controlling agent
(USE-CANDIDATE on every check), so the first pair whose check succeeds wins, not necessarily the best one
(a relayed pair sometimes beats a working direct one). A check that arrives for a pair whose own check is
already in progress starts no new (triggered) check, so when the first check was dropped by the peer's
NAT, the pair waits for its retransmission after 500 ms. A pair whose checks go unanswered gives up only
after aioice's 7 STUN transmissions (~31 s), longer than the default 15 s timeout. Gathering waits for
every STUN/TURN request to finish or for 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import math
import os
import queue
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file inside a namespace, too
    sys.path.insert(0, str(ROOT))

SELF = str(Path(__file__).resolve())
ICE_PORT = 3478  # STUN and TURN (coturn), or the fallback STUN responder; ours use 21114-21117
RELAY_PORTS = (40000, 40999)  # coturn's relayed addresses
TURN_USER, TURN_PASSWORD, TURN_REALM = "bench", "bench", "natlab"
SCENARIOS = ["both-cone", "both-symmetric", "cone-symmetric", "sequential-cone", "udp-blocked", "fullcone-symmetric"]
STUN_COOKIE = 0x2112A442

_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        print(msg, flush=True)


# ============================================================ the child: one ICE agent in one namespace


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def _side_main(args: dict[str, Any]) -> None:
    import aioice

    if os.environ.get("ICE_AGENT_LOG"):  # aioice's own log on stderr, for debugging
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(relativeCreated)d %(message)s")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def read() -> dict[str, Any]:
        line = await reader.readline()
        if not line:
            raise EOFError("parent closed the signalling channel")
        msg: dict[str, Any] = json.loads(line)
        return msg

    controlling = args["role"] == "controlling"
    stun, turn = args.get("stun"), args.get("turn")
    conn = aioice.Connection(
        ice_controlling=controlling,
        components=1,
        stun_server=(stun[0], int(stun[1])) if stun else None,
        turn_server=(turn[0], int(turn[1])) if turn else None,
        turn_username=turn[2] if turn else None,
        turn_password=turn[3] if turn else None,
        turn_transport=args.get("turn_transport", "udp"),
    )
    res: dict[str, Any] = {"role": args["role"], "ok": False, "stage": "ready"}
    _emit({"ready": True})
    await read()  # "go"
    res["t_start"] = time.monotonic()

    async def negotiate() -> None:
        res["stage"] = "gather"
        await conn.gather_candidates()
        res["t_gathered"] = time.monotonic()
        res["local_candidates"] = [c.to_sdp() for c in conn.local_candidates]
        _emit({"offer": {"ufrag": conn.local_username, "pwd": conn.local_password,
                         "candidates": res["local_candidates"]}})
        res["stage"] = "signal"
        offer = (await read())["remote"]
        for sdp in offer["candidates"]:
            await conn.add_remote_candidate(aioice.Candidate.from_sdp(sdp))
        await conn.add_remote_candidate(None)
        conn.remote_username, conn.remote_password = offer["ufrag"], offer["pwd"]
        res["stage"] = "connect"
        await conn.connect()
        res["t_connected"] = time.monotonic()

    try:
        await asyncio.wait_for(negotiate(), args["timeout"])
    except TimeoutError:
        states = Counter(p.state.name for p in conn._check_list)
        res["error"] = (f"{args['role']}: timed out after {args['timeout']:.0f} s in {res['stage']} "
                        f"(pairs: {dict(states) or 'none'}; local {len(conn.local_candidates)} candidates, "
                        f"remote {len(conn.remote_candidates)})")
    except Exception as exc:
        res["error"] = f"{args['role']}: {res['stage']}: {type(exc).__name__}: {exc}"

    echo: asyncio.Task[None] | None = None
    if "t_connected" in res:
        pair = conn._nominated.get(1)
        if pair is not None:
            res["local_type"], res["remote_type"] = pair.local_candidate.type, pair.remote_candidate.type
            res["pair"] = f"{pair.local_candidate.to_sdp()} -> {pair.remote_candidate.to_sdp()}"
        res["stage"] = "data"
        if controlling:
            res["data_ok"] = await _ping(conn)
        else:
            got_ping = asyncio.Event()
            echo = asyncio.create_task(_echo(conn, got_ping))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got_ping.wait(), 3.0)
            res["data_ok"] = got_ping.is_set()
        res["ok"] = bool(res["data_ok"])
        if not res["data_ok"]:
            res["error"] = f"{args['role']}: connected, but no {'pong' if controlling else 'ping'} arrived within 3 s"
    _emit({"result": res})
    with contextlib.suppress(EOFError, ValueError):
        await read()  # "bye" (or EOF): the controlled side keeps answering pings until then
    if echo is not None:
        echo.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 3.0)


async def _ping(conn: Any) -> bool:
    deadline = time.monotonic() + 3.0
    with contextlib.suppress(ConnectionError):
        while time.monotonic() < deadline:
            await conn.send(b"ping")
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(conn.recv(), 0.2) == b"pong":
                    return True
    return False


async def _echo(conn: Any, got_ping: asyncio.Event) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            if await conn.recv() == b"ping":
                got_ping.set()
                await conn.send(b"pong")


def side(args: dict[str, Any]) -> None:
    asyncio.run(_side_main(args))


# ============================================================ a minimal STUN server (fallback without coturn)


def stun_binding_response(data: bytes, addr: tuple[str, int]) -> bytes | None:
    """RFC 5389 Binding success response with XOR-MAPPED-ADDRESS (v4), or None if `data` is no Binding request."""
    if len(data) < 20:
        return None
    mtype, _length, cookie = struct.unpack("!HHI", data[:8])
    if mtype != 0x0001 or cookie != STUN_COOKIE:
        return None
    tid = data[8:20]
    xport = addr[1] ^ (STUN_COOKIE >> 16)
    xaddr = struct.unpack("!I", socket.inet_aton(addr[0]))[0] ^ STUN_COOKIE
    attr = struct.pack("!HHBBHI", 0x0020, 8, 0, 0x01, xport, xaddr)
    return struct.pack("!HHI", 0x0101, len(attr), STUN_COOKIE) + tid + attr


def stun_serve(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    print("ready", flush=True)
    while True:
        data, addr = sock.recvfrom(2048)
        reply = stun_binding_response(data, addr)
        if reply is not None:
            sock.sendto(reply, addr)


def _stun_probe(lab: Any, addr: tuple[str, int], wait: float) -> bool:
    """Whether a STUN Binding request from inside "wan" gets its answer within `wait` seconds."""
    sock = lab.socket("wan")
    tid = os.urandom(12)
    request = struct.pack("!HHI", 0x0001, 0, STUN_COOKIE) + tid
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        sock.sendto(request, addr)
        sock.settimeout(0.1)
        with contextlib.suppress(TimeoutError, ConnectionRefusedError):
            data = sock.recv(2048)
            if data[:2] == b"\x01\x01" and data[8:20] == tid:
                return True
    return False


# ============================================================ the driver (root namespace)


def start_ice_servers(lab: Any) -> tuple[tuple[str, int] | None, tuple[str, int, str, str] | None]:
    """STUN and TURN (coturn) in "wan" on the lab's first server address, port 3478; without coturn a
    minimal STUN responder and no TURN. Returns (stun_addr, (host, port, user, password)); None for what
    could not be started (the reason printed once). Processes are started with lab.popen, so lab.down()
    ends them."""
    from ops.natlab import SERVER_V4

    host = SERVER_V4[0]
    why = "coturn's `turnserver` is not installed (apt-get install coturn)"
    if shutil.which("turnserver"):
        work = tempfile.mkdtemp(prefix="natlab-ice-")
        atexit.register(shutil.rmtree, work, True)
        log_path = Path(work) / "turnserver.log"
        with log_path.open("wb") as log:
            proc = lab.popen("wan", [
                "turnserver", "-n",  # no configuration file: everything is on this line
                f"--listening-ip={host}", f"--relay-ip={host}", f"--listening-port={ICE_PORT}",
                f"--min-port={RELAY_PORTS[0]}", f"--max-port={RELAY_PORTS[1]}",
                "--lt-cred-mech", f"--user={TURN_USER}:{TURN_PASSWORD}", f"--realm={TURN_REALM}",
                "--no-tls", "--no-dtls", "--no-cli", "--no-rfc5780", "--no-software-attribute",
                # No relaying to private addresses (coturn's advice for production). Here it is also needed:
                # "wan" has no route to the LANs, and a relay send that fails with ENETUNREACH makes
                # coturn drop the whole allocation, so one check towards a peer's host candidate
                # would kill the relayed candidate.
                *(f"--denied-peer-ip={r}" for r in ("10.0.0.0-10.255.255.255", "172.16.0.0-172.31.255.255",
                                                      "192.168.0.0-192.168.255.255")),
                "--log-file=stdout", "--simple-log",
                f"--userdb={work}/turndb", f"--pidfile={work}/turnserver.pid",
            ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if _stun_probe(lab, (host, ICE_PORT), 5.0):
            return (host, ICE_PORT), (host, ICE_PORT, TURN_USER, TURN_PASSWORD)
        proc.kill()
        proc.wait()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        why = f"coturn did not answer STUN within 5 s (exit {proc.poll()}): {' | '.join(tail)}"
    _say_once(f"ice_agent: TURN unavailable, STUN by the built-in responder: {why}")
    proc = lab.popen("wan", [sys.executable, SELF, "_stun", host, str(ICE_PORT)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    if proc.stdout.readline().strip() == b"ready" and _stun_probe(lab, (host, ICE_PORT), 3.0):
        return (host, ICE_PORT), None
    proc.kill()
    proc.wait()
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
    _say_once(f"ice_agent: STUN unavailable too: the built-in responder did not start ({' '.join(err) or 'no answer'})")
    return None, None


class _Side:
    """One child process and a thread that turns its stdout into (name, message) items on a queue."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], events: queue.Queue[tuple[str, Any]]) -> None:
        self.name, self.proc = name, proc
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for line in out:
                try:
                    events.put((name, json.loads(line)))
                except ValueError:
                    events.put((name, {"noise": line.decode(errors="replace").strip()}))
            events.put((name, None))

        threading.Thread(target=pump, daemon=True, name=f"ice-{name}").start()

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()

    def finish(self, err: IO[bytes]) -> str:
        """Close its stdin, reap it; the tail of its stderr if it failed."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode in (0, -9):
            return ""
        err.seek(0)
        return f"{self.name} exit {self.proc.returncode}: {err.read().decode(errors='replace').strip()[-400:]}"


def _one_run(lab: Any, a: str, b: str, base: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One connection: returns the controlling side's result plus "elapsed", or {"error": ...}."""
    with contextlib.ExitStack() as stack:
        errs: dict[str, IO[bytes]] = {n: stack.enter_context(tempfile.TemporaryFile())
                                      for n in ("controlling", "controlled")}
        sides: dict[str, _Side] = {}
        out: dict[str, Any] = {}
        try:
            out = _drive(lab, {"controlling": a, "controlled": b}, base, timeout, errs, sides)
        finally:
            for s in sides.values():
                s.send({"bye": True})
            for name, s in sides.items():
                crash = s.finish(errs[name])
                if crash and not out.get("ok"):
                    out["error"] = f"{out.get('error', '')}; {crash}".lstrip("; ")
        return out


def _drive(lab: Any, hosts: dict[str, str], base: dict[str, Any], timeout: float, errs: dict[str, IO[bytes]],
           sides: dict[str, _Side]) -> dict[str, Any]:
    """Start both sides (into `sides`), start them at once, relay their offers, collect both results."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    for name, host in hosts.items():
        proc = lab.popen(host, [sys.executable, SELF, "_side", json.dumps({**base, "role": name})],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[name], cwd=str(ROOT))
        sides[name] = _Side(name, proc, events)
    other = {"controlling": "controlled", "controlled": "controlling"}
    results: dict[str, dict[str, Any]] = {}
    ready: set[str] = set()
    deadline = time.monotonic() + 30.0  # Python start and imports, not timed
    while len(results) < 2:
        left = deadline - time.monotonic()
        if left <= 0:
            return {"error": f"no result from {', '.join(sorted(set(sides) - set(results)))} in time"}
        try:
            name, msg = events.get(timeout=left)
        except queue.Empty:
            continue
        if msg is None:
            if name not in results:
                return {"error": f"{name} exited before reporting"}
        elif "ready" in msg:
            ready.add(name)
            if len(ready) == 2:
                for s in sides.values():
                    s.send({"go": True})
                deadline = time.monotonic() + timeout + 8.0
        elif "offer" in msg:
            sides[other[name]].send({"remote": msg["offer"]})
        elif "result" in msg:
            results[name] = msg["result"]
    ctl, ctd = results["controlling"], results["controlled"]
    out = dict(ctl)
    if "t_connected" in ctl:
        out["elapsed"] = ctl["t_connected"] - min(ctl["t_start"], ctd["t_start"])
    if ctl.get("ok") and not ctd.get("ok"):
        out["ok"] = False
        out["error"] = ctd.get("error", "the controlled side did not confirm")
    elif not ctl.get("ok") and not ctl.get("error"):
        out["error"] = ctd.get("error", "failed")
    return out


def path_of(local_type: str, remote_type: str) -> str:
    return "relay" if "relay" in (local_type, remote_type) else remote_type


def measure_ice(lab: Any, a: str, b: str, runs: int, stun: tuple[str, int] | None,
                turn: tuple[str, int, str, str] | None, timeout: float = 15.0,
                *, turn_transport: str = "udp") -> dict[str, Any]:
    """Run `runs` ICE connections from host `a` (controlling) to host `b` of `lab` (an ops.natlab.Lab that is up).

    Returns {"times": [seconds per successful run], "paths": {"host"|"srflx"|"prflx"|"relay"|"failed": count},
    "errors": [str], "pairs": {"local->remote" candidate types: count}, "gather": [seconds, controlling side]}.
    `turn_transport` "tcp" reaches the TURN server over TCP (the relayed address is UDP either way).
    """
    base = {"stun": list(stun) if stun else None, "turn": list(turn) if turn else None,
            "turn_transport": turn_transport, "timeout": timeout}
    times: list[float] = []
    gather: list[float] = []
    paths: Counter[str] = Counter()
    pairs: Counter[str] = Counter()
    errors: list[str] = []
    for _ in range(runs):
        try:
            res = _one_run(lab, a, b, base, timeout)
        except Exception as exc:
            res = {"error": f"{type(exc).__name__}: {exc}"}
        if "t_gathered" in res:
            gather.append(res["t_gathered"] - res["t_start"])
        if res.get("ok") and "elapsed" in res and "local_type" in res:
            times.append(res["elapsed"])
            paths[path_of(res["local_type"], res["remote_type"])] += 1
            pairs[f"{res['local_type']}->{res['remote_type']}"] += 1
        else:
            paths["failed"] += 1
            errors.append(str(res.get("error") or "failed"))
    return {"times": times, "paths": dict(paths), "errors": errors, "pairs": dict(pairs), "gather": gather}


# ============================================================ standalone


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 10 samples p90 is the 9th)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _ms(v: float) -> str:
    return f"{v * 1000:.0f}" if v >= 0.0995 else f"{v * 1000:.1f}"


def render(scenario: str, runs: int, res: dict[str, Any]) -> str:
    t = res["times"]
    times = f"median {_ms(statistics.median(t))} ms  p90 {_ms(pct(t, 90))} ms" if t else "median -  p90 -"
    paths = ", ".join(f"{k} x{v}" for k, v in sorted(res["paths"].items(), key=lambda kv: -kv[1])) or "-"
    pairs = ", ".join(f"{k} x{v}" for k, v in res.get("pairs", {}).items())
    g = res.get("gather") or []
    gather = f"  gather median {_ms(statistics.median(g))} ms" if g else ""
    return (f"{scenario:<20} ok {len(t)}/{runs}  {times}  paths: {paths}"
            + (f"  (pairs {pairs})" if pairs else "") + gather)


def _versions() -> str:
    try:
        from importlib.metadata import version
        aioice = version("aioice")
    except Exception:
        aioice = "not installed"
    coturn = "not installed"
    if shutil.which("turnserver"):
        out = subprocess.run(["turnserver", "--version"], capture_output=True, text=True, check=False)
        coturn = (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"
    return f"aioice {aioice}, coturn {coturn}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_side"]:
        side(json.loads(argv[1]))
        return 0
    if argv[:1] == ["_stun"]:
        stun_serve(argv[1], int(argv[2]))
        return 0
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per connection, gathering included")
    p.add_argument("--turn-transport", choices=["udp", "tcp"], default="udp")
    p.add_argument("--no-turn", action="store_true", help="STUN only: no relayed candidates")
    args = p.parse_args(argv)
    from ops.natlab import SCENARIOS as KNOWN
    from ops.natlab import Lab, available

    ok, why = available()
    if not ok:
        print(f"ice_agent bench skipped: {why}")
        return 0
    wanted = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in wanted if s not in KNOWN]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    print(f"ICE agent bench: {_versions()}; {args.runs} runs per scenario, timeout {args.timeout:.0f} s, "
          f"TURN over {args.turn_transport}" + (" (disabled)" if args.no_turn else ""), flush=True)
    for name in wanted:
        b = "hb" if KNOWN[name].b is not None else "ha2"
        lab = Lab(name)
        try:
            lab.up()
            stun, turn = start_ice_servers(lab)
            res = measure_ice(lab, "ha", b, args.runs, stun, None if args.no_turn else turn, args.timeout,
                              turn_transport=args.turn_transport)
            print(render(name, args.runs, res), flush=True)
            for e in list(dict.fromkeys(res["errors"]))[:3]:
                print(f"{'':<20} error: {e[:500]}", flush=True)
        except Exception as exc:
            print(f"{name:<20} setup failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
