"""Growing and shrinking a running ``qroute up --etcd`` cluster: ``qroute join`` and ``qroute leave``.

``join_instance`` starts one more instance that joins through etcd: it lays its store out for the members there
plus itself, copies the chunks rendezvous hashing moves to it from their holders (no prefill: the copies are the
holders' rows), and is routed to once it has them. ``leave_instance`` asks a member to leave through etcd: it
stays routed while the chunks it held are copied to their new owners, then removes its record, and is stopped.
"""

from __future__ import annotations

import time

from qroute.dataplane.elastic import POLL_S
from qroute.dataplane.etcd_client import EtcdClient
from qroute.dataplane.membership import MemberRecord, Membership, MemberState
from qroute.errors import ConfigError, QRouteError
from qroute.ops.cluster import START_TIMEOUT_S, ClusterSpec, ClusterState, spawn_instance, wait_healthy
from qroute.ops.processes import stop_pid

__all__ = ["join_instance", "leave_instance", "member_records"]

SETTLE_TIMEOUT_S = 120.0


def _membership(state: ClusterState, name: str = "launcher") -> Membership:
    if not state.etcd_endpoint:
        raise ConfigError("this cluster has no membership service: start it with `qroute up --etcd`")
    return Membership(EtcdClient(state.etcd_endpoint), "qroute", state.corpus_name or "", name)


def member_records(state: ClusterState) -> dict[str, MemberRecord]:
    return _membership(state).records()


def _wait(state: ClusterState, what: str, done, timeout_s: float) -> dict[str, MemberRecord]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = member_records(state)
        if done(records):
            return records
        if time.monotonic() > deadline:
            raise QRouteError(f"{what} did not happen within {timeout_s:.0f} s; members: "
                              f"{ {i: r.state for i, r in records.items()} }")  # fmt: skip
        time.sleep(0.5)


def join_instance(spec: ClusterSpec, state: ClusterState, secret: str, *, log=print) -> str:
    """Start one more instance that joins through etcd; returns its id once it serves."""
    k = max(int(i.instance_id.removeprefix("i")) for i in state.instances) + 1
    process, info = spawn_instance(spec, k, secret)
    try:
        wait_healthy([info], [process], START_TIMEOUT_S)
        records = _wait(state, f"instance {info.instance_id!r} joining",
                        lambda r: r.get(info.instance_id, None) is not None
                        and r[info.instance_id].state == MemberState.SERVING, SETTLE_TIMEOUT_S)  # fmt: skip
    except BaseException:
        stop_pid(process.pid)
        raise
    mine = records[info.instance_id]
    info.chunks = len(mine.ready_chunks)
    state.instances.append(info)
    state.save()
    log(f"qroute: instance {info.instance_id!r} joined (pid {info.pid}): {len(mine.ready_chunks)} chunks copied in")
    return info.instance_id


def leave_instance(state: ClusterState, name: str, *, log=print) -> None:
    """Ask member ``name`` to leave, wait until its record is gone (its chunks are on their new owners), stop it."""
    info = next((i for i in state.instances if i.instance_id == name), None)
    if info is None:
        raise ConfigError(f"no instance {name!r} in this cluster ({[i.instance_id for i in state.instances]})")
    _membership(state).request_drain(name)
    _wait(state, f"instance {name!r} leaving", lambda r: name not in r, SETTLE_TIMEOUT_S)
    time.sleep(4 * POLL_S)  # the others take up the placement without it at their next round: then it may go
    stop_pid(info.pid)
    state.instances.remove(info)
    state.save()
    log(f"qroute: instance {name!r} left; its chunks are on their new owners")
