"""RustDesk's default ports (protocol notes section 2): one place for each number."""

from __future__ import annotations

RENDEZVOUS_PORT = 21116
"""The rendezvous server (hbbs): UDP registration and TCP requests."""
NAT_TEST_PORT = RENDEZVOUS_PORT - 1
"""The NAT-test port: always the rendezvous port minus one, as RustDesk derives it."""
RELAY_PORT = 21117
"""The relay server (hbbr); a client that is told no relay assumes the rendezvous host, this port."""
DIRECT_PORT = 21118
"""An agent's direct-server port (RustDesk's `direct-server`), when it opens one."""
