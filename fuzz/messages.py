"""messages.parse and AddrMangle decode on arbitrary bytes, plus HOST:PORT parsing of every string field.

Input: the raw payload (a datagram or a frame's payload). Invariants: parse raises only
MessageError (with a known reason) and otherwise yields a known kind whose rebuilt envelope
parses back equal; addr.decode never raises and yields a valid port, and every address it
can produce survives an encode/decode round trip; split_host_port/parse_sockaddr raise only
AddressError on peer-supplied strings (relay_server fields are HOST:PORT text).
"""

from __future__ import annotations

from typing import Any

from fuzz._common import entry, instrumented, load_vectors

with instrumented():
    from agent.proto import rendezvous_pb2 as pb
    from agent.wire import addr, messages

KINDS = frozenset(f.name for f in pb.RendezvousMessage.DESCRIPTOR.oneofs_by_name["union"].fields)
REASONS = frozenset({"oversized", "malformed", "empty"})
MAX_TCP = 64 * 1024


def check_addr(raw: bytes, tm: int) -> None:
    sa = addr.decode(raw)
    assert 0 <= sa.port <= 0xFFFF
    assert sa.ip.version == (6 if len(raw) > 16 else 4)
    if len(raw) > 16 and len(raw) != 18:
        assert sa == addr.UNSPECIFIED_V6
        return
    again = addr.decode(addr.encode(sa, tm))
    assert again == addr.to_v4_if_mapped(sa), f"{raw.hex()} -> {sa} -> {again}"
    assert str(sa) and sa.as_tuple()[1] == sa.port


def check_host_port(text: str) -> None:
    try:
        host, port = addr.split_host_port(text, 21116)
        assert host and 0 < port <= 0xFFFF
    except addr.AddressError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
    try:
        sa = addr.parse_sockaddr(text, allow_zero=True)
        assert 0 <= sa.port <= 0xFFFF
    except addr.AddressError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400


def walk(msg: Any, tm: int, depth: int = 0) -> None:
    """Decode every bytes field as an address and every string field as HOST:PORT, recursively."""
    for field, value in msg.ListFields():
        values = value if field.is_repeated else [value]
        for v in values[:8]:
            if field.type == field.TYPE_BYTES:
                check_addr(bytes(v), tm)
            elif field.type == field.TYPE_STRING:
                check_host_port(v)
            elif field.type == field.TYPE_MESSAGE and depth < 4:
                walk(v, tm, depth + 1)


def TestOneInput(data: bytes) -> None:
    tm = int.from_bytes(data[:4], "little")
    check_addr(data[:18], tm)
    check_addr(data, tm)
    for max_len in (messages.MAX_UDP_MESSAGE, MAX_TCP):
        try:
            kind, sub = messages.parse(data, max_len=max_len)
        except messages.MessageError as exc:
            assert exc.reason in REASONS, exc.reason
            continue
        assert kind in KINDS
        again_kind, again = messages.parse(messages.build(**{kind: sub}), max_len=MAX_TCP)
        assert again_kind == kind and again == sub
        walk(sub, tm)
    check_host_port(data.decode("utf-8", "replace"))


def seeds() -> list[bytes]:
    out = [bytes.fromhex(v["hex"]) for v in load_vectors("rendezvous_vectors.json")]
    out += [bytes.fromhex(v["hex"]) for v in load_vectors("addr_mangle_vectors.json") if "hex" in v]
    out += [b"1.2.3.4:21116", b"[2001:db8::1]:21117", b"relay.example.com", b"::1"]
    return out


main = entry("messages", TestOneInput, seeds)

if __name__ == "__main__":
    main()
