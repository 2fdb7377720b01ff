"""Corpus lifecycle: files -> token ids -> blocks -> chunks -> owners -> directory.

- ``tokenize_corpus(root, encode, sep_ids=...)`` reads the text files under ``root`` in sorted
  relative-path order; each file contributes ``encode(f"{FILE_HEADER}{relpath}\\n")``, then
  ``encode(content)``, then ``sep_ids``. Binary, oversized and unreadable files are skipped with
  one ``CorpusWarning`` that lists them.
- ``CorpusLayout`` cuts token positions into blocks of ``block_size`` tokens (a multiple of the
  engine's block size) and chunks of ``blocks_per_chunk`` blocks; chunk ``c`` covers tokens
  ``[c * chunk_tokens, min((c + 1) * chunk_tokens, num_tokens))``, so chunk ids are stable for a
  given corpus and layout. The last block and chunk may be partial.
- ``place_chunk`` puts each chunk on ``replicas`` owners by rendezvous (highest-random-weight)
  hashing, so adding or removing one of N instances moves only about 1/N of the chunks.
- ``CorpusDirectory`` is the frozen, msgpack-serialisable map every instance shares.

No torch, vllm or sglang here: placement runs in processes that never touch a tensor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from qroute.errors import ConfigError, CorpusError

__all__ = [
    "FILE_HEADER",
    "SEP_TOKEN",
    "ChunkEntry",
    "CorpusDirectory",
    "CorpusFile",
    "CorpusLayout",
    "CorpusWarning",
    "TokenizedCorpus",
    "TokenizerEncoder",
    "build_directory",
    "corpus_version",
    "load_encoder",
    "place_chunk",
    "tokenize_corpus",
]

logger = logging.getLogger(__name__)

FILE_HEADER = "### file: "
SEP_TOKEN = "<|sep|>"
DEFAULT_MAX_FILE_BYTES = 4 << 20
# Directories that hold tool state, not source; every dot-directory is skipped as well.
SKIP_DIRS = frozenset({"__pycache__", "node_modules"})
# Bumped when the version hash's input changes, so old and new builds never agree by accident.
_VERSION_DOMAIN = b"qroute-corpus-version/1"


class CorpusWarning(UserWarning):
    """Some files under a corpus root were skipped."""


# --------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class CorpusFile:
    """One file's span of the corpus token stream: ``token_ids[start:end]`` (header to separator)."""

    path: str
    start: int
    end: int


@dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """The token stream of a corpus. ``token_ids``: ``[num_tokens]`` int64, read-only."""

    root: Path
    token_ids: np.ndarray
    files: tuple[CorpusFile, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def _walk_files(root: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Pruning in place stops os.walk from descending; sorting here is not needed (we sort below).
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        for name in filenames:
            if name.startswith("."):  # .env and friends may hold secrets; never serve them
                continue
            full = Path(dirpath) / name
            found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return found


def _read_text(path: Path, root: Path, max_file_bytes: int) -> tuple[str | None, str]:
    """Return ``(text, "")`` or ``(None, why_skipped)``."""
    try:
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            return None, "symlink outside the corpus root"
        if not path.is_file():
            return None, "not a regular file"
        size = path.stat().st_size
        if size > max_file_bytes:
            return None, f"{size} bytes > max_file_bytes={max_file_bytes}"
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    if b"\x00" in raw:
        return None, "binary (NUL byte)"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "binary (not UTF-8)"


def _checked_ids(ids: Sequence[int], what: str) -> list[int]:
    out = list(ids)
    for token in out:
        if not isinstance(token, int | np.integer) or token < 0:
            raise CorpusError(f"{what} produced token id {token!r}; token ids must be ints >= 0")
    return out


def tokenize_corpus(
    root: Path | str,
    encode: Callable[[str], Sequence[int]],
    *,
    sep_ids: Sequence[int],
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> TokenizedCorpus:
    """Tokenize every text file under ``root`` in sorted relative-path order.

    Hidden files and directories, ``__pycache__`` and ``node_modules`` are not part of a corpus.
    """
    root = Path(root)
    if not root.exists():
        raise CorpusError(f"corpus directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise CorpusError(f"corpus path {str(root)!r} is not a directory")
    if max_file_bytes <= 0:
        raise ConfigError(f"max_file_bytes={max_file_bytes} must be > 0")
    root = root.resolve()
    sep = _checked_ids(sep_ids, "sep_ids")

    token_ids: list[int] = []
    files: list[CorpusFile] = []
    skipped: list[str] = []
    num_text_chars = 0
    for relpath, path in _walk_files(root):
        text, why = _read_text(path, root, max_file_bytes)
        if text is None:
            skipped.append(f"{relpath} ({why})")
            continue
        start = len(token_ids)
        # Header and body are encoded separately so that a file's body tokens never merge with
        # its path, whatever the tokenizer's merges.
        token_ids += _checked_ids(encode(f"{FILE_HEADER}{relpath}\n"), "encode")
        token_ids += _checked_ids(encode(text), "encode")
        token_ids += sep
        files.append(CorpusFile(relpath, start, len(token_ids)))
        num_text_chars += len(text)

    if skipped:
        msg = f"corpus {str(root)!r}: skipped {len(skipped)} file(s): " + ", ".join(skipped)
        logger.warning(msg)
        warnings.warn(msg, CorpusWarning, stacklevel=2)
    if num_text_chars == 0:
        raise CorpusError(f"corpus {str(root)!r} is empty: no readable, non-empty text files")
    array = np.asarray(token_ids, dtype=np.int64)
    array.flags.writeable = False
    return TokenizedCorpus(root, array, tuple(files), tuple(skipped))


class TokenizerEncoder:
    """``encode(text) -> token ids`` backed by a HF ``tokenizer.json``; no special tokens added.

    ``sep_ids`` is ``[id of <|sep|>]`` when the vocabulary has that token, else the ids of a
    blank line.
    """

    __slots__ = ("_tokenizer", "path", "sep_ids")

    def __init__(self, path: Path):
        import tokenizers  # lazy: placement-only processes never need it

        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception on a bad file
            raise CorpusError(f"cannot load tokenizer {str(path)!r}: {exc}") from exc
        # Corpus text that happens to spell a special token (e.g. "<|sep|>") must stay text.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.path = path
        sep_id = tokenizer.token_to_id(SEP_TOKEN)
        self.sep_ids: list[int] = [sep_id] if sep_id is not None else self("\n\n")

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def __repr__(self) -> str:
        return f"TokenizerEncoder({str(self.path)!r}, sep_ids={self.sep_ids})"


def load_encoder(model_dir: Path | str) -> TokenizerEncoder:
    """Load ``model_dir/tokenizer.json`` (or ``model_dir`` itself if it is the file)."""
    model_dir = Path(model_dir)
    path = model_dir if model_dir.is_file() else model_dir / "tokenizer.json"
    if not path.is_file():
        raise CorpusError(f"no tokenizer.json at {str(path)!r}; point model_dir at the model directory")
    return TokenizerEncoder(path)


# --------------------------------------------------------------------------- layout


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
    tokens: TokenizedCorpus | np.ndarray | Sequence[int],
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
    ids = tokens.token_ids if isinstance(tokens, TokenizedCorpus) else np.asarray(tokens, dtype=np.int64)
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


def place_model_corpus(
    model_dir: str | Path,
    corpus_dir: str | Path,
    *,
    name: str,
    instances: Sequence[str],
    replicas: int = 1,
    block_size: int = 16,
    blocks_per_chunk: int = 16,
    max_tokens: int | None = None,
) -> tuple[np.ndarray, CorpusDirectory]:
    """Tokenize ``corpus_dir`` with the model's tokenizer and place it: ``(token_ids [num_tokens] int64,
    directory)``. Every instance, the launcher and the tests call this, so all build the same directory
    (instances sorted, the model's fingerprint). ``max_tokens`` keeps only the first tokens."""
    from qroute.core.geometry import model_fingerprint

    encoder = load_encoder(model_dir)
    token_ids = tokenize_corpus(Path(corpus_dir), encoder, sep_ids=encoder.sep_ids).token_ids[:max_tokens]
    directory = build_directory(
        name,
        token_ids,
        instances=sorted(instances),
        replicas=replicas,
        block_size=block_size,
        blocks_per_chunk=blocks_per_chunk,
        model_fingerprint=model_fingerprint(model_dir),
    )
    return token_ids, directory
