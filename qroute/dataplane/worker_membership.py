"""An instance's part in etcd membership (``kv_connector_extra_config["etcd"]``): the store is allocated with
room for what one leave moves to it, a ``MembershipFollower`` keeps the instance's record and copies the chunks it
gains, and a new routing placement reaches the router at the start of the next engine step (never in the middle of
one, whose plan was made over the old placement).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from qroute.core.config import QRouteConfig
from qroute.core.placement import ChunkEntry, CorpusDirectory
from qroute.dataplane.elastic import MembershipFollower
from qroute.dataplane.membership import Membership, check_new_member
from qroute.dataplane.owner_links import OwnerLinks
from qroute.dataplane.shard import BlockRows, CorpusShard

__all__ = ["WorkerMembership"]

class WorkerMembership:
    def __init__(self, membership: Membership, *, log: logging.Logger):
        self.membership = membership
        self.log = log
        self.follower: MembershipFollower | None = None
        self._pending: tuple[CorpusDirectory, dict[str, BlockRows]] | None = None
        self._lock = threading.Lock()

    def start(self, config: QRouteConfig, shard: CorpusShard, directory: CorpusDirectory, links: OwnerLinks,
              on_chunk_ready: Callable[[ChunkEntry], None]) -> None:  # fmt: skip
        """Follow membership from now on; ``on_chunk_ready`` serves a chunk whose rows were copied in."""
        me = config.instance_id
        if config.join:
            check_new_member(self.membership)
        prefilled = () if config.join else [c.chunk_id for c in directory.chunks_of(me)]
        self.follower = MembershipFollower(
            self.membership, shard, directory, config.instances[me], joining=config.join, prefilled=prefilled,
            configured={} if config.join else config.instances, connect=links.connect_to,
            set_members=links.set_members, on_routing=self._on_routing, on_chunk_ready=on_chunk_ready,
            timeout_s=config.timeout_s,
        )  # fmt: skip
        self.follower.start()  # one round now: a joiner is routed around until its chunks are copied

    def _on_routing(self, directory: CorpusDirectory, layouts: dict[str, BlockRows]) -> None:
        with self._lock:
            self._pending = (directory, layouts)

    def take_placement(self) -> tuple[CorpusDirectory, dict[str, BlockRows]] | None:
        """At a step's start: the newest routing placement and the members' layouts, if it changed since."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self.log.info("qroute: instance %r now routes over %s", self.membership.instance_id,
                        list(pending[0].instances))  # fmt: skip
        return pending

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        self.membership.leave()
