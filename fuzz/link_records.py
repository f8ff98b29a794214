"""A link's first messages and records as a hostile peer could send them: the stream open request
and answer (agent/link/stream_open.py) and the resend records (agent/link/resend_core.py).

Input: [which][payload]. which bit 0..1 picks the parser: the open request, the stream's answer, or a
run of records (split by a length byte each) fed to a Resend that has sent a few records of its own.
Invariants: only OpenError / ResendError escape, with one line; a parsed request re-encodes to the
same bytes; the record layer never acknowledges more than it sent, nor counts a record it refused.
"""

from __future__ import annotations

from fuzz._common import Reader, entry, instrumented

with instrumented():
    from agent.link import stream_open
    from agent.link.resend_core import ACK, DATA, Resend, ResendError, encode_count


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    which = r.byte() % 3
    if which == 0:
        payload = r.rest()
        try:
            target = stream_open.parse_request(payload)
        except stream_open.OpenError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
        assert stream_open.encode_request(target) == payload
    elif which == 1:
        try:
            stream_open.parse_status(r.rest())
        except stream_open.OpenError as exc:
            assert str(exc) and "\n" not in str(exc)
    else:
        resend = Resend()
        for i in range(5):
            resend.data(bytes([i]) * 3)
        while r:
            record = r.take(r.byte())
            received = resend.received
            try:
                resend.receive(record)
            except ResendError as exc:
                assert str(exc) and "\n" not in str(exc)
                assert resend.received == received
                continue
            assert resend.acked <= resend.sent == 5
            assert len(resend.kept) == resend.sent - resend.acked


def seeds() -> list[bytes]:
    data = bytes([DATA]) + encode_count(2) + b"abc"
    records = bytes([len(data)]) + data + bytes([9, ACK]) + encode_count(3) + bytes([9, ACK]) + encode_count(9)
    return [
        bytes([0]) + stream_open.encode_request("127.0.0.1:22"),
        bytes([0]) + stream_open.encode_request(""),
        bytes([1]) + stream_open.encode_status(None),
        bytes([1]) + stream_open.encode_status("target 10.0.0.1:22: connection refused"),
        bytes([2]) + records,
    ]


main = entry("link_records", TestOneInput, seeds)

if __name__ == "__main__":
    main()
