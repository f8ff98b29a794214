"""RendezvousCore's UDP and TCP handlers fed arbitrary datagrams and frames from arbitrary sources.

Input: [cfg] then records [op][aux][len u16][payload]. op: bits 0-1 what (0 UDP datagram,
1 TCP frame on the main port, 2 on the NAT-test port, 3 control: tick, or tcp_closed when
the payload is not empty), bits 2-4 the source (a pool of eight addresses: private, public,
same-IP, IPv6, v4-mapped, loopback, unspecified), bits 5-7 how far the clock moves first.
aux: bits 0-2 the TCP connection id, bits 3-4 the UDP endpoint index. cfg picks always_relay,
whether relays are configured, small or default limits, and whether RustDesk's unsigned clients
are allowed. Persist actions are applied to an in-memory store that keeps the registry's
ownership rules, so evicted peers come back. The core's challenge secret is fixed, so seeds
carry real signed registrations and requests (keys below).

Invariants (anything else that escapes is a crash): the core never raises; every datagram it
answers a UDP source with goes to that source, from the endpoint it came in on, and is never
larger than the request (so a spoofed source cannot turn it into an amplifier); every datagram
a TCP request causes goes to a registered, online peer; frames and closes go to connections
that exist; every payload it emits parses; Persist rows carry valid IDs and bounded fields;
a signed binding never changes key and is never replaced by an unsigned one; every push is
signed by the server for the peer it goes to, and never names a key-bound requester with another
key than its bound one; no table outgrows its limit.
"""

from __future__ import annotations

from typing import Any

from fuzz._common import Reader, entry, instrumented, record

with instrumented():
    from nacl.signing import SigningKey

    from agent.proto import rendezvous_pb2 as pb
    from agent.servers.registry import PeerRow
    from agent.servers.rendezvous_core import (
        MAX_PK,
        MAX_TCP_MESSAGE,
        MAX_UUID,
        CloseTcp,
        Limits,
        Origin,
        Persist,
        RendezvousCore,
        SendTcp,
        SendUdp,
        valid_id,
    )
    from agent.wire import addr, messages, signing
    from agent.wire.addr import SockAddr, to_v4_if_mapped
    from agent.wire.peer_ids import derive_id

SOURCES = tuple(
    SockAddr.of(h, p)
    for h, p in (
        ("10.0.0.1", 40000),
        ("10.0.0.2", 40001),
        ("10.0.0.1", 40002),
        ("198.51.100.7", 5555),
        ("2001:db8::1", 6000),
        ("::ffff:10.0.0.2", 40001),
        ("127.0.0.1", 21116),
        ("0.0.0.0", 0),
    )
)
STEPS = (0.0, 0.001, 0.5, 1.0, 6.5, 30.0, 61.0, 86401.0)
SMALL = Limits(
    max_peers=4,
    max_pending=3,
    max_ip_states=3,
    ip_block_limit=5,
    ip_ids_limit=4,
    id_pk_limit=2,
    push_burst=3.0,
    push_rate=1.0,
    max_log_sources=4,
)
SERVER_KEY = SigningKey(bytes(range(32)))
SERVER_PK = bytes(SERVER_KEY.verify_key)
SECRET = bytes(32)
PUSHES = ("punch_hole", "fetch_local_addr", "request_relay")


class Store:
    """The registry's read side, with its ownership rules (agent/servers/registry.py's SQL)."""

    def __init__(self) -> None:
        self.rows: dict[str, PeerRow] = {}

    def get(self, peer_id: str) -> PeerRow | None:
        return self.rows.get(peer_id)

    def persist(self, row: PeerRow) -> None:
        old = self.rows.get(row.id)
        if old is not None and old.signed:
            assert row.signed, f"an unsigned registration replaced the signed binding of {row.id}"
            assert row.pk == old.pk, f"the signed binding of {row.id} changed key"
        if old is None or (old.signed and row.pk == old.pk) or (not old.signed and old.uuid == row.uuid):
            self.rows[row.id] = row


def registered(core: RendezvousCore, target: SockAddr, now: float) -> bool:
    return any(p.addr == target and core.is_online(p, now) for p in core.peers.values())


def check_actions(
    core: RendezvousCore,
    actions: list[Any],
    store: Store,
    conns: set[int],
    now: float,
    udp: tuple[SockAddr, int, int] | None,
) -> None:
    for act in actions:
        if isinstance(act, SendUdp):
            messages.parse(act.payload, max_len=MAX_TCP_MESSAGE)
            if udp is not None:
                src, via, size = udp
                assert act.addr == src, f"UDP input from {src} made the core send a datagram to {act.addr}"
                assert act.via == via
                assert len(act.payload) <= size, f"amplification: {len(act.payload)}-byte answer to {size} bytes"
            else:
                assert registered(core, act.addr, now), f"TCP input made the core send to unregistered {act.addr}"
                check_push(core, act)
        elif isinstance(act, SendTcp):
            assert act.conn in conns, f"frame for unknown connection {act.conn}"
            messages.parse(act.payload, max_len=MAX_TCP_MESSAGE)
        elif isinstance(act, CloseTcp):
            assert act.conn in conns
        elif isinstance(act, Persist):
            row = act.row
            assert valid_id(row.id) and 0 < len(row.pk) <= MAX_PK and 0 < len(row.uuid) <= MAX_UUID
            store.persist(row)
        else:
            raise AssertionError(f"unknown action {act!r}")


def check_push(core: RendezvousCore, act: Any) -> None:
    """A push is the server's, signed for the peer it goes to, and names its requester truthfully."""
    kind, msg = messages.parse(act.payload, max_len=MAX_TCP_MESSAGE)
    assert kind in PUSHES, f"TCP input made the core push a {kind}"
    targets = [p.id for p in core.peers.values() if p.addr == act.addr]
    body, sig = signing.split(act.payload)
    assert any(signing.verify(SERVER_PK, signing.PUSH, t.encode(), body, sig) for t in targets), "unsigned push"
    if msg.requester_id:  # a key-bound requester with its bound key, or an unbound one (derived: the core checks)
        bound = core.lookup(msg.requester_id)
        assert bound is None or (bound.signed and bound.pk == msg.requester_pk), "push names a requester falsely"


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    cfg = r.byte()
    store = Store()
    limits = SMALL if cfg & 4 else Limits()
    relays = [] if cfg & 2 else ["127.0.0.1:21117", "[2001:db8::9]:21117"]
    core = RendezvousCore(
        store,
        SERVER_KEY,
        relays=relays,
        always_relay=bool(cfg & 1),
        limits=limits,
        allow_unsigned=bool(cfg & 8),
        secret=SECRET,
        new_token=lambda: b"t" * 16,
    )
    now = 1000.0
    slots: dict[int, tuple[int, SockAddr]] = {}  # slot -> (connection id, its source): a TCP peer never moves
    conns: set[int] = set()  # open connections
    next_conn = 1
    while r:
        op, aux = r.byte(), r.byte()
        payload = r.take(r.u16())
        src = SOURCES[(op >> 2) & 7]
        now += STEPS[op >> 5]
        slot = aux & 7
        via = (aux >> 3) & 3
        what = op & 3
        if what == 0:
            actions = core.handle_udp(payload, src, via, now)
            check_actions(core, actions, store, conns, now, (to_v4_if_mapped(src), via, len(payload)))
        elif what in (1, 2):
            if slot not in slots or slots[slot][1] != src:
                if slot in slots:  # that connection ended; this is a new one from another source
                    core.tcp_closed(slots[slot][0])
                    conns.discard(slots[slot][0])
                slots[slot] = (next_conn, src)
                conns.add(next_conn)
                next_conn += 1
            conn = slots[slot][0]
            actions = core.handle_tcp(conn, src, "main" if what == 1 else "nat", payload, now)
            check_actions(core, actions, store, conns, now, None)
            if any(isinstance(a, CloseTcp) for a in actions):
                core.tcp_closed(conn)
                conns.discard(conn)
                del slots[slot]
        elif payload:
            if slot in slots:
                core.tcp_closed(slots[slot][0])
                conns.discard(slots[slot][0])
                del slots[slot]
        else:
            core.tick(now)
        assert len(core.peers) <= limits.max_peers
        assert len(core.pending) <= limits.max_pending
        assert len(core.ip_states) <= limits.max_ip_states
        assert all(p.conn in conns for p in core.pending.values()), "a request is parked for a closed connection"
    core.stats(now)


# ----------------------------------------------------------------------------- seeds

A, B, C = 0, 1, 3  # source indexes: A asks, B is asked, C is a stranger
A_ID, B_ID = "111111111", "222222222"
PK = bytes(range(32))
A_KEY, B_KEY = SigningKey(b"a" * 32), SigningKey(b"b" * 32)
SA_ID, SB_ID = derive_id(bytes(A_KEY.verify_key)), derive_id(bytes(B_KEY.verify_key))
"""The signed peers' IDs, derived from their keys."""


def signed_register(src: int, key: Any, nat: int = 0, step: int = 1) -> bytes:
    """The two RegisterPk an agent sends (the challenge computed as the core will, at seed time ~now),
    then a heartbeat."""
    pk = bytes(key.verify_key)
    peer_id = derive_id(pk)
    probe = RendezvousCore(Store(), SERVER_KEY, secret=SECRET)
    challenge = probe._challenge(peer_id, Origin(to_v4_if_mapped(SOURCES[src])), int(1001.0 // 30))
    rk = pb.RegisterPk(id=peer_id, uuid=b"u-" + pk[:4], pk=pk, nonce=bytes(16), padding=bytes(120))
    first = build(register_pk=rk)
    rk.ClearField("padding")
    rk.challenge = challenge
    second = signing.seal(key, signing.REGISTER, b"", build(register_pk=rk))
    beat = build(register_peer=pb.RegisterPeer(id=peer_id, serial=1, nat_type=nat))  # type: ignore[arg-type]
    return udp(src, first, step) + udp(src, second, 0) + udp(src, beat, 0)


def signed_request(key: Any, member: str, sub: Any, nonce: int) -> bytes:
    sub.requester_id = derive_id(bytes(key.verify_key))
    sub.request_time_ms = 1_010_000
    sub.request_nonce = nonce.to_bytes(16, "big")
    return signing.seal(key, signing.REQUEST, b"", build(**{member: sub}))


def udp(src: int, payload: bytes, step: int = 1, via: int = 0) -> bytes:
    return record(bytes((src << 2 | step << 5, via << 3)), payload)


def tcp(src: int, conn: int, payload: bytes, role: int = 1, step: int = 1) -> bytes:
    return record(bytes((role | src << 2 | step << 5, conn - 1)), payload)


def mangled(src: int) -> bytes:
    return addr.encode(to_v4_if_mapped(SOURCES[src]), 1_588_444_911)


def build(**kw: Any) -> bytes:
    return messages.build(**kw)


def register(src: int, peer_id: str, uuid: bytes = b"uuid-b", nat: int = 0) -> bytes:
    return udp(src, build(register_pk=pb.RegisterPk(id=peer_id, uuid=uuid, pk=PK))) + udp(
        src,
        build(register_peer=pb.RegisterPeer(id=peer_id, serial=1, nat_type=nat)),  # type: ignore[arg-type]
    )


def seeds() -> list[bytes]:
    from fuzz._common import load_vectors

    out = [
        bytes((c,)) + udp(C, bytes.fromhex(v["hex"])) for c in (0, 4) for v in load_vectors("rendezvous_vectors.json")
    ]
    out += [bytes((4,)) + tcp(C, 1, bytes.fromhex(v["hex"])) for v in load_vectors("rendezvous_vectors.json")]
    reg = register(B, B_ID)
    hole = pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC, udp_port=5000, version="1.2.3")
    ask = tcp(A, 1, build(punch_hole_request=hole))
    answers = [
        tcp(B, 2, build(punch_hole_sent=pb.PunchHoleSent(socket_addr=mangled(A), id=B_ID, version="1"))),
        udp(B, build(punch_hole_sent=pb.PunchHoleSent(socket_addr=mangled(A), id=B_ID, relay_server="r:1"))),
        tcp(B, 2, build(local_addr=pb.LocalAddr(socket_addr=mangled(A), local_addr=mangled(B), id=B_ID, version="1"))),
        tcp(B, 2, build(relay_response=pb.RelayResponse(socket_addr=mangled(A), uuid="u-1", id=B_ID, version="1"))),
        tcp(B, 2, build(relay_response=pb.RelayResponse(socket_addr=mangled(A), pk=PK))),
    ]
    for cfg in (0, 1, 4, 6):
        out += [bytes((cfg,)) + reg + ask + answer for answer in answers]
    rr = pb.RequestRelay(id=B_ID, uuid="5a1e0c1e-0000-4000-8000-000000000001", relay_server="127.0.0.1:21117")
    out.append(bytes((0,)) + reg + tcp(A, 1, build(request_relay=rr)) + answers[3])
    forced = pb.PunchHoleRequest(id=B_ID, force_relay=True, socket_addr_v6=bytes(18))
    out.append(bytes((0,)) + reg + tcp(A, 1, build(punch_hole_request=forced)) + answers[3])
    sym = pb.PunchHoleRequest(id=B_ID, nat_type=pb.SYMMETRIC)
    out.append(bytes((4,)) + register(B, B_ID, nat=pb.SYMMETRIC) + tcp(A, 1, build(punch_hole_request=sym)))
    lan = tcp(2, 3, build(punch_hole_request=pb.PunchHoleRequest(id=A_ID)))
    out.append(
        bytes((4,))
        + register(A, A_ID)
        + lan
        + tcp(A, 4, build(local_addr=pb.LocalAddr(socket_addr=mangled(2), local_addr=mangled(A), id=A_ID)))
    )
    hijack = register(C, B_ID, uuid=b"other") + register(5, B_ID)
    out.append(bytes((4,)) + reg + hijack + ask + record(bytes((3, 0)), b"x") + answers[0])
    online = build(online_request=pb.OnlineRequest(id=A_ID, peers=[B_ID, A_ID, "x"]))
    out.append(bytes((0,)) + reg + tcp(C, 1, online, role=2) + tcp(C, 1, online) + record(bytes((3 | 7 << 5, 0))))
    nat = build(test_nat_request=pb.TestNatRequest(serial=1, padding=bytes(8)))
    out.append(
        bytes((0,))
        + udp(4, nat)
        + udp(7, nat)
        + tcp(6, 1, nat, role=2)
        + tcp(6, 1, build(configure_update=pb.ConfigUpdate()))
    )
    # edges: oversized fields, a UDP answer to a TCP-only request, offline target, rate limit, eviction
    no_udp = tcp(A, 1, build(punch_hole_request=pb.PunchHoleRequest(id=B_ID)))
    out.append(bytes((0,)) + reg + no_udp + answers[1] + answers[0])
    out.append(bytes((0,)) + udp(B, build(register_pk=pb.RegisterPk(id=B_ID, uuid=bytes(300), pk=PK))))
    long_rr = pb.RequestRelay(id=B_ID, uuid="u" * 200)
    out.append(bytes((0,)) + reg + tcp(A, 1, build(request_relay=long_rr)))
    late = tcp(A, 1, build(request_relay=pb.RequestRelay(id=B_ID, uuid="u")), step=6)
    out.append(bytes((0,)) + reg + late + tcp(A, 1, build(punch_hole_request=hole)))
    burst = b"".join(tcp(src, src + 1, build(punch_hole_request=hole), step=0) for src in (0, 2, 3, 4, 6, 7))
    out.append(bytes((4,)) + reg + burst + answers[0])
    relays = b"".join(tcp(A, 1, build(request_relay=pb.RequestRelay(id=B_ID, uuid=f"u{i}")), step=0) for i in range(5))
    out.append(bytes((4,)) + reg + relays)
    out.append(bytes((0,)) + reg + burst + answers[0])
    # the unsigned flows above again, for a server that allows RustDesk's clients
    out += [bytes((c | 8,)) + rest[1:] for c, rest in ((s[0], s) for s in list(out))][:40]
    # signed registrations, signed requests, answers with and without the push's token
    sreg = signed_register(B, B_KEY) + signed_register(A, A_KEY, step=0)
    signed_hole = pb.PunchHoleRequest(id=SB_ID, nat_type=pb.ASYMMETRIC, udp_port=5000)
    token = b"t" * 16
    refusal = pb.RelayResponse(socket_addr=mangled(A), refuse_reason="no", answer_token=token)
    sanswers = [
        tcp(B, 2, build(punch_hole_sent=pb.PunchHoleSent(socket_addr=mangled(A), id=SB_ID, answer_token=token))),
        tcp(B, 2, build(punch_hole_sent=pb.PunchHoleSent(socket_addr=mangled(A), id=SB_ID))),
        udp(B, build(punch_hole_sent=pb.PunchHoleSent(socket_addr=mangled(A), id=SB_ID, answer_token=token))),
        tcp(B, 2, build(relay_response=pb.RelayResponse(socket_addr=mangled(A), id=SB_ID, answer_token=token))),
        tcp(C, 2, build(relay_response=refusal)),
    ]
    for cfg in (0, 1, 4, 8):
        for i, answer in enumerate(sanswers):
            ask_signed = tcp(A, 1, signed_request(A_KEY, "punch_hole_request", signed_hole, i))
            out.append(bytes((cfg,)) + sreg + ask_signed + answer)
    srr = signed_request(A_KEY, "request_relay", pb.RequestRelay(id=SB_ID, uuid="x", relay_server="10.0.0.9:6379"), 9)
    out.append(bytes((0,)) + sreg + tcp(A, 1, srr) + tcp(A, 1, srr) + sanswers[3])
    squat = signed_register(C, SigningKey(b"c" * 32))
    out.append(bytes((8,)) + sreg + squat + register(C, SB_ID, uuid=b"u-" + bytes(B_KEY.verify_key)[:4]))
    return out


main = entry("rendezvous", TestOneInput, seeds, max_len=8192)

if __name__ == "__main__":
    main()
