"""The launcher's supervisor: an instance that died is started again on its ports, prefilled again, and rejoins.

A restarted instance's store is empty; until its chunks are prefilled it refuses what needs them (``not_ready``)
and its peers take them from a replica (see docs/vllm-connector.md, "Readiness"). ``rejoin`` starts it, waits until
it serves HTTP, and prefills each chunk it owns on it alone, in corpus order: each chunk's prefill attends to the
chunks before it, which it routes or fetches from the other instances like any request. ``supervise`` (``qroute up
--supervise``) does that for every instance whose process group is gone, until stopped. It holds the cluster's
secret in memory only (the state file never has it).
"""

from __future__ import annotations

import threading

from qroute.ops.cluster import (
    START_TIMEOUT_S,
    ClusterSpec,
    ClusterState,
    InstanceInfo,
    prefill_corpus_http,
    spawn_instance,
    wait_healthy,
)
from qroute.ops.processes import leader_gone, stop_pid

__all__ = ["rejoin", "supervise", "supervise_once"]

POLL_S = 2.0


def rejoin(spec: ClusterSpec, state: ClusterState, k: int, secret: str, *, log=print) -> InstanceInfo:
    """Start instance ``k`` again (same ports and secret), prefill its own chunks on it, record it in ``state``."""
    from qroute.core.corpus import place_model_corpus

    name = spec.instance_ids()[k]
    process, info = spawn_instance(spec, k, secret)
    try:
        wait_healthy([info], [process], START_TIMEOUT_S)
        state.instances[k] = info
        if spec.corpus_dir is not None:
            token_ids, directory = place_model_corpus(
                spec.model_dir, spec.corpus_dir, name=spec.corpus_name, instances=spec.instance_ids(),
                replicas=spec.replicas, blocks_per_chunk=spec.blocks_per_chunk,
            )  # fmt: skip
            prefill_corpus_http(state, token_ids.tolist(), directory, log=log, only=name)
            info.chunks = len(directory.chunks_of(name))
    except BaseException:
        stop_pid(process.pid)
        raise
    state.save()
    log(f"qroute: instance {name!r} started again (pid {info.pid}), its {info.chunks} chunks prefilled")
    return info


def supervise_once(spec: ClusterSpec, state: ClusterState, secret: str, *, log=print) -> list[str]:
    """Rejoin every instance whose API server has ended (what is left of its process group is stopped first);
    the names rejoined."""
    rejoined = []
    for k, info in enumerate(list(state.instances)):
        if leader_gone(info.pid):
            stop_pid(info.pid)  # the rest of its group, if any: its ports must be free
            log(f"qroute: instance {info.instance_id!r} (pid {info.pid}) is gone; starting it again")
            rejoin(spec, state, k, secret, log=log)
            rejoined.append(info.instance_id)
    return rejoined


def supervise(spec: ClusterSpec, state: ClusterState, secret: str, *, stop: threading.Event | None = None,
              poll_s: float = POLL_S, log=print) -> None:  # fmt: skip
    """``supervise_once`` every ``poll_s`` until ``stop`` is set (or forever)."""
    stop = stop or threading.Event()
    while not stop.wait(poll_s):
        supervise_once(spec, state, secret, log=log)
