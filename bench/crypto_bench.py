"""Session crypto cost: SecureChannel seal+open against bare libsodium and a plain copy, same run.

    python bench/crypto_bench.py [--seconds 0.5] [--sizes 1024,4096,16384,65536,262144]

Each row moves the same plaintext through one "send" and one "receive" step:

* copy     - two `bytes` joins (frame header + payload, then a slice out): the floor any pump pays
* nacl     - nacl.bindings.crypto_secretbox + crypto_secretbox_open (the classic, padded API)
* nacl_easy- nacl.bindings.crypto_secretbox_easy + _open_easy (what SecureChannel calls)
* channel  - SecureChannel.seal + SecureChannel.open (counter nonces, checks)
* framed   - channel + encode_frame + FrameDecoder.feed: what a session pump does per frame

MB/s counts plaintext bytes (1 MB = 10^6 bytes), best of three runs. Handshakes/s is a
full Initiator <-> Responder exchange in memory with fresh random keys (no password:
the Argon2id password key is derived once per process and cached).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from nacl.bindings import (
    crypto_secretbox,
    crypto_secretbox_easy,
    crypto_secretbox_open,
    crypto_secretbox_open_easy,
)
from nacl.signing import SigningKey

from agent.wire.frames import FrameDecoder, encode_frame, encode_header
from agent.wire.handshake import Initiator, Policy, Responder, exchange
from agent.wire.secure_channel import SecureChannel, nonce_for


def _rate(step: Callable[[], object], seconds: float) -> float:
    """Calls per second of `step`, best of three timed runs of about `seconds` each."""
    n = 1
    while True:  # calibrate: grow the batch until one batch takes >= seconds / 10
        t = time.perf_counter()
        for _ in range(n):
            step()
        dt = time.perf_counter() - t
        if dt >= seconds / 10:
            break
        n *= 2
    batch = max(1, int(n * seconds / max(dt, 1e-9)))
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(batch):
            step()
        best = max(best, batch / (time.perf_counter() - t))
    return best


def _steps(size: int) -> dict[str, Callable[[], None]]:
    data = os.urandom(size)
    key = os.urandom(32)
    nonce = nonce_for(1)
    header = encode_header(size + 16)

    def copy() -> None:
        framed = b"".join((header, data))
        _ = framed[len(header) :]

    def nacl() -> None:
        crypto_secretbox_open(crypto_secretbox(data, nonce, key), nonce, key)

    def nacl_easy() -> None:
        crypto_secretbox_open_easy(crypto_secretbox_easy(data, nonce, key), nonce, key)

    tx, rx = SecureChannel(key), SecureChannel(key)

    def channel() -> None:
        rx.open(tx.seal(data))

    ftx, frx, dec = SecureChannel(key), SecureChannel(key), FrameDecoder()

    def framed() -> None:
        for payload in dec.feed(encode_frame(ftx.seal(data))):
            frx.open(payload)

    return {"copy": copy, "nacl": nacl, "nacl_easy": nacl_easy, "channel": channel, "framed": framed}


def _handshake() -> None:
    a_key, b_key = SigningKey.generate(), SigningKey.generate()
    policy = Policy(pinned_keys={"1111111111": bytes(a_key.verify_key)}, allowed_targets=frozenset({"127.0.0.1:22"}))
    a = Initiator("1111111111", a_key, "2222222222", bytes(b_key.verify_key), target="127.0.0.1:22")
    b = Responder("2222222222", b_key, policy)
    exchange(a, b)
    assert a.done and b.done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement (default 0.5)")
    parser.add_argument("--sizes", default="1024,4096,16384,65536,262144", help="frame sizes in bytes")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"seal+open throughput, MB/s of plaintext (best of 3, ~{args.seconds}s each); pid {os.getpid()}")
    names = list(_steps(16).keys())
    print(f"{'frame':>8} " + " ".join(f"{n:>10}" for n in names) + f" {'chan/nacl':>10} {'chan/copy':>10}")
    for size in sizes:
        mbps = {name: _rate(step, args.seconds) * size / 1e6 for name, step in _steps(size).items()}
        row = " ".join(f"{mbps[n]:>10.0f}" for n in names)
        print(f"{size:>8} {row} {mbps['channel'] / mbps['nacl']:>10.2f} {mbps['channel'] / mbps['copy']:>10.3f}")

    rate = _rate(_handshake, args.seconds * 2)
    print(f"handshakes (full A<->B in memory, fresh keys, with PeerAuth): {rate:.0f}/s ({1e3 / rate:.2f} ms each)")
    key_rate = _rate(SigningKey.generate, args.seconds)
    print(f"  reference: ed25519 key generations {key_rate:.0f}/s")


if __name__ == "__main__":
    main()
