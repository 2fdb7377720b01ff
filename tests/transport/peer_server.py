"""A transport server for the contract tests, importable (handler, regions) and runnable in its own process.

    python peer_server.py --transport tcp|nixl [--max-request-bytes N] [--slot-bytes N]

prints ``QROUTE_PEER_ADDRESS <address>`` on stdout once serving, then serves until stdin closes (so it never
outlives the test process that started it) or it is killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

from qroute.errors import HandshakeMismatch

SECRET = b"qroute-contract-secret"
MAX_REQUEST_BYTES = 3 << 20
ADDRESS_PREFIX = "QROUTE_PEER_ADDRESS "


def make_regions() -> dict[str, np.ndarray]:
    """Deterministic regions: the test process builds the same bytes to compare reads against."""
    rng = np.random.default_rng(1234)
    return {"corpus": rng.integers(0, 256, 1 << 20, dtype=np.uint8),
            "rows": np.arange(4096, dtype=np.float32).reshape(64, 64)}


def pattern(n: int) -> bytes:
    return (np.arange(n, dtype=np.uint32) % 251).astype(np.uint8).tobytes()


class PeerHandler:
    """Payload = op byte + body. e: echo; r: reverse; s<seconds>: sleep, then b"slept"; x<msg>: raise;
    b<n>: reply with n pattern bytes. ``gate`` cleared stalls every call (loopback's stand-in for SIGSTOP)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, payload: bytes) -> bytes:
        self.gate.wait(60.0)
        op, body = payload[:1], payload[1:]
        if op == b"e":
            return body
        if op == b"r":
            return body[::-1]
        if op == b"s":
            time.sleep(float(body))
            return b"slept"
        if op == b"x":
            raise ValueError(f"boom: {body.decode()}")
        if op == b"b":
            return pattern(int(body))
        raise KeyError(f"unknown op {op!r}")


def on_hello(hello: bytes) -> bytes:
    if hello.startswith(b"reject"):
        raise HandshakeMismatch("corpus fingerprint mismatch: owner serves corpus v1")
    return b"welcome " + hello


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", required=True)
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES)
    parser.add_argument("--slot-bytes", type=int, default=0)
    args = parser.parse_args()
    from qroute.transport import get_transport

    opts = {"slot_bytes": args.slot_bytes} if args.slot_bytes else {}
    transport = get_transport(args.transport, **opts)
    server = transport.server(PeerHandler(), regions=make_regions(), secret=SECRET, on_hello=on_hello,
                              max_request_bytes=args.max_request_bytes)
    address = server.start()
    print(ADDRESS_PREFIX + address, flush=True)
    os.dup2(2, 1)  # nobody reads our stdout from now on: a full pipe must never block a library's print
    try:
        sys.stdin.read()
    finally:
        server.stop()
        transport.close()


if __name__ == "__main__":
    main()
