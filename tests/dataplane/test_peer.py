"""dataplane.peer: a peer is priced on the median of its recent probes."""

from __future__ import annotations

from qroute.core.costmodel import load_fabric
from qroute.dataplane.peer import PROBES_KEPT, Peer
from qroute.transport import SupportsOneSidedRead


def test_one_slow_probe_does_not_move_the_price_but_a_lasting_change_does():
    base = load_fabric("loopback-nixl")
    probe = base.__class__(**{**base.to_dict(), "probe_us": 10.0, "fetch_probe_us": 20.0, "fetch_bandwidth_gbps": 5.0})
    peer = Peer("b", connection=None, block_rows={}, fabric=probe, base_fabric=base)
    assert peer.base_fabric is base and peer.fabric.probe_us == 10.0
    slow = probe.__class__(**{**probe.to_dict(), "probe_us": 5000.0})
    peer.probed(slow)
    peer.probed(probe)
    assert peer.fabric.probe_us == 10.0  # the median of 10, 5000, 10
    for _ in range(PROBES_KEPT):
        peer.probed(slow)
    assert peer.fabric.probe_us == 5000.0 and len(peer.probes) == PROBES_KEPT  # only the last ones count
    assert peer.fabric.fetch_probe_us == 20.0 and peer.fabric.fetch_bandwidth_gbps == 5.0


class _OneSided(SupportsOneSidedRead):
    """Stands for a NIXL connection: only whether it reads one-sidedly matters to ``Peer.failed``."""


def test_a_busy_owners_one_sided_link_stays_for_reads_but_a_lost_one_is_replaced():
    from qroute.errors import RemoteDisconnected, TransportTimeout

    busy = Peer("b", connection=_OneSided(), block_rows={})
    busy.failed(TransportTimeout("no reply before the deadline"), reading=False)
    assert not busy.can_call and busy.can_read and not busy.link_broken  # routes back off; fetches go on
    gone = Peer("b", connection=_OneSided(), block_rows={})
    gone.failed(RemoteDisconnected("connection closed"), reading=False)
    assert gone.link_broken
    unread = Peer("b", connection=_OneSided(), block_rows={})
    unread.failed(TransportTimeout("a read timed out"), reading=True)
    assert unread.link_broken
    two_sided = Peer("b", connection=object(), block_rows={})  # TCP: its reads need the owner's CPU too
    two_sided.failed(TransportTimeout("no reply before the deadline"), reading=False)
    assert two_sided.link_broken
