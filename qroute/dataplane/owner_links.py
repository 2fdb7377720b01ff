"""An instance's place in the owner mesh: its owner service, and connections to every peer owner.

Engine-free. ``OwnerLinks.start()`` listens on this instance's configured address (the transport's
``host``/``port`` server options) and starts one daemon thread that connects to each peer, retrying with
backoff (peers may start later) and handing each new connection to ``on_connect``; ``reconnect`` drops a
failed connection and starts that thread again. The requester side waits for the owners a step needs with
``wait_for`` (bounded, start-up only), never forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from qroute.core.config import QRouteConfig
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.owner import OwnerService
from qroute.dataplane.peering import connect_owner, serve_owner
from qroute.errors import HandshakeMismatch, QRouteError
from qroute.transport import Connection, Server, Transport, get_transport

logger = logging.getLogger("vllm.qroute")

_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 2.0


class OwnerLinks:
    def __init__(
        self,
        config: QRouteConfig,
        service: OwnerService,
        directory: CorpusDirectory,
        *,
        compat: str,
        on_connect: Callable[[str, Connection], None],
    ):
        self.config = config
        self.service = service
        self.directory = directory
        self.compat = compat
        self.on_connect = on_connect
        host, port = config.address(config.instance_id)
        self.transport: Transport = get_transport(config.transport, host=host, port=port)
        self.server: Server | None = None
        self.address = ""
        self._connected: dict[str, Connection] = {}
        self._ever_connected: set[str] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(i for i in self.config.instance_ids if i != self.config.instance_id)

    def start(self) -> str:
        self.server = serve_owner(self.transport, self.service)
        self.address = self.server.start()
        logger.info("qroute: owner service of %r listening on %s (%s)", self.config.instance_id, self.address,
                    self.config.transport)  # fmt: skip
        self._start_connecting()
        return self.address

    def _start_connecting(self) -> None:
        with self._cond:
            if self._thread is None:  # the loop clears it under this lock when it ends: no lost wake-up
                self._thread = threading.Thread(target=self._connect_loop, name="qroute-peers", daemon=True)
                self._thread.start()

    def reconnect(self, peer: str) -> None:
        """Drop the connection to ``peer`` (it failed) and connect again in the background."""
        with self._cond:
            connection = self._connected.pop(peer, None)
        if connection is None:
            return
        connection.close()
        logger.warning("qroute: lost owner %r; reconnecting in the background", peer)
        self._start_connecting()

    def _connect_loop(self) -> None:
        backoff = _BACKOFF_START_S
        reported: set[str] = set()
        while not self._stop.is_set():
            with self._cond:
                missing = [p for p in self.peers if p not in self._connected]
                if not missing:
                    self._thread = None
                    return
            for peer in missing:
                try:
                    connection = connect_owner(
                        self.transport, self.config.instances[peer], instance_id=self.config.instance_id,
                        directory=self.directory, model_fingerprint=self.directory.model_fingerprint,
                        compat=self.compat, secret=self.service.secret, timeout_s=self.config.timeout_s,
                    )  # fmt: skip
                except HandshakeMismatch as exc:  # a misconfigured peer: say so loudly, keep trying
                    if peer not in reported:
                        logger.error("qroute: peer %r refused the handshake: %s", peer, exc)
                        reported.add(peer)
                    continue
                except (QRouteError, OSError) as exc:  # not up yet
                    logger.debug("qroute: peer %r not reachable yet: %s", peer, exc)
                    continue
                self.on_connect(peer, connection)
                with self._cond:
                    self._connected[peer] = connection
                    self._ever_connected.add(peer)
                    self._cond.notify_all()
                logger.info("qroute: connected to owner %r at %s", peer, self.config.instances[peer])
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def wait_for(self, groups: Iterable[tuple[str, ...]], timeout_s: float) -> list[tuple[str, ...]]:
        """Wait until every group of replicas has a connected member (or ``timeout_s`` passes); return the
        groups that still have none. Waits only for owners never reached yet (start-up): a group with a
        member that was connected before and is now reconnecting does not hold a step up (the router falls
        back or fails at once). This instance counts as connected to itself."""
        groups = list(groups)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                known = {self.config.instance_id, *self._connected, *self._ever_connected}
                missing = [g for g in groups if not known.intersection(g)]
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        for connection in list(self._connected.values()):
            connection.close()
        if self.server is not None:
            self.server.stop()
        self.transport.close()
