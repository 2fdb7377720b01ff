"""A local qroute cluster: N ``vllm serve`` instances on loopback sharing one corpus.

``start_cluster`` starts the instances (each in its own process group, so stopping one stops its
EngineCore and Worker too), waits until every OpenAI server answers ``/health``, prefills the corpus
chunk by chunk on the chunks' owners (exact mode: a chunk attends to every earlier chunk, wherever it
lives), and records the cluster in a state file that ``qroute status`` and ``qroute down`` read.
The shared secret is generated here and handed to the instances through their environment only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qroute.errors import ConfigError, QRouteError
from qroute.ops import netns, sglang_serve
from qroute.ops.etcd_server import start_etcd
from qroute.ops.http_client import completion, healthy
from qroute.ops.processes import pid_alive, spawn, stop_pid

STATE_ENV = "QROUTE_STATE_DIR"
SECRET_ENV = "QROUTE_SECRET"
NIXL_AND_TCP = "nixl+tcp"  # a cluster transport: both at once (ClusterSpec.owner_addresses)
CLUSTER_TRANSPORTS = ("tcp", "nixl", NIXL_AND_TCP)
MIXED_ENGINES = "vllm+sglang"  # even instances vLLM, odd ones SGLang: one corpus, two engines answering each other
CLUSTER_ENGINES = ("vllm", "sglang", MIXED_ENGINES)
START_TIMEOUT_S = 420.0  # two instances starting side by side on 2 cores take 60-90 s; leave room


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV, ".qroute")).resolve()


@dataclass
class InstanceInfo:
    instance_id: str
    url: str  # OpenAI base URL
    pid: int  # leader of the instance's process group
    owner_address: str = ""
    log: str = ""
    chunks: int = 0
    engine: str = "vllm"  # or "sglang"


@dataclass
class ClusterState:
    model_dir: str
    corpus_dir: str | None
    corpus_name: str | None
    mode: str
    instances: list[InstanceInfo] = field(default_factory=list)
    corpus_tokens: int = 0
    corpus_version: str = ""
    netns: list[str] = field(default_factory=list)  # instances in network namespaces (``ClusterSpec.netns``)
    etcd_endpoint: str = ""  # membership through this etcd (``ClusterSpec.etcd``), started with the cluster
    etcd_pid: int = 0
    spec: dict[str, Any] = field(default_factory=dict)  # the ClusterSpec it was started from (``spec_of``)

    def save(self, path: Path | None = None) -> Path:
        path = path or state_dir() / "cluster.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path | None = None) -> ClusterState:
        path = path or state_dir() / "cluster.json"
        if not path.is_file():
            raise ConfigError(f"no qroute cluster recorded at {path}: start one with `qroute up`")
        data = json.loads(path.read_text())
        data["instances"] = [InstanceInfo(**i) for i in data["instances"]]
        return cls(**data)


# -- processes ------------------------------------------------------------------------------------------


def engine_env(instance_index: int) -> dict[str, str]:
    """Environment of one instance: small KV budget, offline, one core each where there are enough."""
    cores = os.cpu_count() or 1
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["VLLM_CPU_OMP_THREADS_BIND"] = str(instance_index % cores)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_CACHE_ROOT", str(state_dir() / "vllm-cache"))
    return env


def vllm_serve_command(model_dir: Path, port: int, *, max_model_len: int, extra: list[str],
                       host: str = "127.0.0.1") -> list[str]:  # fmt: skip
    # CPU_MLA named: with AMX tiles vLLM picks AMX_MLA (bf16 / int8 weights only, chunked prefill, prefix caching:
    # runs differ from one machine to the next, platforms/cpu.py). QROUTE_ENGINE_ARGS come last and win (argparse):
    # a GPU machine's backend, dtype, memory share (scripts/gpu_check.py).
    return [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir),
        "--host", host, "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--attention-backend", "CPU_MLA",
        "--max-model-len", str(max_model_len), "--max-num-seqs", "8", "--served-model-name", "tiny",
        *extra, *shlex.split(os.environ.get("QROUTE_ENGINE_ARGS", "")),
    ]  # fmt: skip


_LINK_LINE = re.compile(r"qroute: connected to owner '([^']+)' over (\w+) at \S+ \(probed round trips: ([^)]*)\)")


def link_choices(log_path: str | Path) -> dict[str, dict[str, Any]]:
    """Peer -> {"transport", "round_trips_us"} of the connections an instance's log says it kept (the latest per
    peer): which link reaches each owner, and what each candidate transport's probe measured."""
    links: dict[str, dict[str, Any]] = {}
    text = Path(log_path).read_text(errors="replace") if Path(log_path).exists() else ""
    for peer, transport, trips in _LINK_LINE.findall(text):
        round_trips = {name: float(us) for name, us in (t.removesuffix(" us").split() for t in trips.split(", "))}
        links[peer] = {"transport": transport, "round_trips_us": round_trips}
    return links


# -- HTTP -----------------------------------------------------------------------------------------------


def wait_healthy(instances: list[InstanceInfo], processes: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = dict(zip([i.instance_id for i in instances], zip(instances, processes, strict=True), strict=True))
    while pending:
        for name, (info, process) in list(pending.items()):
            if process.poll() is not None:
                raise QRouteError(
                    f"instance {name} exited with code {process.returncode} during start-up; see {info.log}"
                )
            if healthy(info.url):
                del pending[name]
        if pending and time.monotonic() > deadline:
            raise QRouteError(f"instances {sorted(pending)} not healthy after {timeout_s:.0f} s; see their logs")
        time.sleep(1.0)


# -- the cluster ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    model_dir: Path
    corpus_dir: Path | None  # None: plain stock instances (the reference)
    num_instances: int = 2
    corpus_name: str = "corpus"
    replicas: int = 1
    blocks_per_chunk: int = 16
    mode: str = "auto"
    transport: str = "tcp"  # one of CLUSTER_TRANSPORTS
    base_port: int = 8100
    max_model_len: int = 2048
    kv_blocks: int | None = None  # paged KV budget per instance in 16-token blocks (default: vLLM's choice)
    max_num_batched_tokens: int | None = None  # tokens per engine step (default: vLLM's choice)
    max_num_seqs: int | None = None  # requests an instance runs at once (default: vllm_serve_command's 8)
    selector: str = "dense"  # the instances' default block selection (and whether they keep block summaries)
    topk: int = 0
    netns: bool = False  # each instance in a network namespace of its own, as separate hosts (``qroute.ops.netns``)
    etcd: bool = False  # membership through an etcd started with the cluster: instances may join and leave later
    engine: str = "vllm"  # "sglang": `sglang serve` with qroute's SGLang plugin (docs/sglang.md); or MIXED_ENGINES

    def __post_init__(self) -> None:
        if self.engine not in CLUSTER_ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(CLUSTER_ENGINES)}, got {self.engine!r}")
        if self.engine != "vllm" and (self.etcd or self.netns or self.transport != "tcp" or self.selector != "dense"
                                        or self.corpus_dir is None):  # fmt: skip
            raise ConfigError("a cluster with SGLang instances has a corpus, dense selection over TCP on loopback (no "
                              "--etcd, --netns, NIXL or summary selection on SGLang yet)")

    def engine_of(self, k: int) -> str:
        """Instance ``k``'s engine: "vllm" or "sglang"."""
        if self.engine == MIXED_ENGINES:
            return "vllm" if k % 2 == 0 else "sglang"
        return self.engine
        if self.etcd and (self.netns or self.corpus_dir is None):
            raise ConfigError("--etcd needs a corpus and runs on loopback (not with --netns)")
        if self.num_instances < 1:
            raise ConfigError(f"--instances must be >= 1, got {self.num_instances}")
        if self.transport not in CLUSTER_TRANSPORTS:
            raise ConfigError(f"--transport must be one of {', '.join(CLUSTER_TRANSPORTS)}, got {self.transport!r}")
        if self.corpus_dir is not None and not 1 <= self.replicas <= self.num_instances:
            raise ConfigError(f"--replicas must be in [1, {self.num_instances}], got {self.replicas}")

    def instance_ids(self) -> list[str]:
        return [f"i{k}" for k in range(self.num_instances)]

    def host(self, k: int) -> str:
        """Instance ``k``'s address: loopback, or its namespace's address on the bridge."""
        return netns.address(k) if self.netns else "127.0.0.1"

    def http_port(self, k: int) -> int:
        return self.base_port + k

    def owner_port(self, k: int) -> int:
        return self.base_port + 100 + k

    @property
    def etcd_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.base_port + 300}" if self.etcd else ""

    def owner_addresses(self, k: int) -> str | list[str]:
        """Instance ``k``'s owner-service endpoints (``instances`` of the connector config): one on the spec's
        transport; with ``nixl+tcp``, NIXL and TCP (a second port) on every instance but the last, TCP only on the
        last, so that one cluster has peers reached over NIXL, over TCP, and over the faster of both."""
        address = f"{self.host(k)}:{self.owner_port(k)}"
        if self.transport != NIXL_AND_TCP:
            return address
        tcp = f"tcp://{self.host(k)}:{self.base_port + 200 + k}"
        return tcp if k == self.num_instances - 1 else [f"nixl://{address}", tcp]


def spec_of(state: ClusterState) -> ClusterSpec:
    """The spec a recorded cluster was started from (to start more instances of it)."""
    if not state.spec:
        raise ConfigError("this cluster's state has no spec (started by an older qroute): `qroute down` and up")
    spec = dict(state.spec)
    spec["model_dir"] = Path(spec["model_dir"])
    spec["corpus_dir"] = Path(spec["corpus_dir"]) if spec["corpus_dir"] else None
    return ClusterSpec(**spec)


def connector_config(spec: ClusterSpec, k: int) -> dict[str, Any]:
    """The ``--kv-transfer-config`` of instance ``k``; ``k`` past the spec's instances: one joining through etcd."""
    ids = spec.instance_ids()
    joining = k >= spec.num_instances
    name = f"i{k}"
    extra = {
        "instance_id": name,
        "instances": {name: spec.owner_addresses(k)} if joining else
                     {i: spec.owner_addresses(j) for j, i in enumerate(ids)},
        "corpus": {"name": spec.corpus_name, "path": str(spec.corpus_dir), "replicas": spec.replicas,
                   "blocks_per_chunk": spec.blocks_per_chunk},
        "transport": "nixl" if spec.transport == NIXL_AND_TCP else spec.transport,
        "mode": spec.mode,
        "secret_env": SECRET_ENV,
    }  # fmt: skip
    if spec.selector != "dense":
        extra.update(selector=spec.selector, topk=spec.topk)
    if spec.etcd:
        extra.update(etcd={"endpoint": spec.etcd_endpoint, "cluster": "qroute"}, join=joining)
    return {
        "kv_connector": "QRouteConnector",
        "kv_connector_module_path": "qroute.connectors.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def _vllm_instance(spec: ClusterSpec, k: int, secret: str, host: str) -> tuple[list[str], dict[str, str]]:
    extra: list[str] = []
    env = engine_env(k)
    if spec.corpus_dir is not None:
        extra = ["--kv-transfer-config", json.dumps(connector_config(spec, k)),
                 "--logits-processors", "qroute.plugin.vllm_validate:CorpusValidator",
                 "--middleware", "qroute.plugin.vllm_http.CorpusErrorMiddleware"]  # fmt: skip
        env[SECRET_ENV] = secret
    for flag, value in (("--num-gpu-blocks-override", spec.kv_blocks), ("--max-num-seqs", spec.max_num_seqs),
                        ("--max-num-batched-tokens", spec.max_num_batched_tokens)):  # fmt: skip
        extra += [flag, str(value)] if value else []  # after the defaults of vllm_serve_command: the last one holds
    cmd = vllm_serve_command(spec.model_dir, spec.http_port(k), max_model_len=spec.max_model_len, extra=extra,
                             host=host)  # fmt: skip
    return (netns.exec_prefix(f"i{k}") + cmd if spec.netns else cmd), env


def _sglang_instance(spec: ClusterSpec, k: int, secret: str, host: str) -> tuple[list[str], dict[str, str]]:
    return sglang_serve.qroute_instance(
        spec.model_dir, spec.http_port(k), host=host, context_length=spec.max_model_len,
        qroute_config=connector_config(spec, k)["kv_connector_extra_config"],
        config_path=state_dir() / f"i{k}-qroute.json", secret_env=SECRET_ENV, secret=secret,
    )  # fmt: skip


def spawn_instance(spec: ClusterSpec, k: int, secret: str) -> tuple[subprocess.Popen, InstanceInfo]:
    """Start instance ``k`` of ``spec`` (its own process group, log under the state directory); not waited for.
    ``k`` past the spec's instances: one that joins through etcd."""
    name = f"i{k}"
    log_path = state_dir() / "logs" / f"{name}.log"
    host = spec.host(k)
    engine = spec.engine_of(k)
    cmd, env = (_sglang_instance if engine == "sglang" else _vllm_instance)(spec, k, secret, host)
    process = spawn(cmd, env, log_path)
    info = InstanceInfo(instance_id=name, url=f"http://{host}:{spec.http_port(k)}/v1", pid=process.pid,
                        owner_address=f"{host}:{spec.owner_port(k)}" if spec.corpus_dir else "",
                        log=str(log_path), engine=engine)  # fmt: skip
    return process, info


def start_cluster(spec: ClusterSpec, *, log=print, secret: str | None = None) -> ClusterState:
    """Start the instances, wait for them, prefill the corpus; stops everything again on failure. ``secret``: the
    cluster's shared secret (default: a new random one), e.g. to start a stopped instance again later."""
    from qroute.core.corpus import place_model_corpus

    state = ClusterState(
        model_dir=str(spec.model_dir),
        corpus_dir=str(spec.corpus_dir) if spec.corpus_dir else None,
        corpus_name=spec.corpus_name if spec.corpus_dir else None,
        mode=spec.mode,
    )
    secret = secret or secrets.token_hex(16)
    state.spec = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(spec).items()}
    processes = []
    try:
        if spec.netns:
            netns.create(spec.instance_ids())
            state.netns = spec.instance_ids()
        if spec.etcd:
            server = start_etcd(state_dir() / "etcd", spec.base_port + 300, log_path=state_dir() / "logs" / "etcd.log")
            state.etcd_endpoint, state.etcd_pid = server.endpoint, server.pid
        for k in range(spec.num_instances):
            process, info = spawn_instance(spec, k, secret)
            processes.append(process)
            state.instances.append(info)
        state.save()
        log(f"qroute: starting {spec.num_instances} {spec.engine} serve instance(s); logs in {state_dir() / 'logs'}")
        wait_healthy(state.instances, processes, START_TIMEOUT_S)
        if spec.corpus_dir is not None:
            token_ids, directory = place_model_corpus(
                spec.model_dir, spec.corpus_dir, name=spec.corpus_name, instances=spec.instance_ids(),
                replicas=spec.replicas, blocks_per_chunk=spec.blocks_per_chunk,
            )  # fmt: skip
            prefill_corpus_http(state, token_ids.tolist(), directory, log=log)
            state.corpus_tokens, state.corpus_version = directory.num_tokens, directory.version
            for info in state.instances:
                info.chunks = len(directory.chunks_of(info.instance_id))
        state.save()
        return state
    except BaseException:
        for process in processes:
            stop_pid(process.pid)
        if state.etcd_pid:
            stop_pid(state.etcd_pid)
        netns.destroy(state.netns)
        (state_dir() / "cluster.json").unlink(missing_ok=True)
        raise


def prefill_corpus_http(state: ClusterState, token_ids: list[int], directory, *, log=print,
                        only: str | None = None) -> None:  # fmt: skip
    """Exact-mode corpus prefill: chunk by chunk in order, on every owner of the chunk (``only``: on that instance
    only, e.g. one started again with an empty store). A chunk that an owner reports as not stored (or with an
    error) raises ``QRouteError``: never a silently missing chunk."""
    urls = {i.instance_id: i.url for i in state.instances}
    engines = {i.instance_id: i.engine for i in state.instances}
    start = time.monotonic()
    for chunk in directory.chunks:
        for owner in chunk.owners if only is None else [o for o in chunk.owners if o == only]:
            params = {"qroute": {"corpus": directory.name, "prefill_chunk": chunk.chunk_id}}
            where = f"prefill of chunk {chunk.chunk_id} of corpus {directory.name!r} on {owner!r}"
            prompt = token_ids[chunk.start : chunk.end]
            # vLLM with qroute's middleware answers a refused prefill (max_tokens=1) with HTTP 500; qroute's SGLang
            # plugin aborts a prefill it refuses or cannot store (HTTP 400 / 500)
            try:
                if engines[owner] == "sglang":
                    completion(urls[owner], prompt, max_tokens=1, extra={"custom_params": params})
                    continue
                reply = completion(urls[owner], prompt, max_tokens=1, kv_transfer_params=params)
            except QRouteError as exc:
                raise QRouteError(f"{where} was not stored: {exc}") from None
            report = (reply.get("kv_transfer_params") or {}).get("qroute") or {}
            if report.get("error") or report.get("stored_chunk") != chunk.chunk_id:
                raise QRouteError(f"{where} was not stored: "
                                  f"{report.get('error') or report or 'no qroute report in the reply'}")  # fmt: skip
        if chunk.chunk_id % 8 == 7 or chunk.chunk_id == len(directory.chunks) - 1:
            log(f"qroute: prefilled chunk {chunk.chunk_id + 1}/{len(directory.chunks)} of corpus {directory.name!r} "
                f"({time.monotonic() - start:.1f} s)")  # fmt: skip


def stop_cluster(state: ClusterState | None = None) -> int:
    """Stop every instance of the recorded cluster by PID; returns how many were running."""
    path = state_dir() / "cluster.json"
    if state is None:
        if not path.is_file():
            return 0
        state = ClusterState.load(path)
    running = 0
    for info in state.instances:
        if pid_alive(info.pid):
            running += 1
        stop_pid(info.pid)
    if state.etcd_pid:
        stop_pid(state.etcd_pid)
    netns.destroy(state.netns)
    path.unlink(missing_ok=True)
    return running
