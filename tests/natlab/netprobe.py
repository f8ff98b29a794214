"""A STUN-like UDP echo for the NAT lab: answers every datagram with the source ip:port it saw.

Run inside a lab namespace: `python netprobe.py ADDR:PORT [ADDR:PORT ...]` (v6 as [ADDR]:PORT).
Prints "ready" once every socket is bound, then serves until killed. The reply is JSON
{"seen": [ip, port], "at": [local ip, local port], "echo": <the request as text>}.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys


def parse(spec: str) -> tuple[int, str, int]:
    host, _, port = spec.rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def main(argv: list[str]) -> int:
    sel = selectors.DefaultSelector()
    for spec in argv:
        family, host, port = parse(spec)
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((host, port))
        sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data, src = sock.recvfrom(2048)
            local = sock.getsockname()
            reply = {"seen": [src[0], src[1]], "at": [local[0], local[1]], "echo": data.decode(errors="replace")}
            sock.sendto(json.dumps(reply).encode(), src)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
