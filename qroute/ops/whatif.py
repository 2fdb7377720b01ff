"""``qroute whatif``: the cost model at cluster scale. Model predictions, not measurements.

One decode step of ``C`` concurrent requests on one requester, a corpus of ``T`` tokens sharded evenly over ``N``
instances, each request selecting its top-``K`` blocks per layer (``block_size`` tokens each), spread evenly over
the owners. Assumed: the ``C`` requests select the same blocks (agents asking about the same part of a codebase:
the case owner batching serves with one GEMM), owners are alike and answer in parallel, and a requester reads
from all its owners through one link. Per layer, ``qroute.core.costmodel`` prices:

- route: one message per owner carrying the ``C`` requests' rows (``costs`` with ``B = C`` over an owner's
  share of the selection); the requester's own share is computed while the routes fly;
- fetch: every remote selected block read through the requester's link (``fetch_terms`` over all remote
  selected tokens), then attended locally;
- auto: the predicate's choice per owner (``costs``), as the router makes it;
- stock (vLLM NixlConnector prefill/decode): the decode instance pulls a request's whole prefix KV (all ``T`` corpus
  tokens, every layer) once, then attends locally; its pull lands on the first token (TTFT), and it must hold
  the whole corpus.

Also: bytes moved per decoded token, and how many sessions of ``session_tokens`` own tokens fit at the same KV budget
per instance when every stock instance holds the whole corpus and a qroute instance holds its ``replicas / N``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from qroute.core.costmodel import FabricProfile, Workload, costs, fetch_terms, load_fabric
from qroute.core.geometry import MLAGeometry, geometry_from_config
from qroute.errors import ConfigError

__all__ = ["Scenario", "predict", "sweep_topk"]

NOTE = "model predictions (qroute.core.costmodel), not measurements"


@dataclass(frozen=True)
class Scenario:
    instances: int
    corpus_tokens: int
    topk: int
    concurrency: int
    block_size: int = 64
    decode_tokens: int = 256  # tokens a request decodes (stock's pull is per request)
    session_tokens: int = 4096  # own tokens (question, answer, tool output) one agent session keeps
    kv_budget_gb: float = 40.0  # KV cache per instance, GB
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.instances < 1 or self.corpus_tokens < 1 or self.topk < 1 or self.concurrency < 1:
            raise ConfigError(f"whatif needs instances, corpus tokens, top-k and concurrency >= 1; got {self}")
        if not 1 <= self.replicas <= self.instances:
            raise ConfigError(f"replicas must be in [1, {self.instances}], got {self.replicas}")


def predict(geometry: MLAGeometry, fabric: FabricProfile, s: Scenario) -> dict[str, Any]:
    """Per-step attention time (ms, all layers) of route, fetch, auto and stock, the decisions, bytes per decoded
    token and sessions per instance at the same KV budget."""
    heads, layers = geometry.num_heads, geometry.num_layers
    selected = min(s.topk * s.block_size, s.corpus_tokens)  # tokens each request attends to per layer
    share = math.ceil(selected / s.instances)  # an owner's part of them
    remote = s.instances - 1
    local_us = fabric.compute_us(s.concurrency, heads, share)
    owner = costs(geometry, fabric, Workload(batch=s.concurrency, heads=heads, tokens=share, block_size=s.block_size))
    route_us = max(local_us, owner.route_us) if remote else local_us
    fetch_all = fetch_terms(geometry, fabric, Workload(batch=s.concurrency, heads=heads, tokens=share * remote,
                                                       block_size=s.block_size)) if remote else {}  # fmt: skip
    fetch_us = local_us + sum(fetch_all.values())
    auto_us = route_us if owner.decision.value == "route" else fetch_us
    stock_us = fabric.compute_us(s.concurrency, heads, selected)
    pull_bytes = s.corpus_tokens * geometry.latent_bytes_per_token_all_layers
    stock_pull_ms = (fabric.read_probe_us + fabric.read_us(pull_bytes)) / 1e3
    bytes_per_token = {
        "route": remote * heads * (geometry.query_row_bytes + geometry.return_row_bytes) * layers,
        "fetch": remote * share * geometry.latent_bytes_per_token * layers / s.concurrency,
        "stock": pull_bytes / s.decode_tokens,
    }
    bytes_per_token["auto"] = bytes_per_token["route" if owner.decision.value == "route" else "fetch"]
    budget = s.kv_budget_gb * 1e9
    session = s.session_tokens * geometry.latent_bytes_per_token_all_layers
    corpus = pull_bytes
    stock_sessions = max(0, math.floor((budget - corpus) / session))
    qroute_sessions = max(0, math.floor((budget - corpus * s.replicas / s.instances) / session))
    return {
        "note": NOTE, "scenario": asdict(s), "fabric": fabric.name, "model": geometry.model_type,
        "selected_tokens_per_layer": selected, "owner_share_tokens": share, "owner_decision": owner.decision.value,
        "step_ms": {"route": route_us * layers / 1e3, "fetch": fetch_us * layers / 1e3,
                    "auto": auto_us * layers / 1e3, "stock": stock_us * layers / 1e3},
        "stock_pull_ms_per_request": stock_pull_ms,
        "bytes_per_decoded_token": bytes_per_token,
        "corpus_gb": corpus / 1e9, "corpus_fits_one_instance": corpus <= budget,
        "sessions_per_instance": {"stock": stock_sessions, "qroute": qroute_sessions},
    }  # fmt: skip


def sweep_topk(geometry: MLAGeometry, fabric: FabricProfile, s: Scenario, topks: list[int]) -> dict[str, Any]:
    """``predict`` at each top-k, and the smallest top-k at which route is predicted faster than fetch."""
    rows = {k: predict(geometry, fabric, Scenario(**{**asdict(s), "topk": k})) for k in topks}
    crossing = next((k for k, r in rows.items() if r["step_ms"]["route"] < r["step_ms"]["fetch"]), None)
    return {"by_topk": {str(k): r["step_ms"] for k, r in rows.items()}, "route_faster_from_topk": crossing}


def _plot(sweep: dict[str, Any], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib (pip install matplotlib)") from exc
    topks = [int(k) for k in sweep["by_topk"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("route", "fetch", "auto", "stock"):
        ax.plot(topks, [sweep["by_topk"][str(k)][name] for k in topks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("top-k blocks per layer")
    ax.set_ylabel("attention per decode step, ms (all layers)")
    ax.set_title(f"{title}\n{NOTE}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    geometry = geometry_from_config(args.model, cache_dtype=args.cache_dtype)
    fabric = load_fabric(args.fabric)
    s = Scenario(instances=args.instances, corpus_tokens=args.corpus_tokens, topk=args.topk,
                 concurrency=args.concurrency, block_size=args.block_size, decode_tokens=args.decode_tokens,
                 session_tokens=args.session_tokens, kv_budget_gb=args.kv_budget_gb,
                 replicas=args.replicas)  # fmt: skip
    report = predict(geometry, fabric, s)
    report["sweep"] = sweep_topk(geometry, fabric, s, [2**i for i in range(12)])
    if args.plot:
        _plot(report["sweep"], args.plot, f"{geometry.model_type} on {fabric.name}, {s.instances} instances, "
              f"{s.corpus_tokens} corpus tokens, {s.concurrency} requests")  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{NOTE}")
    print(f"{geometry.model_type} on {fabric.name}: {s.instances} instances, corpus {s.corpus_tokens} tokens "
          f"({report['corpus_gb']:.1f} GB of KV), top-{s.topk} of {s.block_size}-token blocks, {s.concurrency} "
          f"requests per step")  # fmt: skip
    print(f"each owner's share: {report['owner_share_tokens']} tokens per layer; the predicate decides "
          f"{report['owner_decision']}")
    for name, ms in report["step_ms"].items():
        print(f"  {name:6s} {ms:10.3f} ms per step   {report['bytes_per_decoded_token'][name]:14.0f} B per token")
    print(f"  stock's pull of the corpus: {report['stock_pull_ms_per_request']:.1f} ms per request (on its TTFT)")
    sessions = report["sessions_per_instance"]
    print(f"sessions of {s.session_tokens} tokens per instance at {s.kv_budget_gb:g} GB of KV: stock "
          f"{sessions['stock']}, qroute {sessions['qroute']}"
          + ("" if report["corpus_fits_one_instance"] else " (the corpus does not fit one stock instance)"))
    crossing = report["sweep"]["route_faster_from_topk"]
    print(f"route predicted faster than fetch from top-k {crossing}" if crossing else
          "fetch predicted faster at every top-k up to 2048")  # fmt: skip
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("whatif", help="the cost model at cluster scale (predictions)")
    parser.add_argument("--model", required=True, help="an HF config (configs/models/*.json) or model directory")
    parser.add_argument("--fabric", required=True)
    parser.add_argument("--instances", type=int, required=True)
    parser.add_argument("--corpus-tokens", type=int, required=True)
    parser.add_argument("--topk", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--session-tokens", type=int, default=4096)
    parser.add_argument("--kv-budget-gb", type=float, default=40.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cache-dtype", help="override the model's KV cache dtype (e.g. fp8_ds_mla)")
    parser.add_argument("--plot", help="PNG of step time against top-k")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run)
