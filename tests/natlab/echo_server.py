"""A TCP echo server for lab hosts: `python echo_server.py HOST PORT`; prints "ready" once listening."""

from __future__ import annotations

import socket
import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(1 << 18):
                self.request.sendall(data)
        except ConnectionError:
            pass  # a session cut on purpose (fault tests) resets its stream: not worth a traceback


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET


if __name__ == "__main__":
    with Server((sys.argv[1], int(sys.argv[2])), Echo) as srv:
        print("ready", flush=True)
        srv.serve_forever()
