"""Corpus lifecycle, second half: token ids -> blocks -> chunks -> owners -> the directory.

- ``CorpusLayout`` cuts token positions into blocks of ``block_size`` tokens (a multiple of the
  engine's block size) and chunks of ``blocks_per_chunk`` blocks; chunk ``c`` covers tokens
  ``[c * chunk_tokens, min((c + 1) * chunk_tokens, num_tokens))``, so chunk ids are stable for a
  given corpus and layout. The last block and chunk may be partial.
- ``place_chunk`` puts each chunk on ``replicas`` owners by rendezvous (highest-random-weight)
  hashing, so adding or removing one of N instances moves only about 1/N of the chunks.
- ``CorpusDirectory`` is the frozen, msgpack-serialisable map every instance shares.

No torch, vllm or sglang here.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from qroute.errors import ConfigError, CorpusError

__all__ = [
    "ChunkEntry",
    "CorpusDirectory",
    "CorpusLayout",
    "build_directory",
    "corpus_version",
    "place_chunk",
]

# Bumped when the version hash's input changes, so old and new builds never agree by accident.
_VERSION_DOMAIN = b"qroute-corpus-version/1"


@dataclass(frozen=True)
class CorpusLayout:
    """How token positions map to blocks and chunks."""

    block_size: int = 16
    blocks_per_chunk: int = 64
    engine_block_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.engine_block_size, int) or self.engine_block_size <= 0:
            raise ConfigError(f"engine_block_size={self.engine_block_size!r} must be a positive int")
        if (
            not isinstance(self.block_size, int)
            or self.block_size <= 0
            or self.block_size % self.engine_block_size
        ):
            raise ConfigError(
                f"block_size={self.block_size!r} must be a positive multiple of "
                f"engine_block_size={self.engine_block_size}"
            )
        if not isinstance(self.blocks_per_chunk, int) or self.blocks_per_chunk <= 0:
            raise ConfigError(f"blocks_per_chunk={self.blocks_per_chunk!r} must be a positive int")

    @property
    def chunk_tokens(self) -> int:
        return self.block_size * self.blocks_per_chunk

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_chunks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.chunk_tokens)

    def chunk_range(self, chunk_id: int, num_tokens: int) -> tuple[int, int]:
        start = chunk_id * self.chunk_tokens
        return start, min(start + self.chunk_tokens, num_tokens)


def corpus_version(token_ids: np.ndarray | Sequence[int], layout: CorpusLayout) -> str:
    """blake2b over the token ids and the block layout (not the placement: re-placing keeps it)."""
    ids = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8"))
    h = hashlib.blake2b(digest_size=16)
    h.update(_VERSION_DOMAIN)
    h.update(struct.pack("<QQQ", layout.block_size, layout.blocks_per_chunk, ids.shape[0]))
    h.update(ids.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- placement


def _weight(corpus_name: str, chunk_id: int, instance: str) -> int:
    # NUL separators: names cannot contain NUL (checked), so distinct triples never collide.
    key = f"{corpus_name}\x00{chunk_id}\x00{instance}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _check_instances(instances: Sequence[str], replicas: int) -> tuple[str, ...]:
    out = tuple(instances)
    if not out:
        raise ConfigError("instances is empty; give at least one instance id")
    for inst in out:
        if not isinstance(inst, str) or not inst or "\x00" in inst:
            raise ConfigError(f"instance id {inst!r} must be a non-empty str without NUL")
    if len(set(out)) != len(out):
        raise ConfigError(f"instances {list(out)} has duplicates")
    if not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"replicas={replicas!r} must be an int >= 1")
    if replicas > len(out):
        raise ConfigError(f"replicas={replicas} exceeds the number of instances ({len(out)})")
    return out


def place_chunk(corpus_name: str, chunk_id: int, instances: Sequence[str], replicas: int = 1) -> tuple[str, ...]:
    """The ``replicas`` owners of a chunk, highest rendezvous weight (the primary) first."""
    ranked = sorted(instances, key=lambda inst: (_weight(corpus_name, chunk_id, inst), inst), reverse=True)
    return tuple(ranked[:replicas])


# --------------------------------------------------------------------------- directory


class ChunkEntry(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Chunk ``chunk_id`` covers corpus tokens ``[start, end)``; ``owners[0]`` is the primary."""

    chunk_id: int
    start: int
    end: int
    owners: tuple[str, ...]


class CorpusDirectory(msgspec.Struct, frozen=True, gc=False):
    """Which instance owns which corpus tokens. Fields are only ever appended, with defaults."""

    name: str
    version: str
    model_fingerprint: str
    block_size: int
    blocks_per_chunk: int
    num_tokens: int
    replicas: int
    instances: tuple[str, ...]
    chunks: tuple[ChunkEntry, ...]

    @property
    def chunk_tokens(self) -> int:
        return self.block_size * self.blocks_per_chunk

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)

    def chunk(self, chunk_id: int) -> ChunkEntry:
        if not 0 <= chunk_id < len(self.chunks):
            raise CorpusError(f"corpus {self.name!r} has no chunk {chunk_id} (it has {len(self.chunks)})")
        return self.chunks[chunk_id]

    def owners_of(self, chunk_id: int) -> tuple[str, ...]:
        return self.chunk(chunk_id).owners

    def chunks_of(self, instance: str, *, primary_only: bool = False) -> tuple[ChunkEntry, ...]:
        """Chunks ``instance`` holds (as primary or replica, unless ``primary_only``)."""
        if primary_only:
            return tuple(c for c in self.chunks if c.owners[0] == instance)
        return tuple(c for c in self.chunks if instance in c.owners)

    def chunk_for_token(self, pos: int) -> ChunkEntry:
        if not 0 <= pos < self.num_tokens:
            raise CorpusError(f"token position {pos} is outside corpus {self.name!r} [0, {self.num_tokens})")
        return self.chunks[pos // self.chunk_tokens]

    def chunk_for_block(self, block_id: int) -> ChunkEntry:
        if not 0 <= block_id < self.num_blocks:
            raise CorpusError(f"block {block_id} is outside corpus {self.name!r} [0, {self.num_blocks})")
        return self.chunks[block_id // self.blocks_per_chunk]

    def with_instances(self, instances: Sequence[str], replicas: int | None = None) -> CorpusDirectory:
        """Re-place the same chunks on a new instance set; the version does not change."""
        replicas = self.replicas if replicas is None else replicas
        insts = _check_instances(instances, replicas)
        chunks = tuple(
            ChunkEntry(c.chunk_id, c.start, c.end, place_chunk(self.name, c.chunk_id, insts, replicas))
            for c in self.chunks
        )
        return msgspec.structs.replace(self, instances=insts, replicas=replicas, chunks=chunks)

    def to_bytes(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def from_bytes(cls, buf: bytes | memoryview) -> CorpusDirectory:
        try:
            directory = _DECODER.decode(buf)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, OverflowError) as exc:
            raise CorpusError(f"malformed corpus directory: {exc}") from exc
        _validate(directory)
        return directory


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(CorpusDirectory)


def _validate(d: CorpusDirectory) -> None:
    """Semantic checks for a decoded directory; raises CorpusError naming the first problem."""
    try:
        layout = CorpusLayout(d.block_size, d.blocks_per_chunk, engine_block_size=1)
        _check_instances(d.instances, d.replicas)
    except ConfigError as exc:
        raise CorpusError(f"malformed corpus directory {d.name!r}: {exc}") from exc
    if not d.name or "\x00" in d.name:
        raise CorpusError(f"malformed corpus directory: bad name {d.name!r}")
    if len(d.version) != 32 or d.version.strip("0123456789abcdef"):
        raise CorpusError(f"malformed corpus directory {d.name!r}: version {d.version!r} is not a version hash")
    if d.num_tokens <= 0 or len(d.chunks) != layout.num_chunks(d.num_tokens):
        raise CorpusError(
            f"malformed corpus directory {d.name!r}: {len(d.chunks)} chunks for {d.num_tokens} tokens"
        )
    known = set(d.instances)
    for i, c in enumerate(d.chunks):
        if c.chunk_id != i or (c.start, c.end) != layout.chunk_range(i, d.num_tokens):
            raise CorpusError(f"malformed corpus directory {d.name!r}: chunk {i} is {c}")
        if len(c.owners) != d.replicas or len(set(c.owners)) != len(c.owners) or not known.issuperset(c.owners):
            raise CorpusError(f"malformed corpus directory {d.name!r}: chunk {i} owners {c.owners}")


def build_directory(
    name: str,
    tokens: np.ndarray | Sequence[int],
    *,
    instances: Sequence[str],
    model_fingerprint: str,
    replicas: int = 1,
    block_size: int = 16,
    blocks_per_chunk: int = 64,
    engine_block_size: int = 16,
) -> CorpusDirectory:
    """Cut ``tokens`` into chunks and place them on ``instances``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ConfigError(f"corpus name {name!r} must be a non-empty str without NUL")
    if not isinstance(model_fingerprint, str) or not model_fingerprint:
        raise ConfigError(f"model_fingerprint={model_fingerprint!r} must be a non-empty str")
    layout = CorpusLayout(block_size, blocks_per_chunk, engine_block_size)
    insts = _check_instances(instances, replicas)
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise CorpusError(f"corpus {name!r} is empty: no tokens to place")
    num_tokens = int(ids.shape[0])
    chunks = tuple(
        ChunkEntry(c, *layout.chunk_range(c, num_tokens), place_chunk(name, c, insts, replicas))
        for c in range(layout.num_chunks(num_tokens))
    )
    return CorpusDirectory(
        name=name,
        version=corpus_version(ids, layout),
        model_fingerprint=model_fingerprint,
        block_size=block_size,
        blocks_per_chunk=blocks_per_chunk,
        num_tokens=num_tokens,
        replicas=replicas,
        instances=insts,
        chunks=chunks,
    )


def prefill_problem(directory: CorpusDirectory, tokens: np.ndarray, instance: str, chunk: int,
                    prompt: Sequence[int]) -> str | None:  # fmt: skip
    """Why ``instance`` must not store ``prompt`` as corpus chunk ``chunk``, or None: the chunk must exist, be
    ``instance``'s, and ``prompt`` must be exactly its token ids (``tokens``: the whole corpus)."""
    d = directory
    if not 0 <= chunk < len(d.chunks):
        return f"prefill_chunk {chunk!r} is not a chunk of corpus {d.name!r} (0..{len(d.chunks) - 1})"
    entry = d.chunks[chunk]
    if instance not in entry.owners:
        return f"instance {instance!r} does not own chunk {chunk} (owners {list(entry.owners)})"
    if list(prompt) != tokens[entry.start : entry.end].tolist():
        return f"the prompt is not the token ids of chunk {chunk} ({entry.end - entry.start} tokens expected)"
    return None
