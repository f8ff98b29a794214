"""Coverage-guided fuzz harnesses (atheris/libFuzzer), one module per parser or handler.

Run one with `python -m fuzz.NAME -runs=100000` (libFuzzer flags, optional corpus dirs);
tests/unit/test_atheris.py runs each briefly, and longer under `-m slow`.
"""

TARGETS = ("frame_decoder", "messages", "rendezvous", "relay", "handshake", "session", "kcp", "mux", "link_records")
