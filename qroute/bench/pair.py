"""A live requester and owner on loopback, and the operations that calibration and the benchmark time.

The owner is a real ``qroute owner`` process (``start_owner``) holding a whole generated corpus; the requester
is this process and holds nothing (it plans the corpus for the handshake but never prefills it). The timed
operations are the router's hot path (``qroute/dataplane/router.py``), written out so each step can be timed alone:

- route: ``RouteRequest`` of ``[B, H, *]`` query rows (``to_wire``) -> ``encode`` -> ``call`` -> ``decode``;
  ``route_part`` adds ``as_torch`` of the reply (the part the router merges);
- fetch: ``byte_ranges`` -> ``read`` into a fresh buffer -> rows ``[n, width]`` -> ``partial_attention``.

Both processes run torch with one thread: they share the machine's cores with each other.
"""

from __future__ import annotations

import random
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qroute.core.corpus import place_model_corpus
from qroute.core.costmodel import load_fabric
from qroute.core.geometry import MLAGeometry, geometry_from_config, load_config
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.peering import connect_owner
from qroute.dataplane.router import Router, RouterConfig
from qroute.dataplane.shard import compat_for
from qroute.errors import ConfigError
from qroute.numerics.attention import AttentionParams
from qroute.ops.owner_process import OwnerProcess, start_owner
from qroute.transport import Connection, Transport, get_transport

OWNER = "owner"
BLOCKS_PER_CHUNK = 16  # large chunks: the owner's reference prefill is faster, placement is irrelevant here
_WORDS = ("alpha", "beta", "gamma", "delta", "value", "index", "table", "query", "owner", "block", "items", "count")


def write_corpus(root: Path, num_tokens: int) -> Path:
    """A deterministic synthetic codebase of at least about ``num_tokens`` tokens (tiny model's tokenizer)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    num_functions = num_tokens // 16 + 64  # ~22 tokens per function: a margin, cut by max_tokens
    per_file = 200
    for f in range(-(-num_functions // per_file)):
        lines = []
        for i in range(per_file):
            a, b, c = rng.choice(_WORDS), rng.choice(_WORDS), rng.choice(_WORDS)
            lines.append(f"def {a}_{f}_{i}({b}, {c}):\n    return {b} + {c} * {i}\n")
        (root / f"mod{f:03d}.py").write_text("".join(lines))
    return root


@dataclass
class Pair:
    """A connected requester/owner pair. Close it (or use ``with``) to stop the owner process."""

    kind: str
    transport: Transport
    connection: Connection
    owner: OwnerProcess
    directory: CorpusDirectory
    geometry: MLAGeometry
    params: AttentionParams
    router: Router  # the requester: this process, holding nothing, connected to the owner
    owner_stats: dict | None = None

    @property
    def num_blocks(self) -> int:
        return self.directory.num_blocks

    @property
    def row_bytes(self) -> int:
        return self.geometry.latent_bytes_per_token  # one token's row in one layer (float32 here)

    def close(self) -> dict | None:
        """Close the connection and stop the owner; returns (and keeps in ``owner_stats``) the owner's final
        metrics (``MetricsSnapshot.as_dict``), which include its own timing of the routes it handled."""
        try:
            self.connection.close()
            self.transport.close()
        except BaseException:
            self.owner.stop()
            raise
        self.owner_stats = self.owner.stop()
        return self.owner_stats

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pair(kind: str, *, workdir: Path, num_tokens: int, transport_opts: dict | None = None) -> Pair:
    """Start an owner process holding a generated corpus of ``num_tokens`` tokens and connect to it."""
    from qroute.reference.tinymodel import build_tiny_model

    model_dir = build_tiny_model(dtype="float32")
    corpus = write_corpus(workdir / "corpus", num_tokens)
    _, directory = place_model_corpus(
        model_dir, corpus, name="corpus", instances=[OWNER], blocks_per_chunk=BLOCKS_PER_CHUNK, max_tokens=num_tokens
    )
    fingerprint = directory.model_fingerprint
    if directory.num_tokens < num_tokens:
        raise ConfigError(f"generated corpus has {directory.num_tokens} tokens, fewer than {num_tokens}")
    geometry = geometry_from_config(model_dir, cache_dtype="float32", dtype="float32")
    params = AttentionParams.from_config(load_config(model_dir))
    secret = secrets.token_hex(16).encode()
    owner = start_owner(
        instance=OWNER, transport=kind, model_dir=model_dir, corpus=corpus, instances=[OWNER], secret=secret,
        blocks_per_chunk=BLOCKS_PER_CHUNK, max_tokens=num_tokens, extra_env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    transport = get_transport(kind, **(transport_opts or {}))
    try:
        connection = connect_owner(
            transport, owner.address, instance_id="requester", directory=directory, model_fingerprint=fingerprint,
            compat=compat_for(fingerprint, directory, geometry.latent_width, torch.float32), secret=secret,
            timeout_s=30.0,
        )  # fmt: skip
    except BaseException:
        transport.close()
        owner.stop()
        raise
    router = Router(RouterConfig("requester", timeout_s=10.0), directory, geometry, load_fabric(f"loopback-{kind}"),
                    params, {OWNER: connection})  # fmt: skip
    return Pair(kind, transport, connection, owner, directory, geometry, params, router)


# ---- selections and inputs ------------------------------------------------------------------------------


def select_blocks(num_tokens: int, run_blocks: int, block_size: int, available: int) -> tuple[int, ...]:
    """Block ids for ``num_tokens`` tokens in runs of ``run_blocks`` adjacent blocks, one block apart, so a
    READ moves ``ceil(blocks / run_blocks)`` descriptors (a sparse selection, as a top-k indexer makes)."""
    if num_tokens % block_size:
        raise ConfigError(f"num_tokens={num_tokens} must be a multiple of the block size {block_size}")
    count = num_tokens // block_size
    ids = [start + k for start in range(0, 2 * count, run_blocks + 1) for k in range(run_blocks)][:count]
    if len(ids) < count or ids[-1] >= available:
        raise ConfigError(f"{num_tokens} tokens in runs of {run_blocks} blocks need more than the corpus's "
                          f"{available} blocks")  # fmt: skip
    return tuple(ids)


def queries(batch: int, heads: int, geometry: MLAGeometry, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``q_nope [B, H, kv_lora_rank]`` and ``q_pe [B, H, rope_dim]`` float32."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, geometry.kv_lora_rank, generator=g),
            torch.randn(batch, heads, geometry.qk_rope_head_dim, generator=g))  # fmt: skip


# ---- operations -----------------------------------------------------------------------------------------


def route_request(pair: Pair, q_nope: torch.Tensor, q_pe: torch.Tensor, block_ids: tuple[int, ...],
                  layer: int = 0) -> bytes:
    """The encoded route request the router sends for ``block_ids``."""
    return pair.router.route_request(layer, q_nope, q_pe, block_ids)


def fetch_rows(pair: Pair, block_ids: tuple[int, ...], layer: int = 0) -> torch.Tensor:
    """The router's one-sided READ of the blocks' rows: ``[n, width]`` float32."""
    return pair.router.read_rows(layer, block_ids, OWNER)


# ---- timing ---------------------------------------------------------------------------------------------


def time_interleaved(ops: Sequence[Callable[[], object]], reps: int, warmup: int = 3,
                     seed: int = 0) -> list[list[float]]:
    """Seconds per call of each op: ``warmup`` untimed rounds, then ``reps`` rounds, each visiting every op once
    in a fresh random order (so a slow spell on the shared machine spreads over all points, not one)."""
    rng = random.Random(seed)
    order = list(range(len(ops)))
    for _ in range(warmup):
        for op in ops:
            op()
    times: list[list[float]] = [[] for _ in ops]
    for _ in range(reps):
        rng.shuffle(order)
        for i in order:
            op = ops[i]
            start = time.perf_counter()
            op()
            times[i].append(time.perf_counter() - start)
    return times


def summary_us(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p99 (nearest rank) and min, in microseconds."""
    s = sorted(seconds)
    p99 = s[min(len(s) - 1, max(0, int(np.ceil(0.99 * len(s))) - 1))]
    return {"median_us": statistics.median(s) * 1e6, "p99_us": p99 * 1e6, "min_us": s[0] * 1e6, "n": len(s)}
