"""Joining the two sides over a transport: an owner serves its shards, a requester connects to owners.

The one handshake (``qroute.core.handshake``): the transport authenticates both sides over both nonces
and carries the requester's ``Hello`` (wire version, model fingerprint, compatibility hash, corpus
version), which the owner checks before anything else (``OwnerService.on_hello``), and the owner's
``HelloReply``, which the requester checks here.
"""

from __future__ import annotations

from collections.abc import Mapping

from qroute.core import handshake, wire
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.owner import OwnerService
from qroute.errors import HandshakeMismatch
from qroute.transport.base import Connection, Server, Transport


def serve_owner(transport: Transport, service: OwnerService, **server_options) -> Server:
    """A started-ready server exposing every shard's rows as regions and answering with ``service``."""
    regions = {}
    for shard in service.shards.values():
        regions.update(shard.regions())
    return transport.server(
        service.handle, regions=regions, secret=service.secret, on_hello=service.on_hello,
        batch_handler=service.handle_batch, **server_options,
    )


def connect_owner(
    transport: Transport,
    address: str,
    *,
    instance_id: str,
    directory: CorpusDirectory,
    model_fingerprint: str,
    compat: str,
    secret: bytes,
    timeout_s: float = 10.0,
) -> Connection:
    """Connect to one owner of ``directory``'s corpus; raises HandshakeMismatch on any disagreement."""
    hello = handshake.make_hello(
        instance_id,
        model_fingerprint=model_fingerprint,
        compat=compat,
        corpus_name=directory.name,
        corpus_version=directory.version,
    )
    connection = transport.connect(address, secret=secret, hello=wire.encode(hello), timeout_s=timeout_s)
    try:
        reply = wire.decode(connection.hello_reply)
        if not isinstance(reply, wire.HelloReply):
            raise HandshakeMismatch(f"owner at {address} answered the hello with {type(reply).__name__}")
        handshake.check_hello_reply(reply)
    except BaseException:
        connection.close()
        raise
    return connection


def connect_owners(
    transport: Transport,
    addresses: Mapping[str, str],
    *,
    instance_id: str,
    directory: CorpusDirectory,
    model_fingerprint: str,
    compat: str,
    secret: bytes,
    timeout_s: float = 10.0,
) -> dict[str, Connection]:
    """Connections to every other owner in ``addresses`` (instance id -> transport address)."""
    connections: dict[str, Connection] = {}
    try:
        for name, address in addresses.items():
            if name == instance_id:
                continue
            connections[name] = connect_owner(
                transport, address, instance_id=instance_id, directory=directory,
                model_fingerprint=model_fingerprint, compat=compat, secret=secret, timeout_s=timeout_s,
            )  # fmt: skip
    except BaseException:
        for connection in connections.values():
            connection.close()
        raise
    return connections
