"""The session owner: runs the encrypted handshake on every transport the strategies hand over,
picks the first one that authenticates, and pumps that session's bytes.

It is the only place that touches session bytes; the coordinator tells it what
to expect over its control socket, and strategies pass connected sockets to it by
fd passing. On the initiating side several transports may race for one session:
the first authenticated handshake wins, A sends SELECT on it and closes the rest
(their outcome is recorded as "lost the race"). The responder opens the forward
target only once it is selected, so a losing path never touches the target.
Every session and every transport ends in a recorded outcome.

On the responding side it judges who gets in: the handshake proves the peer holds
its key, and the policy (agent/control/access.py) says whether something this agent trusts
binds that key to the ID it claims. The rendezvous server's word about who asked
(a Binding, from the signed push that brought the transport) comes along in the
transport's metadata. Password guesses are slowed down (agent/session/guess_limiter.py).
Every admission and refusal is logged and kept in the session record.

A KCP transport comes with a second fd, its pump's notice socket (agent/kcp/stream.py):
when the session fails, that says whether KCP itself failed (and why) or the actor
pumping it died, so the error the client prints names the cause instead of "cut".
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common import ctlproto
from agent.common.netutil import connect_tcp, describe_error
from agent.common.tasks import TaskSet
from agent.identity import Identity
from agent.link.link import RESUME_WAIT, Link, LinkClosed, LinkStream, StreamRefused
from agent.link.resend_core import ResendError, decode_count, encode_count
from agent.session.forwards import Forwards, OpenRaced
from agent.session.guess_limiter import GuessLimiter, guess_keys
from agent.session.links import LinkRecord, LinkTable
from agent.session.seen import FLUSH_EVERY, SeenPeers
from agent.session.states import ACTIVE, Outcome, SessionState
from agent.session.stream import PumpStats, SessionError, StreamCodec, run_handshake
from agent.wire.frames import encode_frame
from agent.wire.handshake import (
    Binding,
    HandshakeError,
    Initiator,
    Policy,
    Responder,
    TrustedBy,
    stream_refusal,
)
from agent.wire.peer_ids import fingerprint

log = logging.getLogger(__name__)

SELECT = b"\x02"
"""A's first sealed frame on the transport it chose, with the new link's token: a link
(agent/link/link.py) runs on it from here. (Before links, 0x00 selected a one-stream session; an
agent of that kind refuses this one.)"""
RESUME = b"\x03"
"""A's first sealed frame on a transport that continues a running link: token, then how many of the
link's records A has (u64)."""
RESUMED = b"\x04"
"""B's answer to RESUME: how many of the link's records B has (u64); the link continues here."""
GONE = b"\x05"
"""B's answer to RESUME for a link it does not have (it ended it, or restarted): A ends the link at
once instead of trying to bring it back."""
TOKEN_BYTES = 16
UPGRADE_FIRST = 2.0
"""Seconds after a link came up on the relay before the first try for a direct path; each try that
finds none doubles the wait, up to UPGRADE_MAX."""
UPGRADE_MAX = 60.0
RECOVER_FOR = 60.0
"""Seconds the dialer keeps trying to bring a lost link back (new races, 0.5 s to 8 s apart)."""
PROBE_TIMEOUT = 1.0
"""Seconds a stream on a link that has been quiet waits to hear from the peer at all (a ping goes
with the stream's open); silence means the path died under the link: the stream races for a new
one instead of waiting out the open timeout. A busy link's peer is heard all the time."""
QUIET = 0.5
"""Seconds without a byte from the peer after which a link is probed as above."""
LINK_IDLE = 300.0
"""Seconds a link A dialled is kept without streams (the next `pipe` or `-L` connection to that peer
then opens in one round trip). Keepalives hold the relay and NAT state meanwhile."""

MAX_SESSIONS_KEPT = 256
"""Finished sessions kept for `punchthrough-ops sessions` (the oldest are forgotten first)."""
MAX_PENDING = 256
"""Sessions with transports waiting for their `initiate`: bounded, like all per-peer state."""
MAX_DECIDED = 4096
"""Sessions remembered as decided, so a late transport for one is closed (a few KB at most)."""
FINISHED = (SessionState.DONE, SessionState.FAILED, SessionState.LOST)
SELECT_TIMEOUT = 30.0
ECHO_LIMIT = 1 << 20
"""Bytes a peer that names no target may have echoed back (`punchthrough-ops ping`): a probe, not a pipe."""
NOTICE_GRACE = 0.5
"""Seconds a failed session waits for its KCP pump's notice (it dies or speaks within microseconds)."""


class PumpNotice:
    """The KCP pump's notice socket for one transport: how the transport ended, once it has."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.path = path or "udp_punch"
        self.verdict: str | None = None
        self._buf = b""

    def poll(self) -> str | None:
        """None while the pump says nothing; then "" for an orderly end, else one line on why it failed."""
        sock = self.sock
        if self.verdict is not None or sock is None:
            return self.verdict
        while b"\n" not in self._buf and len(self._buf) < 512:
            try:
                data = sock.recv(512)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            if not data:
                break
            self._buf += data
        line = self._buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()[:300]
        if not self._buf:
            self.verdict = f"lost: this agent's KCP pump (the {self.path} actor) died"
        elif line == "closed":
            self.verdict = ""
        else:
            self.verdict = f"{self.path}: KCP connection lost: {line}"
        self.close()
        return self.verdict

    async def wait(self, timeout: float) -> str | None:
        """`poll`, waiting up to `timeout` seconds for the pump to speak (or to be seen dead)."""
        if self.poll() is not None or self.sock is None:
            return self.verdict
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            async with asyncio.timeout(timeout):
                await ready
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)
        return self.poll()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class SessionRecord:
    id: str
    role: str
    peer: str = ""
    target: str = ""
    path: str = ""
    state: SessionState = SessionState.WAITING
    error: str = ""
    admitted_by: str = ""
    peer_key: str = ""
    """Fingerprint of the key the peer proved it holds (responder: also when it was refused)."""
    id_verified: bool = False
    transports: list[dict[str, Any]] = field(default_factory=list)
    stats: PumpStats = field(default_factory=PumpStats)
    created: float = field(default_factory=time.monotonic)
    notice: PumpNotice | None = None
    link: LinkRecord | None = None
    """The link this stream rides (or, for B's record of a handshake, the link it became)."""

    def failure(self) -> str:
        """Why the session failed ("" if it did not): the KCP pump's word first, asked here and not
        only once the pump task settles, since the client asks as soon as its stream is reset."""
        error = self.error or self.stats.error  # the pump notes its error before it resets the stream
        notice = self.notice or (self.link.notice if self.link is not None else None)
        if error and notice is not None:
            error = notice.poll() or error
        return error

    def settle_notice(self) -> None:
        """Done with the notice: a failed session takes the pump's verdict, if it has one."""
        if self.notice is not None:
            verdict = self.notice.poll() if self.state == SessionState.FAILED else None
            if verdict:
                self.error = verdict
            self.notice.close()

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "peer": self.peer,
            "target": self.target,
            "path": self.path,
            "state": self.state.value,
            "error": self.failure(),
            "admitted_by": self.admitted_by,
            "peer_key": self.peer_key,
            "id_verified": self.id_verified,
            "bytes_out": self.stats.bytes_out,
            "bytes_in": self.stats.bytes_in,
            "age": round(time.monotonic() - self.created, 3),
            "transports": list(self.transports),
            "link": self.link.id if self.link is not None else "",
        }


@dataclass
class TransportQueue:
    """Transports arriving for one initiating session (a strategy may hand one over before the
    coordinator's `initiate` for it arrives)."""

    queue: asyncio.Queue[tuple[dict[str, Any], socket.socket]] = field(default_factory=asyncio.Queue)
    no_more: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Won:
    path: str
    sock: socket.socket
    codec: StreamCodec
    peer_pk: bytes = b""
    key_source: str = ""
    """Where A's trust in B's key came from: "pinned" or "rendezvous-signed" (agent/wire/handshake.py)."""


async def _echo(sock: socket.socket, limit: int) -> None:
    """Send back what arrives until the peer closes or `limit` bytes have come (then close)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    left = limit
    try:
        while left > 0 and (data := await loop.sock_recv(sock, min(left, 65536))):
            left -= len(data)
            await loop.sock_sendall(sock, data)
    except OSError:
        pass
    finally:
        sock.close()


class SessionOwner:
    def __init__(
        self,
        socket_path: Path,
        identity: Callable[[], Identity],
        policy_factory: Callable[[], Policy | None],
        on_admitted: Callable[[str, bytes, str], None] | None = None,
        handshake_timeout: float = 10.0,
        seen: SeenPeers | None = None,
        link_idle: float = LINK_IDLE,
        relink: Callable[[dict[str, Any]], Any] | None = None,
        open_raced: OpenRaced | None = None,
        pinned: Callable[[str], bytes | None] | None = None,
    ) -> None:
        """`relink`: asks the coordinator for a race whose winner a running link moves onto (its
        "relink" request); without it links neither look for a better path nor come back when lost.
        `open_raced` and `pinned` serve `connect -L` forwards (agent/session/forwards.py): the
        coordinator's "open" for a connection no running link may take, and the key pinned for a peer."""
        self.socket_path = socket_path
        self.identity = identity
        """This agent's identity as it is now (it changes if the server made us move to a new ID)."""
        self.policy_factory = policy_factory
        self.guesses = GuessLimiter()
        self.seen = seen
        """Last seen / last path per peer (`punchthrough peers`), noted when a session opens."""
        self.on_admitted = on_admitted
        self.handshake_timeout = handshake_timeout
        self.sessions: dict[str, SessionRecord] = {}
        self.links = LinkTable()
        self.link_idle = link_idle
        self.relink = relink
        self._streams: dict[tuple[str, int], SessionRecord] = {}
        """(link, stream) -> the record of that stream, until it ends."""
        self._queues: dict[str, TransportQueue] = {}
        self._decided: OrderedDict[str, None] = OrderedDict()
        """Sessions whose race is over: a transport for one of them is closed at once (it used to
        re-create the session's queue and sit there until 256 newer sessions pushed it out)."""
        self._notices: dict[tuple[str, str], socket.socket] = {}
        """(session, path) -> a racing KCP transport's notice socket."""
        self._tasks = TaskSet()
        self.forwards = Forwards(self._stream, open_raced, pinned, self._spawn)
        self._server = ctlproto.ControlServer(socket_path, self._handle)

    async def start(self) -> None:
        await self._server.start()
        if self.seen is not None:
            self._spawn(self._flush_seen())

    async def _flush_seen(self) -> None:
        assert self.seen is not None
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            with contextlib.suppress(OSError):
                self.seen.flush()

    async def close(self) -> None:
        await self._server.close()
        for lrec in self.links.running():
            lrec.link.close("this agent is stopping")
        if self.seen is not None:
            with contextlib.suppress(OSError):
                self.seen.flush()
        await self._tasks.close()
        for queue in self._queues.values():
            while not queue.queue.empty():
                queue.queue.get_nowait()[1].close()
        for notice in self._notices.values():
            notice.close()
        self._notices.clear()

    def status(self) -> dict[str, Any]:
        active = sum(s.state in ACTIVE for s in self.sessions.values())
        return {"active": active, "total": len(self.sessions), "sessions": self.session_list()}

    def session_list(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.sessions.values()]

    def link_list(self) -> list[dict[str, Any]]:
        return self.links.as_list()

    # ---- control requests -----------------------------------------------------------------

    async def _handle(self, req: dict[str, Any], fds: list[int]) -> Any:
        op = req.get("op")
        socks = [socket.socket(fileno=fd) for fd in fds]
        for s in socks:
            s.setblocking(False)
        try:
            if op == "list":
                return {"ok": True, "sessions": self.session_list()}
            if op == "links":
                return {"ok": True, "links": self.link_list()}
            sid = str(req.get("session", ""))
            if op == "stream" and len(socks) == 1 and sid:
                return await self._stream(req, socks.pop())
            if op == "network_changed":
                return self._network_changed(str(req.get("reason", "")))
            if op == "listen" and len(socks) == 2:
                listener, notices = socks
                socks.clear()
                return self.forwards.start(req, listener, notices)
            if op == "resume" and not socks and sid:
                return await self._resume(req)
            if op == "transport" and len(socks) in (1, 2) and sid:
                transport = socks.pop(0)
                return self._on_transport(sid, req, transport, socks[0] if socks else None)
            if op == "transports_done" and sid:
                self._queue(sid).no_more.set()
                return {"ok": True}
            if op == "initiate" and len(socks) == 1 and sid:
                return await self._initiate(req, socks.pop())
            if op == "respond" and len(socks) in (1, 2) and sid:
                transport = socks.pop(0)
                return self._respond(req, transport, socks[0] if socks else None)
            return {"ok": False, "error": f"bad request {op!r} with {len(fds)} fds"}
        finally:
            for s in socks:
                s.close()

    def _record(self, sid: str, role: str) -> SessionRecord:
        rec = self.sessions.get(sid)
        if rec is None:
            rec = self.sessions[sid] = SessionRecord(sid, role)
            while len(self.sessions) > MAX_SESSIONS_KEPT:
                oldest = next((k for k, s in self.sessions.items() if s.state in FINISHED), None)
                if oldest is None:
                    break
                del self.sessions[oldest]
        return rec

    def _queue(self, sid: str) -> TransportQueue:
        queue = self._queues.get(sid)
        if queue is None:
            if len(self._queues) >= MAX_PENDING:
                oldest = next(iter(self._queues))
                self._drop_queue(oldest)
            queue = self._queues[sid] = TransportQueue()
        return queue

    def _drop_queue(self, sid: str) -> None:
        """The session's race is over: close what is still queued, and refuse what comes later."""
        queue = self._queues.pop(sid, None)
        if queue is not None:
            while not queue.queue.empty():
                queue.queue.get_nowait()[1].close()
        for key in [k for k in self._notices if k[0] == sid]:
            self._notices.pop(key).close()
        self._decided[sid] = None
        while len(self._decided) > MAX_DECIDED:
            self._decided.popitem(last=False)

    def _on_transport(
        self, sid: str, meta: dict[str, Any], sock: socket.socket, notice: socket.socket | None = None
    ) -> dict[str, Any]:
        """A strategy delivers a connected transport (with the peer key it was vouched) for an initiating
        session, and for KCP its pump's notice socket."""
        if sid in self._decided:
            return {"ok": False, "error": "session is no longer waiting for transports"}
        queue = self._queue(sid)
        if queue.no_more.is_set():
            return {"ok": False, "error": "session is no longer waiting for transports"}
        if len(bytes(meta.get("peer_pk", b""))) != 32:
            return {"ok": False, "error": "transport without a usable peer key"}
        if notice is not None:
            old = self._notices.pop((sid, str(meta.get("path", ""))), None)
            if old is not None:
                old.close()
            self._notices[(sid, str(meta.get("path", "")))] = notice.dup()
        queue.queue.put_nowait((meta, sock.dup()))
        return {"ok": True}

    # ---- A: race the transports ------------------------------------------------------------

    async def _initiate(self, req: dict[str, Any], local: socket.socket) -> dict[str, Any]:
        sid = str(req["session"])
        rec = self._record(sid, "initiator")
        rec.peer, rec.target = str(req["peer"]), str(req.get("target", ""))
        queue = self._queue(sid)
        try:
            won = await self._race_handshakes(req, rec, queue, float(req.get("wait", 10.0)))
            if won is not None and (notice := self._notices.pop((sid, won.path), None)) is not None:
                rec.notice = PumpNotice(notice, won.path)
        finally:
            self._drop_queue(sid)
        if won is None:
            rec.state = SessionState.FAILED
            return {"ok": False, "error": rec.error, "transports": rec.transports}
        rec.path = won.path
        rec.peer_key, rec.admitted_by, rec.id_verified = fingerprint(won.peer_pk), won.key_source, True
        pump_notice, rec.notice = rec.notice, None
        token = os.urandom(TOKEN_BYTES)
        try:
            preamble = won.codec.encode(SELECT + token)[0]
        except SessionError as exc:
            won.sock.close()
            rec.state, rec.error = SessionState.FAILED, str(exc)
            return {"ok": False, "error": rec.error, "transports": rec.transports}
        link = Link(won.sock, won.codec, dialer=True, idle=self.link_idle, preamble=preamble)
        link.token = token
        lrec = LinkRecord(uuidlib.uuid4().hex[:8], "dialer", rec.peer, rec.peer_key, won.path, link, won.key_source)
        lrec.peer_pk, lrec.target, lrec.policy = won.peer_pk, rec.target, str(req.get("policy") or "")
        lrec.note_path(won.path, "won the race")
        lrec.notice = pump_notice
        self._run_link(lrec)
        self._note_seen(rec)
        reply = await self._open_on(lrec, rec, local.dup())
        return {**reply, "transports": rec.transports}

    async def _stream(self, req: dict[str, Any], local: socket.socket) -> dict[str, Any]:
        """A new stream on a running link this agent dialled to the peer, if one may take it:
        {"ok": False, "no_link": True} when none may (the coordinator then races for a new one)."""
        peer, want = str(req.get("peer", "")), str(req.get("want_key", ""))
        paths = {str(p) for p in req.get("paths") or []}
        lrec = self.links.usable(peer, want, lambda path: path in paths)
        if lrec is None:
            return {"ok": False, "no_link": True}
        rec = self._record(str(req["session"]), "initiator")
        rec.peer, rec.target = peer, str(req.get("target", ""))
        rec.peer_key, rec.admitted_by, rec.id_verified = lrec.peer_key, lrec.admitted_by, True
        link = lrec.link
        reply = await self._open_on(lrec, rec, local.dup(), probe=link.quiet_for() > QUIET)
        if not reply["ok"] and (link.closing or link.suspect) and not rec.stats.bytes_out:
            del self.sessions[rec.id]
            return {"ok": False, "no_link": True}  # it went away meanwhile: race for a new one
        return reply

    async def _open_on(
        self, lrec: LinkRecord, rec: SessionRecord, local: socket.socket, probe: bool = False
    ) -> dict[str, Any]:
        """Open `rec`'s stream on the link; the link pumps `local` from then on. `probe`: the link was
        quiet, so its peer must be heard within PROBE_TIMEOUT or the stream gives up on it (and `local`
        is pumped only once the peer answered: untouched, it can still go to a race for a new link).
        Otherwise `local` is pumped at once, its first bytes riding with the open (Link.open)."""
        rec.path, rec.link = lrec.path, lrec
        early = None if probe else local
        opening = asyncio.ensure_future(lrec.link.open(rec.target, local=early, stats=rec.stats))
        try:
            if probe and not await lrec.link.heard_within(PROBE_TIMEOUT):
                opening.cancel()
                raise LinkClosed(f"no answer from the peer within {PROBE_TIMEOUT:.0f}s on this link")
            st = await opening
        except (StreamRefused, LinkClosed) as exc:
            local.close()
            rec.state, rec.error = SessionState.FAILED, f"peer {rec.peer}: {exc}"
            return {"ok": False, "error": rec.error}
        rec.state, rec.stats = SessionState.OPEN, st.stats
        self._streams[(lrec.id, st.sid)] = rec
        if early is None:
            lrec.link.attach(st, local)
        return {"ok": True, "session": rec.id, "path": lrec.path, "link": lrec.id}

    def _run_link(self, lrec: LinkRecord) -> None:
        link = lrec.link
        link.on_stream_end = lambda st: self._stream_ended(lrec, st)
        self.links.add(lrec)
        self._spawn(self._link_task(lrec))
        if lrec.role == "acceptor":
            link.resume_wait = RESUME_WAIT
        elif self.relink is not None:
            link.reconnect = lambda _link, reason: self._recover(lrec, reason)
            self._spawn(self._upgrade(lrec))

    # ---- moving a link to another transport -------------------------------------------------------

    async def _relink(self, lrec: LinkRecord, policy: str, why: str) -> bool:
        """Ask the coordinator for a race whose winner this link moves onto; True if it moved."""
        assert self.relink is not None
        moves = lrec.link.moves
        lrec.why = why
        request = {"peer": lrec.peer, "link": lrec.id, "target": lrec.target, "policy": policy}
        with contextlib.suppress(Exception):
            reply = await self.relink(request)
            if isinstance(reply, dict) and not reply.get("ok"):
                log.debug("link %s: no new transport (%s): %s", lrec.id, why, reply.get("error"))
        return lrec.link.moves > moves

    async def _upgrade(self, lrec: LinkRecord) -> None:
        """While the link runs on the relay, look for a direct path now and then (2 s, then doubling to
        60 s, and 2 s again after the link moved: its transport was lost, maybe with the network);
        one that authenticates takes the link's streams (agent/link/link.py moves them)."""
        words = [w.strip() for w in lrec.policy.split(",") if w.strip()]
        if any(w in ("relay-only", "relay") for w in words):
            return
        direct = ",".join(["direct-only", *(w for w in words if w not in ("auto", "direct-only", "direct"))])
        link = lrec.link
        delay = UPGRADE_FIRST
        while not link.ended.is_set():
            moves = link.moves
            waited = 0.0
            while waited < delay and link.moves == moves and not link.ended.is_set() and not lrec.poked:
                await asyncio.sleep(0.5)  # a move (a new transport, maybe a new network) starts over
                waited += 0.5
            if lrec.poked:  # the network changed: try now, and start the back-off over
                lrec.poked = False
                delay = UPGRADE_FIRST
            elif link.moves != moves:
                delay = UPGRADE_FIRST
                continue
            if link.ended.is_set() or link.moving or lrec.path != "relay":
                delay = UPGRADE_FIRST
                continue
            moved = await self._relink(lrec, direct, "a direct path authenticated")
            delay = UPGRADE_FIRST if moved else min(delay * 2, UPGRADE_MAX)

    def _network_changed(self, reason: str) -> dict[str, Any]:
        """This host's network changed (agent/nat/watch_core.py, through the coordinator). Each link we
        dialled is probed at once (a transport that died with the old network is replaced within a
        second, not after 30 s of silence), and one on the relay looks for a direct path now; the
        far ends' links are pinged, so the path is seen alive or not from both sides."""
        probed = 0
        for lrec in self.links.running():
            if lrec.link.moving:
                continue
            lrec.poked = True
            if lrec.role == "acceptor":
                lrec.link.ping()
            else:
                probed += 1
                self._spawn(self._probe_after_change(lrec, reason))
        return {"ok": True, "probed": probed}

    async def _probe_after_change(self, lrec: LinkRecord, reason: str) -> None:
        link = lrec.link
        if not await link.heard_within(PROBE_TIMEOUT) and not link.ended.is_set():
            link.give_up_transport(f"no answer within {PROBE_TIMEOUT:.0f}s after a network change ({reason})")

    async def _recover(self, lrec: LinkRecord, reason: str) -> bool:
        """The link's transport was lost: new races (any path its policy allows) until one takes it."""
        link = lrec.link
        log.warning("link %s to %s lost its %s path (%s): finding another", lrec.id, lrec.peer, lrec.path, reason)
        deadline = time.monotonic() + RECOVER_FOR
        delay = 0.5
        while time.monotonic() < deadline and not link.ended.is_set():
            if await self._relink(lrec, lrec.policy, f"{lrec.path} lost: {reason}"):
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8.0)
        return False

    async def _resume(self, req: dict[str, Any]) -> dict[str, Any]:
        """A's race for a running link's new transport; the winner takes the link over (`_move`)."""
        sid = str(req["session"])
        lrec = self.links.links.get(str(req.get("link", "")))
        rec = self._record(sid, "relink")
        rec.peer, rec.target = str(req["peer"]), str(req.get("target", ""))
        queue = self._queue(sid)
        try:
            won = await self._race_handshakes(req, rec, queue, float(req.get("wait", 10.0)))
            notice = self._notices.pop((sid, won.path), None) if won is not None else None
        finally:
            self._drop_queue(sid)
        if won is None:
            rec.state = SessionState.FAILED
            return {"ok": False, "error": rec.error, "transports": rec.transports}
        rec.path, rec.link = won.path, lrec
        rec.peer_key, rec.admitted_by, rec.id_verified = fingerprint(won.peer_pk), won.key_source, True
        if lrec is None or lrec.state != "up":
            error = "the link is gone"
        elif not hmac.compare_digest(won.peer_pk, lrec.peer_pk):
            error = "the new path's peer holds another key than the link's"
        else:
            error = await self._move(lrec, won)
        if error:
            won.sock.close()
            if notice is not None:
                notice.close()
            rec.state, rec.error = SessionState.FAILED, error
            return {"ok": False, "error": error, "transports": rec.transports}
        assert lrec is not None
        self._swap_notice(lrec, PumpNotice(notice, won.path) if notice is not None else None)
        rec.state = SessionState.DONE
        log.info("link %s to %s moved to %s (%s)", lrec.id, lrec.peer, won.path, lrec.why)
        lrec.note_path(won.path, lrec.why)
        return {"ok": True, "session": sid, "path": won.path, "link": lrec.id, "transports": rec.transports}

    async def _move(self, lrec: LinkRecord, won: _Won) -> str:
        """A's half of a move: pause the link, say how far we got, learn how far B got, continue on the
        new transport. "" when the link runs there, else why not (the link stays where it was)."""
        link = lrec.link
        count = await link.pause()
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(won.sock, won.codec.encode(RESUME + link.token + encode_count(count))[0])
            pending = await _first_pieces(won.sock, won.codec, self.handshake_timeout)
            if pending is not None and pending[0] == GONE:
                link.close(f"peer {lrec.peer} no longer has this link (it ended it or restarted)")
                return link.error
            if pending is None or pending[0] is None or pending[0][:1] != RESUMED:
                raise SessionError(f"peer {lrec.peer} did not resume the link")
            peer_count = decode_count(pending[0][1:])
            link.install(won.sock, won.codec, peer_count, [p for p in pending[1:] if p is not None])
        except ResendError as exc:
            link.close(f"the peer resumed the link where it cannot be: {exc}")
            return str(exc)
        except (SessionError, OSError, TimeoutError, LinkClosed) as exc:
            link.unpause()
            return str(exc) if isinstance(exc, (SessionError, LinkClosed)) else describe_error(exc)
        return ""

    def _swap_notice(self, lrec: LinkRecord, notice: PumpNotice | None) -> None:
        old = lrec.notice
        if isinstance(old, PumpNotice):
            old.close()
        lrec.notice = notice

    async def _link_task(self, lrec: LinkRecord) -> None:
        error = await lrec.link.run()
        notice = lrec.notice
        if isinstance(notice, PumpNotice):
            if error:
                with contextlib.suppress(Exception):
                    error = await notice.wait(NOTICE_GRACE) or error
            notice.close()
        self.links.ended(lrec, error)
        if error:
            log.warning("link %s to %s on %s ended: %s", lrec.id, lrec.peer, lrec.path, error)
        else:
            log.info("link %s to %s on %s closed", lrec.id, lrec.peer, lrec.path)

    def _stream_ended(self, lrec: LinkRecord, st: LinkStream) -> None:
        rec = self._streams.pop((lrec.id, st.sid), None)
        if rec is not None:
            rec.state = SessionState.FAILED if st.error else SessionState.DONE
            rec.error = st.error

    async def _race_handshakes(
        self, req: dict[str, Any], rec: SessionRecord, race: TransportQueue, wait: float
    ) -> _Won | None:
        """First transport whose handshake completes, or None with rec.error saying why all failed."""
        started = time.monotonic()
        running: dict[asyncio.Task[_Won], tuple[str, socket.socket, float]] = {}
        refusal = ""
        failures: list[str] = []

        async def shake(meta: dict[str, Any], sock: socket.socket) -> _Won:
            ident = self.identity()
            machine = Initiator(
                ident.peer_id,
                ident.signing_key,
                rec.peer,
                bytes(meta["peer_pk"]),
                password=req.get("password"),
                target=rec.target,
                key_source=str(meta.get("key_source", "expected")),
            )
            codec = await run_handshake(sock, machine, self.handshake_timeout)
            return _Won(str(meta.get("path", "")), sock, codec, bytes(meta["peer_pk"]), str(meta.get("key_source", "")))

        def note(path: str, outcome: Outcome, reason: str, since: float) -> None:
            rec.transports.append(
                {
                    "path": path,
                    "outcome": outcome.value,
                    "reason": reason,
                    "elapsed_ms": round((time.monotonic() - since) * 1000, 1),
                }
            )

        rec.state = SessionState.HANDSHAKE
        getter: asyncio.Task[tuple[dict[str, Any], socket.socket]] | None = None
        no_more = asyncio.ensure_future(race.no_more.wait())
        won: _Won | None = None
        try:
            while won is None:
                if getter is None and not (race.no_more.is_set() and race.queue.empty()):
                    getter = asyncio.ensure_future(race.queue.get())
                if getter is None and not running:
                    break
                left = wait - (time.monotonic() - started)
                if left <= 0:
                    failures.append(f"no path within {wait:.0f}s")
                    break
                waiting: set[asyncio.Future[Any]] = set(running)
                if getter is not None:
                    waiting.add(getter)
                if not no_more.done():
                    waiting.add(no_more)
                done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if getter is not None and getter in done:
                    meta, sock = getter.result()
                    getter = None
                    path = str(meta.get("path", ""))
                    running[asyncio.ensure_future(shake(meta, sock))] = (path, sock, time.monotonic())
                if no_more in done and getter is not None and race.queue.empty():
                    getter.cancel()
                    getter = None
                for task in [t for t in done if t in running]:
                    path, sock, since = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        won = task.result()
                        note(path, Outcome.WON, "", since)
                        break
                    sock.close()
                    reason = exc.reason if isinstance(exc, HandshakeError) else str(exc)
                    if isinstance(exc, HandshakeError) and exc.refused_by_peer:
                        refusal = reason  # B's policy is the same whatever the path: stop the race
                        note(path, Outcome.FAILED, reason, since)
                        break
                    failures.append(f"{path}: {reason}")
                    note(path, Outcome.FAILED, reason, since)
                if refusal:
                    break
        finally:
            if getter is not None:
                getter.cancel()
            no_more.cancel()
            for task, (path, sock, since) in running.items():
                task.cancel()
                sock.close()
                note(path, Outcome.LOST, "", since)
        if won is None:
            rec.error = refusal or ("; ".join(failures) if failures else "no path to the peer")
        return won

    # ---- B: answer a transport ----------------------------------------------------------------

    def _respond(
        self, req: dict[str, Any], transport: socket.socket, notice: socket.socket | None = None
    ) -> dict[str, Any]:
        """A strategy delivers a transport from a peer that wants in (for KCP, with its pump's notice socket)."""
        rec = self._record(str(req["session"]), "responder")
        rec.path = str(req.get("path", ""))
        rec.peer = str(req.get("binding_id", ""))
        if notice is not None:
            if rec.notice is not None:
                rec.notice.close()
            rec.notice = PumpNotice(notice.dup(), rec.path)
        binding = None
        if req.get("binding_id") and len(bytes(req.get("binding_pk", b""))) == 32:
            binding = Binding(str(req["binding_id"]), bytes(req["binding_pk"]))
        source = str(req.get("peer_ip") or "")
        if not source and rec.path not in ("relay", "udp_punch"):
            with contextlib.suppress(OSError, IndexError):
                source = str(transport.getpeername()[0])
        self._spawn(self._serve_responder_settled(rec, transport.dup(), binding, source))
        return {"ok": True}

    async def _serve_responder_settled(
        self, rec: SessionRecord, transport: socket.socket, binding: Binding | None, source: str
    ) -> None:
        try:
            await self._serve_responder(rec, transport, binding, source)
        finally:
            rec.settle_notice()

    async def _serve_responder(
        self, rec: SessionRecord, transport: socket.socket, binding: Binding | None, source: str
    ) -> None:
        policy = self.policy_factory()
        if policy is None:
            rec.state, rec.error = SessionState.FAILED, "this agent admits nobody (no allowed peers and no password)"
            log.warning("refused a %s connection from %s: %s", rec.path, source or "?", rec.error)
            transport.close()
            return
        rec.state = SessionState.HANDSHAKE
        ident = self.identity()

        def gate(claimed: str) -> str | None:
            return self.guesses.check(guess_keys(claimed, source), time.monotonic())

        machine = Responder(ident.peer_id, ident.signing_key, policy, binding=binding, password_gate=gate)
        loop = asyncio.get_running_loop()
        try:
            codec = await run_handshake(transport, machine, self.handshake_timeout)
        except HandshakeError as exc:
            rec.state, rec.error = SessionState.FAILED, exc.reason
            self._note_peer(rec, machine)
            if machine.password_failed and machine.claimed_id is not None:
                self.guesses.failed(guess_keys(machine.claimed_id, source), time.monotonic())
            for reply in exc.reply:
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(transport, encode_frame(reply))
            transport.close()
            log.warning(
                "refused peer %s (key %s) on %s from %s: %s",
                rec.peer or "?",
                rec.peer_key or "?",
                rec.path,
                source or "?",
                exc.reason,
            )
            return
        except SessionError as exc:
            rec.state, rec.error = SessionState.FAILED, str(exc)
            transport.close()
            return
        self._note_peer(rec, machine)
        rec.target = machine.target or ""
        rec.admitted_by = str(machine.admitted_by or "")
        rec.id_verified = machine.id_verified
        if machine.admitted_by is not None and machine.admitted_by.value == "password":
            self.guesses.succeeded(guess_keys(rec.peer, source))
        log.info(
            "admitted peer %s (key %s, trusted by %s%s) on %s from %s, target %s",
            rec.peer,
            rec.peer_key,
            rec.admitted_by,
            "" if rec.id_verified else ", ID not verified",
            rec.path,
            source or "?",
            rec.target or "(none)",
        )
        try:
            selected = await self._await_select(transport, codec)
        except (SessionError, OSError, TimeoutError, ResendError) as exc:
            selected, rec.error = None, str(exc) if not isinstance(exc, OSError) else describe_error(exc)
        if selected is None:
            rec.state = SessionState.LOST
            rec.error = rec.error or "the peer chose another path"
            transport.close()
            return
        token, peer_count, early = selected
        assert machine.peer_pk is not None and machine.admitted_by is not None
        if peer_count is not None:
            await self._resumed(rec, machine.peer_pk, transport, codec, token, peer_count, early)
            return
        if self.on_admitted and machine.peer_pk and machine.id_verified and _listed(policy, rec.peer):
            self.on_admitted(rec.peer, machine.peer_pk, rec.admitted_by)  # pinned from now on
        lrec = LinkRecord(rec.id, "acceptor", rec.peer, rec.peer_key, rec.path, Link(transport, codec, dialer=False))
        lrec.admitted_by, lrec.peer_pk, lrec.link.token = rec.admitted_by, machine.peer_pk, token
        lrec.note_path(rec.path, "selected by the peer")
        lrec.notice, rec.notice = rec.notice, None
        lrec.link.accept = self._acceptor(lrec, machine.peer_pk, machine.admitted_by, policy.password)
        lrec.link.early = early
        # This record's part is done: it became the link (`links` shows it; each stream gets a record).
        rec.state, rec.link = SessionState.DONE, lrec
        self._note_seen(rec)
        self._run_link(lrec)

    async def _resumed(
        self,
        rec: SessionRecord,
        peer_pk: bytes,
        transport: socket.socket,
        codec: StreamCodec,
        token: bytes,
        peer_count: int,
        early: list[bytes],
    ) -> None:
        """B's half of a move: the authenticated peer names a link by its token; only the same key may
        continue it. Pause it, say how far we got, continue on this transport."""
        lrec = next(
            (r for r in self.links.running() if r.role == "acceptor" and hmac.compare_digest(r.link.token, token)), None
        )
        if lrec is None or not hmac.compare_digest(lrec.peer_pk, peer_pk):
            rec.state, rec.error = SessionState.FAILED, "asked to continue a link this agent does not have"
            log.warning("peer %s (key %s) asked to continue an unknown link on %s", rec.peer, rec.peer_key, rec.path)
            with contextlib.suppress(OSError, SessionError, ValueError):
                await asyncio.get_running_loop().sock_sendall(transport, codec.encode(GONE)[0])
            transport.close()
            return
        link = lrec.link
        count = await link.pause()
        try:
            await asyncio.get_running_loop().sock_sendall(transport, codec.encode(RESUMED + encode_count(count))[0])
            link.install(transport, codec, peer_count, early)
        except ResendError as exc:
            link.close(f"the peer resumed the link where it cannot be: {exc}")
            rec.state, rec.error = SessionState.FAILED, str(exc)
            return
        except (OSError, SessionError, LinkClosed) as exc:
            transport.close()
            link.unpause()
            rec.state, rec.error = SessionState.FAILED, str(exc)
            return
        self._swap_notice(lrec, rec.notice)
        rec.notice = None
        rec.state, rec.link = SessionState.DONE, lrec
        log.info("link %s from %s moved to %s by the peer", lrec.id, lrec.peer, rec.path)
        lrec.note_path(rec.path, "moved by the peer")

    def _acceptor(
        self, lrec: LinkRecord, peer_pk: bytes, admitted_by: TrustedBy, password: str | None
    ) -> Callable[[LinkStream], Any]:
        """B's judge for each stream the peer opens on this link: the policy as it is now, then the target."""
        count = 0

        async def accept(st: LinkStream) -> socket.socket:
            nonlocal count
            count += 1
            rec = self._record(f"{lrec.id}.{count}", "responder")
            rec.peer, rec.peer_key, rec.path, rec.link = lrec.peer, lrec.peer_key, lrec.path, lrec
            rec.target, rec.admitted_by, rec.id_verified, rec.stats = st.target, lrec.admitted_by, True, st.stats
            my_id = self.identity().peer_id
            refusal = stream_refusal(
                self.policy_factory(), my_id, lrec.peer, peer_pk, admitted_by, password, st.target
            )
            try:
                if refusal is not None:
                    log.warning("refused a stream from peer %s to %s: %s", lrec.peer, st.target or "(echo)", refusal)
                    raise StreamRefused(refusal)
                local = await connect_tcp(st.target, timeout=5.0) if st.target else self._echo_end()
            except (OSError, TimeoutError, ValueError) as exc:
                rec.state, rec.error = SessionState.FAILED, f"target {st.target}: {describe_error(exc)}"
                raise StreamRefused(rec.error) from None
            except StreamRefused as exc:
                rec.state, rec.error = SessionState.FAILED, str(exc)
                raise
            rec.state = SessionState.OPEN
            self._streams[(lrec.id, st.sid)] = rec
            return local

        return accept

    def _echo_end(self) -> socket.socket:
        """No target: `punchthrough-ops ping`'s echo, up to ECHO_LIMIT bytes, instead of a forward."""
        local, far = socket.socketpair()
        local.setblocking(False)
        self._spawn(_echo(far, ECHO_LIMIT))
        return local

    async def _await_select(
        self, transport: socket.socket, codec: StreamCodec
    ) -> tuple[bytes, int | None, list[bytes]] | None:
        """Once A selects this transport: the link's token, A's record count if it continues a running
        link (None for a new one), and the link records that came with the selection. None if A
        closes it (another path won)."""
        pending = await _first_pieces(transport, codec, SELECT_TIMEOUT)
        if pending is None or any(piece is None for piece in pending):
            return None
        first, early = pending[0], [piece for piece in pending[1:] if piece is not None]
        assert first is not None
        if first[:1] == SELECT and len(first) == 1 + TOKEN_BYTES:
            return first[1:], None, early
        if first[:1] == RESUME and len(first) == 1 + TOKEN_BYTES + 8:
            return first[1 : 1 + TOKEN_BYTES], decode_count(first[1 + TOKEN_BYTES :]), early
        raise SessionError("peer did not select the path (an agent from before peer links?)")

    def _spawn(self, coro: Any) -> None:
        self._tasks.spawn(coro)

    def _note_seen(self, rec: SessionRecord) -> None:
        if self.seen is not None:
            with contextlib.suppress(OSError):
                self.seen.note(rec.peer, rec.path, rec.role, rec.peer_key)

    @staticmethod
    def _note_peer(rec: SessionRecord, machine: Responder) -> None:
        """Who the peer proved to be (its key), whatever came of it."""
        if machine.claimed_id is not None:
            rec.peer = machine.claimed_id
        if machine.claimed_pk is not None:
            rec.peer_key = fingerprint(machine.claimed_pk)


def _listed(policy: Policy, peer: str) -> bool:
    """Only a listed peer's key is worth pinning (a pin is consulted for listed IDs only)."""
    return peer in policy.allowed_ids or peer in policy.allowed_keys


async def _first_pieces(transport: socket.socket, codec: StreamCodec, timeout: float) -> list[bytes | None] | None:
    """Read until the codec yields something (bytes buffered since the handshake count first);
    None when the peer closes before that. Raises TimeoutError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        pending = codec.decode(b"")
        while not pending:
            chunk = await loop.sock_recv(transport, 65536)
            if not chunk:
                return None
            pending = codec.decode(chunk)
    return pending
