"""Fixtures for the transport contract: one suite, run over loopback, TCP and NIXL (STYLE 14).

Loopback owners run in this process; TCP and NIXL owners run ``peer_server.py`` in a real separate process so
SIGKILL and SIGSTOP mean what they say. Every process started here is killed in the fixture's clean-up, and
a peer also exits by itself when our end of its stdin closes.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qroute.transport import Connection, Transport, get_transport

from .peer_server import ADDRESS_PREFIX, MAX_REQUEST_BYTES, SECRET, PeerHandler, make_regions, on_hello

PEER_SCRIPT = Path(__file__).with_name("peer_server.py")
TRANSPORTS = ["loopback", "tcp", "nixl"]
# A small NIXL slot, so the suite's large payloads and replies also take the control-channel path.
CLIENT_OPTS = {"nixl": {"slot_bytes": 64 << 10, "num_slots": 8}}
START_TIMEOUT_S = 60.0
_LIVE: set[Peer] = set()


def have_nixl() -> bool:
    """Whether ``import nixl`` works (through qroute, which sets UCX's environment first)."""
    from qroute.errors import ConfigError
    from qroute.transport.nixl_agent import require_nixl

    try:
        require_nixl()
    except ConfigError:
        return False
    return True


class Peer:
    """An owner to test against. ``kill``/``pause``/``resume`` act on its process (loopback: stop, or a gate)."""

    def __init__(self, name: str, *, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.server = None
        self._handler = PeerHandler()
        self._log = tempfile.TemporaryFile()
        if name == "loopback":
            self.server = get_transport("loopback").server(
                self._handler, regions=make_regions(), secret=SECRET, on_hello=on_hello,
                max_request_bytes=max_request_bytes)
            self.address = self.server.start()
        else:
            cmd = [sys.executable, str(PEER_SCRIPT), "--transport", name, "--max-request-bytes",
                   str(max_request_bytes)]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
            _LIVE.add(self)
            self.address = self._read_address()

    @property
    def socket_address(self) -> str | None:
        """HOST:PORT a raw socket can connect to (the TCP port, or NIXL's control port)."""
        return None if self.proc is None else self.address

    def _read_address(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.5):
                    line = self.proc.stdout.readline().decode()
                    if line.startswith(ADDRESS_PREFIX):
                        return line[len(ADDRESS_PREFIX):].strip()
                    if not line and self.proc.poll() is not None:
                        break
        self.stop()
        self._log.seek(0)
        raise RuntimeError(f"peer {self.name} did not start:\n{self._log.read().decode(errors='replace')}")

    def kill(self) -> None:
        if self.proc is None:
            self.server.stop()
        else:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        if self.proc is None:
            self._handler.gate.clear()
        else:
            self.proc.send_signal(signal.SIGSTOP)
            _wait_stopped(self.proc.pid)

    def resume(self) -> None:
        if self.proc is None:
            self._handler.gate.set()
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._log.closed:
            return
        _LIVE.discard(self)
        self.resume()
        if self.proc is None:
            self.server.stop()
        else:
            try:
                self.proc.stdin.close()  # the peer exits when its stdin closes
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
                pass
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
                self.proc.stdout.close()
        self._log.close()


def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """SIGSTOP returns before every thread has stopped; a thread may still answer one call meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:
                pass
        if states and all(s in "tT" for s in states):
            return
        time.sleep(0.001)
    raise RuntimeError(f"peer {pid} did not stop within {timeout_s} s")


@pytest.fixture(scope="session", params=TRANSPORTS)
def transport_name(request: pytest.FixtureRequest) -> str:
    if request.param == "nixl" and not have_nixl():
        pytest.skip("nixl is not installed (pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1)")
    return request.param


@pytest.fixture(scope="session")
def transport(transport_name: str) -> Iterator[Transport]:
    """The requester's transport, shared by the session (a NIXL agent takes about a second to create)."""
    t = get_transport(transport_name, **CLIENT_OPTS.get(transport_name, {}))
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module")
def peer(transport_name: str) -> Iterator[Peer]:
    """An owner shared by the tests of a module that leave it serving."""
    p = Peer(transport_name)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def fresh_peer(transport_name: str) -> Iterator[Peer]:
    """An owner for one test that kills or pauses it."""
    p = Peer(transport_name)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def conn(transport: Transport, peer: Peer) -> Iterator[Connection]:
    c = transport.connect(peer.address, secret=SECRET, hello=b"contract", timeout_s=10.0)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_peers() -> Iterator[None]:
    yield
    # safety net: a peer that outlived its fixture would keep a core busy for everyone on this machine
    for p in list(_LIVE):
        p.stop()
