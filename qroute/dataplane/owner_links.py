"""An instance's place in the owner mesh: its owner service, and connections to every peer owner.

Engine-free. ``OwnerLinks.start()`` listens on each of this instance's configured endpoints (one server per
transport, on the transport's ``host``/``port`` server options) and starts one daemon thread that connects to each
peer, retrying with backoff (peers may start later). Where several transports reach a peer (both serve them), it
connects over each, keeps the one with the lower probed round trip (``peer.fastest_link``) and closes the others;
the kept connection goes to ``on_connect(peer, connection, fabric, probed)`` with its transport's configured
fabric profile and the probed one. ``reconnect`` drops a failed connection and starts that thread again (which
chooses afresh). The requester side waits for the owners a step needs with
``wait_for`` (bounded, start-up only), never forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from qroute.core.config import QRouteConfig, parse_endpoints
from qroute.core.costmodel import FabricProfile, load_fabric
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.owner import OwnerService
from qroute.dataplane.peer import fastest_link
from qroute.dataplane.peering import connect_owner, serve_owner
from qroute.dataplane.shard import region_name
from qroute.errors import ConfigError, HandshakeMismatch, QRouteError
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
        on_connect: Callable[[str, Connection, FabricProfile, FabricProfile], None],
    ):
        self.config = config
        self.service = service
        self.directory = directory
        self.compat = compat
        self.on_connect = on_connect
        self.addresses: dict[str, object] = dict(config.instances)  # instance -> its ``instances`` value
        own = config.endpoints(config.instance_id)
        for peer in self.peers:
            if not own.keys() & self.endpoints(peer).keys():
                raise ConfigError(f"instance {peer!r} serves {sorted(self.endpoints(peer))} and "
                                  f"{config.instance_id!r} {sorted(own)}: no transport reaches it")  # fmt: skip
        self.transports: dict[str, Transport] = {}
        self.fabrics: dict[str, FabricProfile] = {}  # transport -> the profile that prices its links
        for name, (host, port) in own.items():
            self.transports[name] = get_transport(name, host=host, port=port)
            self.fabrics[name] = load_fabric(config.fabric_name(name))
        self.servers: list[Server] = []
        self.address = ""  # the first endpoint's
        self.link_transports: dict[str, str] = {}  # peer -> transport of the kept connection
        self.link_round_trips: dict[str, dict[str, float]] = {}  # peer -> transport -> probed round trip, us
        self._connected: dict[str, Connection] = {}
        self._ever_connected: set[str] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(sorted(i for i in self.addresses if i != self.config.instance_id))

    def endpoints(self, peer: str) -> dict[str, tuple[str, int]]:
        return parse_endpoints(peer, self.addresses[peer], self.config.transport)

    def set_members(self, addresses: dict[str, object]) -> None:
        """The peers are now ``addresses`` (membership changed): connect to new ones in the background; stop
        trying to reach those that left (a kept connection to one closes when it fails)."""
        own = self.config.instance_id
        new = {own: self.config.instances[own], **{i: a for i, a in addresses.items() if i != own}}
        if new == self.addresses:
            return
        with self._cond:
            self.addresses = new
        self._start_connecting()

    def connect_to(self, peer: str, addresses: object) -> Connection:
        """A new handshaken connection to ``peer`` at ``addresses`` over the first transport both serve (for a
        bulk copy that must not share the router's connection)."""
        errors = []
        for name, (host, port) in parse_endpoints(peer, addresses, self.config.transport).items():
            if name not in self.transports:
                continue
            try:
                return connect_owner(
                    self.transports[name], f"{host}:{port}", instance_id=self.config.instance_id,
                    directory=self.directory, model_fingerprint=self.directory.model_fingerprint,
                    compat=self.compat, secret=self.service.secret, timeout_s=self.config.timeout_s,
                )  # fmt: skip
            except (QRouteError, OSError) as exc:
                errors.append(f"{name}: {exc}")
        raise QRouteError(f"cannot connect to {peer!r} at {addresses!r}: {'; '.join(errors) or 'no shared transport'}")

    def start(self) -> str:
        for name, transport in self.transports.items():
            server = serve_owner(transport, self.service)
            self.servers.append(server)
            address = server.start()
            self.address = self.address or address
            logger.info("qroute: owner service of %r listening on %s (%s)", self.config.instance_id, address, name)
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
        reported: set[tuple[str, str]] = set()  # (peer, transport) handshake refusals logged
        while not self._stop.is_set():
            with self._cond:
                missing = [p for p in self.peers if p not in self._connected and p in self.addresses]
                if not missing:
                    self._thread = None
                    return
            for peer in missing:
                value = self.addresses.get(peer)  # None: it left meanwhile
                endpoints = parse_endpoints(peer, value, self.config.transport) if value is not None else {}
                candidates = self._connect_each_transport(peer, endpoints, reported)
                if not candidates:
                    continue
                region = region_name(self.directory.name, 0)
                kept, probed, round_trips = fastest_link(
                    {name: (conn, self.fabrics[name]) for name, conn in candidates.items()}, region)
                for name, connection in candidates.items():
                    if name != kept:
                        connection.close()
                self.on_connect(peer, candidates[kept], self.fabrics[kept], probed)
                with self._cond:
                    self._connected[peer] = candidates[kept]
                    self._ever_connected.add(peer)
                    self.link_transports[peer] = kept
                    self.link_round_trips[peer] = round_trips
                    self._cond.notify_all()
                host, port = endpoints[kept]
                logger.info("qroute: connected to owner %r over %s at %s:%d (probed round trips: %s)", peer, kept,
                            host, port, ", ".join(f"{n} {us:.1f} us" for n, us in round_trips.items()))  # fmt: skip
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _connect_each_transport(self, peer: str, endpoints: dict[str, tuple[str, int]],
                                reported: set[tuple[str, str]]) -> dict[str, Connection]:  # fmt: skip
        """A handshaken connection to ``peer`` over each transport both serve (none where it is not up yet)."""
        connections: dict[str, Connection] = {}
        for name, (host, port) in endpoints.items():
            if name not in self.transports:
                continue
            try:
                connections[name] = connect_owner(
                    self.transports[name], f"{host}:{port}", instance_id=self.config.instance_id,
                    directory=self.directory, model_fingerprint=self.directory.model_fingerprint,
                    compat=self.compat, secret=self.service.secret, timeout_s=self.config.timeout_s,
                )  # fmt: skip
            except HandshakeMismatch as exc:  # a misconfigured peer: say so loudly, keep trying
                if (peer, name) not in reported:
                    logger.error("qroute: peer %r refused the handshake over %s: %s", peer, name, exc)
                    reported.add((peer, name))
            except (QRouteError, OSError) as exc:  # not up yet
                logger.debug("qroute: peer %r not reachable over %s yet: %s", peer, name, exc)
        return connections

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
        for server in self.servers:
            server.stop()
        for transport in self.transports.values():
            transport.close()
