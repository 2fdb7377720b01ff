"""``qroute up``, ``qroute status`` and ``qroute down``: a local cluster of ``vllm serve`` instances."""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

from qroute.errors import ConfigError
from qroute.ops.cluster import (
    CLUSTER_ENGINES,
    CLUSTER_TRANSPORTS,
    SECRET_ENV,
    ClusterSpec,
    ClusterState,
    InstanceInfo,
    prefill_corpus_http,
    spec_of,
    start_cluster,
    state_dir,
    stop_cluster,
)
from qroute.ops.http_client import healthy
from qroute.ops.processes import pid_alive
from qroute.ops.scrape import scrape, total


def model_dir_or_tiny(model_dir: str | None) -> Path:
    if model_dir:
        return Path(model_dir)
    from qroute.reference.tinymodel import build_tiny_model

    return build_tiny_model(dtype="float32")


def _up(args: argparse.Namespace) -> int:
    if (state_dir() / "cluster.json").is_file():
        raise ConfigError(f"a cluster is already recorded in {state_dir()}: run `qroute down` first")
    spec = ClusterSpec(
        model_dir=model_dir_or_tiny(args.model_dir),
        corpus_dir=Path(args.corpus).resolve(),
        num_instances=args.instances,
        corpus_name=args.corpus_name,
        replicas=args.replicas,
        blocks_per_chunk=args.blocks_per_chunk,
        mode=args.mode,
        transport=args.transport,
        base_port=args.base_port,
        netns=args.netns,
        etcd=args.etcd,
        engine=args.engine,
    )
    # the cluster's shared secret, in memory only: QROUTE_SECRET's if set (`qroute join` needs the same one)
    secret = os.environ.get(SECRET_ENV) or secrets.token_hex(16)
    state = start_cluster(spec, secret=secret)
    print(f"qroute: corpus {state.corpus_name!r}: {state.corpus_tokens} tokens, version {state.corpus_version}")
    for info in state.instances:
        print(f"{info.instance_id}  {info.url}  pid {info.pid}  owns {info.chunks} chunks")
    if args.supervise:
        from qroute.ops.supervisor import supervise

        print("qroute: supervising (an instance that dies is started again and prefilled); Ctrl-C stops "
              "supervising, `qroute down` stops the instances")  # fmt: skip
        try:
            supervise(spec, state, secret)
        except KeyboardInterrupt:
            pass
    return 0


ERRORS_SHOWN = 3  # the last qroute warnings and errors of each instance's log that `qroute status` shows


def last_errors(log_path: str, n: int = ERRORS_SHOWN) -> list[str]:
    """The last ``n`` qroute WARNING / ERROR lines of an instance's log."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if "qroute" in line and ("ERROR" in line or "WARNING" in line)][-n:]


def peer_health(url: str) -> dict[str, dict[str, float]]:
    """Per peer, from the instance's /metrics: up (1 / 0), and its fallbacks and deadline misses so far."""
    samples = scrape(url)
    peers = {dict(labels)["peer"]: {"up": value} for (name, labels), value in samples.items()
             if name == "vllm:qroute_peer_up"}  # fmt: skip
    for peer, health in peers.items():
        health["fallbacks"] = total(samples, "vllm:qroute_fallbacks_total", owner=peer)
        health["deadline_misses"] = total(samples, "vllm:qroute_deadline_misses_total", owner=peer)
    return peers


def cluster_status(state: ClusterState) -> list[dict]:
    """Each instance: URL, PID, whether it runs and is healthy, owned chunks, its view of its peers (empty before
    its first step) and its last qroute errors."""
    rows = []
    members = {}
    if state.etcd_endpoint:
        from qroute.ops.membership_ops import member_records

        members = {i: f"{r.state}, {len(r.ready_chunks)} chunks ready" for i, r in member_records(state).items()}
    for info in state.instances:
        alive = pid_alive(info.pid)
        ok = alive and healthy(info.url)
        rows.append({"instance": info.instance_id, "url": info.url, "pid": info.pid, "alive": alive, "healthy": ok,
                     "owned_chunks": info.chunks, "engine": info.engine,
                     "peers": peer_health(info.url) if ok and info.chunks and info.engine == "vllm" else {},
                     "last_errors": last_errors(info.log),
                     **({"member": members.get(info.instance_id, "no record")} if state.etcd_endpoint else {})})
    return rows


def _status(args: argparse.Namespace) -> int:
    state = ClusterState.load()
    rows = cluster_status(state)
    if args.json:
        print(json.dumps({"corpus": state.corpus_name, "corpus_tokens": state.corpus_tokens, "instances": rows}))
    else:
        print(f"corpus {state.corpus_name!r}: {state.corpus_tokens} tokens, mode {state.mode}")
        for r in rows:
            health = "healthy" if r["healthy"] else ("running, not healthy" if r["alive"] else "DOWN")
            member = f"  member: {r['member']}" if "member" in r else ""
            print(f"{r['instance']}  {r['url']}  pid {r['pid']}  {health}  owns {r['owned_chunks']} chunks{member}")
            for peer, h in r["peers"].items():
                print(f"    peer {peer}: {'up' if h['up'] else 'DOWN'}, fallbacks {h['fallbacks']:.0f}, "
                      f"deadline misses {h['deadline_misses']:.0f}")
            for line in r["last_errors"]:
                print(f"    {line}")
    return 0 if all(r["healthy"] for r in rows) else 1


def _prefill(args: argparse.Namespace) -> int:
    """The corpus prefill of instances started by hand (e.g. one per host): placement from the same ids, corpus,
    replicas and chunk size as their configs, then each chunk on its owners, in order."""
    from qroute.core.corpus import place_model_corpus

    urls = dict(item.split("=", 1) for item in args.url)
    if len(urls) != len(args.url) or not all(urls.values()):
        raise ConfigError("--url takes INSTANCE_ID=OPENAI_BASE_URL, once per instance")
    model_dir = model_dir_or_tiny(args.model_dir)
    token_ids, directory = place_model_corpus(model_dir, Path(args.corpus).resolve(), name=args.corpus_name,
                                              instances=list(urls), replicas=args.replicas,
                                              blocks_per_chunk=args.blocks_per_chunk)  # fmt: skip
    state = ClusterState(model_dir=str(model_dir), corpus_dir=args.corpus, corpus_name=args.corpus_name, mode="",
                         instances=[InstanceInfo(instance_id=i, url=u, pid=0, engine=args.engine)
                                    for i, u in urls.items()])  # fmt: skip
    prefill_corpus_http(state, token_ids.tolist(), directory)
    print(f"qroute: corpus {args.corpus_name!r} ({directory.num_tokens} tokens, version {directory.version}) "
          f"prefilled on {len(urls)} instances")  # fmt: skip
    return 0


def _join(args: argparse.Namespace) -> int:
    from qroute.ops.membership_ops import join_instance

    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise ConfigError(f"`qroute join` needs the cluster's secret in {SECRET_ENV} (the one `qroute up` was given)")
    state = ClusterState.load()
    join_instance(spec_of(state), state, secret)
    return 0


def _leave(args: argparse.Namespace) -> int:
    from qroute.ops.membership_ops import leave_instance

    leave_instance(ClusterState.load(), args.instance)
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = stop_cluster()
    print(f"qroute: stopped {stopped} instance(s)")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start N vllm (or sglang) serve instances on loopback sharing a corpus")
    up.add_argument("--engine", choices=CLUSTER_ENGINES, default="vllm",
                    help="sglang: `sglang serve` instances with qroute's SGLang plugin (its venv: make sglang-venv); "
                         "vllm+sglang: even instances vLLM, odd ones SGLang, sharing one corpus")
    up.add_argument("--instances", type=int, default=2)
    up.add_argument("--corpus", required=True, help="corpus directory (a codebase)")
    up.add_argument("--corpus-name", default="corpus")
    up.add_argument("--replicas", type=int, default=1)
    up.add_argument("--blocks-per-chunk", type=int, default=16, help="16-token blocks per placement chunk")
    up.add_argument("--model-dir", help="model directory (default: the built-in tiny model)")
    up.add_argument("--mode", choices=["auto", "route", "fetch", "local"], default="auto")
    up.add_argument("--transport", choices=CLUSTER_TRANSPORTS, default="tcp",
                    help="nixl+tcp: both at once, each peer over the faster link it has")
    up.add_argument("--base-port", type=int, default=8100, help="HTTP ports base..base+N-1, owners base+100..")
    up.add_argument("--netns", action="store_true",
                    help="each instance in a network namespace of its own (10.77.0.k), as separate hosts; needs root")
    up.add_argument("--supervise", action="store_true",
                    help="stay in the foreground and start again (and prefill) any instance that dies")
    up.add_argument("--etcd", action="store_true",
                    help="membership through an etcd started with the cluster, so that `qroute join` / `qroute leave` "
                         "can grow and shrink it; set QROUTE_SECRET to keep the secret for joins")
    up.set_defaults(handler=_up)
    join = sub.add_parser("join", help="start one more instance that joins a `qroute up --etcd` cluster")
    join.set_defaults(handler=_join)
    leave = sub.add_parser("leave", help="move an instance's chunks to their new owners, then stop it")
    leave.add_argument("instance")
    leave.set_defaults(handler=_leave)
    status = sub.add_parser("status", help="the local cluster: URL, PID, owned chunks, health, peers, last errors")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)
    prefill = sub.add_parser("prefill", help="prefill the corpus on instances started by hand (one per host)")
    prefill.add_argument("--url", action="append", required=True, metavar="ID=URL",
                         help="an instance's id and OpenAI base URL (http://host:port/v1); once per instance")
    prefill.add_argument("--corpus", required=True)
    prefill.add_argument("--corpus-name", default="corpus")
    prefill.add_argument("--replicas", type=int, default=1)
    prefill.add_argument("--blocks-per-chunk", type=int, default=16)
    prefill.add_argument("--model-dir")
    prefill.add_argument("--engine", choices=("vllm", "sglang"), default="vllm", help="the instances' engine")
    prefill.set_defaults(handler=_prefill)
    down = sub.add_parser("down", help="stop every instance of the local cluster by PID")
    down.set_defaults(handler=_down)
