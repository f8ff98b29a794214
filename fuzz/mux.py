"""The link multiplexer's core fed what a hostile peer could send, in any split.

Input: [cfg][n][n chunk sizes][stream...]. cfg bit 0 picks which end we are (dialer or not); bit 1
makes us open two streams and write to them first, so frames for live streams, window updates
and resets meet state. Invariants: only MuxError escapes, and for the same bytes whatever the
split (the same events, or the same error, reached at the same frame); at most one partial frame is
buffered; a peer never holds more than MAX_STREAMS streams open here; no stream's receive window
goes negative or past its grants.
"""

from __future__ import annotations

from typing import Any

from fuzz._common import Reader, entry, instrumented

with instrumented():
    from agent.link.mux_core import HEADER, MAX_FRAME, MAX_STREAMS, WINDOW, Flag, Mux, MuxError, Type


def run(stream: bytes, chunks: list[int], cfg: int) -> tuple[list[Any], str]:
    m = Mux(dialer=bool(cfg & 1))
    if cfg & 2:
        for sid in (m.open_stream(), m.open_stream()):
            m.send(sid, b"x" * 100)
    events: list[Any] = []
    fed = 0
    i = 0
    while fed < len(stream):
        step = chunks[i] if i < len(chunks) else len(stream) - fed
        i += 1
        try:
            events += m.receive(stream[fed : fed + step])
        except MuxError as exc:
            text = str(exc)
            assert text and "\n" not in text
            return events, text
        fed += step
        assert len(m._buf) < HEADER.size + MAX_FRAME
        assert len(m.streams) <= MAX_STREAMS + 2
        for st in m.streams.values():
            assert 0 <= st.recv_window <= WINDOW
    return events, ""


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    cfg = r.byte()
    chunks = [max(1, r.byte()) for _ in range(r.byte() & 15)]
    stream = r.rest()
    whole = run(stream, [], cfg)
    split = run(stream, chunks, cfg)
    # The same bytes in other pieces: the same events (an error may cut a split run's last piece short)
    if not whole[1] and not split[1]:
        assert whole == split, (whole, split)
    else:
        assert whole[1] == split[1], (whole[1], split[1])


def seeds() -> list[bytes]:
    def frame(kind: Type, flags: int, sid: int, length: int, body: bytes = b"") -> bytes:
        return HEADER.pack(0, kind, flags, sid, length) + body

    opened = frame(Type.WINDOW_UPDATE, Flag.SYN, 2, 0) + frame(Type.DATA, 0, 2, 3, b"abc")
    return [
        bytes((0, 0)) + opened,
        bytes((2, 2, 5, 7))
        + opened
        + frame(Type.WINDOW_UPDATE, Flag.ACK, 1, 1000)
        + frame(Type.DATA, Flag.FIN, 2, 1, b"z"),
        bytes((1, 1, 12)) + frame(Type.PING, Flag.SYN, 0, 7) + frame(Type.WINDOW_UPDATE, Flag.RST, 2, 0),
        bytes((3, 0)) + frame(Type.DATA, Flag.SYN, 3, 2, b"hi") + frame(Type.GO_AWAY, 0, 0, 1),
    ]


main = entry("mux", TestOneInput, seeds)

if __name__ == "__main__":
    main()
