"""The configurations ``qroute bench ab`` compares, each brought up on loopback on the same model and stopped by PID.

- ``stock-floor``: one stock instance; each request carries the corpus as its prompt prefix (nothing is reused:
  vLLM's CPU platform turns prefix caching off for MLA).
- ``stock-prefix-cached``: one stock instance with prefix caching, vLLM's CPU override of it for MLA lifted by the
  harness-only plugin ``qroute.bench.prefix_cache_lift`` (so not stock: labelled "override lifted"): the corpus is
  computed once and reused by every question, as a GPU user's one instance would.
- ``stock-nixl-pd``: vLLM's NixlConnector prefill/decode pair (P ``kv_producer``, D ``kv_consumer``, the KV cache
  registered as DRAM: ``kv_buffer_device: cpu``) behind ``qroute.bench.pd_proxy``: P computes each request's
  prompt (corpus + question), D pulls its KV over NIXL and decodes. D's ``/metrics`` counts the bytes NIXL moved.
- ``qroute-route`` / ``qroute-fetch`` / ``qroute-auto``: one ``qroute up`` cluster sharding the corpus; the three
  modes are per request, so one cluster serves all three (``mode`` in ``kv_transfer_params``). ``qroute-auto-x3``:
  ``auto`` on a cluster of its own over 3 instances (the prefix-cached comparison's set-up).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qroute.bench.decode import scoped_env
from qroute.bench.prefix_cache_lift import LIFT_ENV
from qroute.dataplane.decisionlog import DECISION_LOG_ENV
from qroute.errors import QRouteError
from qroute.ops.cluster import (
    ClusterSpec,
    InstanceInfo,
    engine_env,
    start_cluster,
    state_dir,
    stop_cluster,
    vllm_serve_command,
    wait_healthy,
)
from qroute.ops.http_client import healthy
from qroute.ops.processes import spawn, stop_pid
from qroute.ops.procstats import group_peak_rss_mib
from qroute.ops.scrape import delta, scrape, total

__all__ = ["Running", "moved_between", "start_floor", "start_nixl_pd", "start_prefix_cached", "start_qroute"]

START_TIMEOUT_S = 420.0


@dataclass
class Running:
    name: str  # "stock-floor", "stock-nixl-pd", "qroute"
    endpoints: list[str]  # the OpenAI base URLs the clients use (sessions spread over them)
    instances: list[InstanceInfo]  # the engine instances (their /metrics, their process groups)
    extra_pids: list[int] = field(default_factory=list)  # e.g. the proxy
    qroute_state: object | None = None

    def counters(self) -> dict[str, Any]:
        """The side's own counters now, per instance: NIXL's and qroute's (``moved_between``)."""
        return {i.url: scrape(i.url, prefix="vllm:") for i in self.instances}

    def peak_rss_mib(self) -> list[float]:
        return [round(group_peak_rss_mib(i.pid), 1) for i in self.instances]

    def stop(self) -> None:
        for pid in self.extra_pids:
            stop_pid(pid)
        if self.qroute_state is not None:
            stop_cluster(self.qroute_state)
        else:
            for info in self.instances:
                stop_pid(info.pid)


def moved_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """What every instance's counters gained between two ``Running.counters``: bytes moved (D's NIXL bytes, qroute's
    bytes), NIXL transfers, prefix-cache hit tokens, vLLM's preemptions, qroute's parts by kind, its predictions,
    mispredictions, fallbacks and deadline misses."""
    out = dict.fromkeys(("bytes", "nixl_transfers", "prefix_hit_tokens", "preemptions", "route", "fetch", "local",
                         "predictions", "mispredictions", "fallbacks", "deadline_misses"), 0.0)  # fmt: skip
    for url in after:
        d = delta(after[url], before[url])
        out["bytes"] += total(d, "vllm:nixl_bytes_transferred_sum") + total(d, "vllm:qroute_bytes_moved_total")
        out["nixl_transfers"] += total(d, "vllm:nixl_bytes_transferred_count")
        out["prefix_hit_tokens"] += total(d, "vllm:prefix_cache_hits_total")
        out["preemptions"] += total(d, "vllm:num_preemptions_total")
        for kind in ("route", "fetch", "local"):
            out[kind] += total(d, "vllm:qroute_corpus_parts_total", decision=kind)
        for kind in ("predictions", "mispredictions", "fallbacks", "deadline_misses"):
            out[kind] += total(d, f"vllm:qroute_{kind}_total")
    return out


def _spawn_stock(name: str, k: int, model_dir: Path, port: int, max_model_len: int, extra: list[str],
                 env_extra: dict[str, str | None] | None = None):  # fmt: skip
    env = {key: v for key, v in {**engine_env(k), **(env_extra or {})}.items() if v is not None}  # None: unset
    log = state_dir() / "logs" / f"{name}.log"
    cmd = vllm_serve_command(model_dir, port, max_model_len=max_model_len, extra=extra)
    process = spawn(cmd, env, log)
    return process, InstanceInfo(instance_id=name, url=f"http://127.0.0.1:{port}/v1", pid=process.pid, log=str(log))


def _started(processes, infos) -> None:
    try:
        wait_healthy(infos, processes, START_TIMEOUT_S)
    except BaseException:
        for info in infos:
            stop_pid(info.pid)
        raise


def start_floor(model_dir: Path, base_port: int, max_model_len: int) -> Running:
    process, info = _spawn_stock("stock-floor", 0, model_dir, base_port, max_model_len, [])
    _started([process], [info])
    return Running("stock-floor", [info.url], [info])


def start_prefix_cached(model_dir: Path, base_port: int, max_model_len: int, *, replicas: int = 1,
                        engine_args: tuple[str, ...] = ()) -> Running:  # fmt: skip
    """``replicas`` independent instances (each the whole corpus in its own prefix cache) on ``base_port`` on."""
    started = [_spawn_stock(f"stock-prefix-cached-{k}", k, model_dir, base_port + k, max_model_len,
                            ["--enable-prefix-caching", *engine_args], {LIFT_ENV: "1"}) for k in range(replicas)]
    infos = [i for _, i in started]
    _started([p for p, _ in started], infos)
    return Running("stock-prefix-cached", [i.url for i in infos], infos)


def _nixl_config(role: str) -> list[str]:
    config = {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
    return ["--kv-transfer-config", json.dumps(config)]


def start_nixl_pd(model_dir: Path, base_port: int, max_model_len: int) -> Running:
    """P on ``base_port``, D on ``base_port + 1`` (NIXL side channels on ``base_port + 50`` and ``+ 51``), the
    proxy on ``base_port + 2``."""
    started = []
    for k, (name, role) in enumerate((("stock-pd-prefill", "kv_producer"), ("stock-pd-decode", "kv_consumer"))):
        # UCX's own choice of transports: vLLM's agents ask for peer failure handling, which the shared-memory-only
        # UCX_TLS=sm,self that qroute's NIXL agents set in this process (and its children would inherit) cannot give
        env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(base_port + 50 + k), "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
               "UCX_TLS": None}
        started.append(_spawn_stock(name, k, model_dir, base_port + k, max_model_len, _nixl_config(role), env))
    processes, infos = [p for p, _ in started], [i for _, i in started]
    _started(processes, infos)
    proxy_port = base_port + 2
    proxy = spawn([sys.executable, "-m", "qroute.bench.pd_proxy", "--prefill", infos[0].url, "--decode",
                   infos[1].url, "--port", str(proxy_port)], dict(os.environ),
                  state_dir() / "logs" / "stock-pd-proxy.log")  # fmt: skip
    url = f"http://127.0.0.1:{proxy_port}/v1"
    deadline = time.monotonic() + 60
    while not healthy(url):
        if proxy.poll() is not None or time.monotonic() > deadline:
            for pid in (proxy.pid, *(i.pid for i in infos)):
                stop_pid(pid)
            raise QRouteError(f"the P/D proxy did not come up; see {state_dir() / 'logs' / 'stock-pd-proxy.log'}")
        time.sleep(0.5)
    return Running("stock-nixl-pd", [url], infos, extra_pids=[proxy.pid])


def start_qroute(model_dir: Path, corpus: Path, base_port: int, instances: int, transport: str,
                 blocks_per_chunk: int, decision_log: Path | None = None, **spec_args) -> Running:  # fmt: skip
    """The cluster's instances write every remote part's decision, predicted and measured time to ``decision_log``
    (``qroute.dataplane.decisionlog``), if given: the predicted-against-measured report. ``spec_args``: more of
    ``ClusterSpec`` (e.g. ``kv_blocks``)."""
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=instances, base_port=base_port,
                       transport=transport, blocks_per_chunk=blocks_per_chunk, **spec_args)  # fmt: skip
    with scoped_env(DECISION_LOG_ENV, str(decision_log)) if decision_log else contextlib.nullcontext():
        state = start_cluster(spec, log=lambda *_: None)
    return Running("qroute", [i.url for i in state.instances], list(state.instances), qroute_state=state)
