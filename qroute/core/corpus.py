"""Corpus lifecycle, first half: files -> token ids, and the one tokenize-and-place entry point.

- ``tokenize_corpus(root, encode, sep_ids=...)`` reads the text files under ``root`` in sorted
  relative-path order; each file contributes ``encode(f"{FILE_HEADER}{relpath}\\n")``, then
  ``encode(content)``, then ``sep_ids``. Binary, oversized and unreadable files are skipped with
  one ``CorpusWarning`` that lists them.
- ``place_model_corpus(model_dir, corpus_dir, ...)`` tokenizes with the model's tokenizer and places
  the tokens (``qroute.core.placement``: blocks -> chunks -> owners -> directory). Every instance, the
  launcher, the reference and the tests call it, so all build the same directory.

No torch, vllm or sglang here: placement runs in processes that never touch a tensor.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qroute.core.placement import CorpusDirectory, build_directory
from qroute.errors import ConfigError, CorpusError

__all__ = [
    "BLOCK_SIZE",
    "FILE_HEADER",
    "SEP_TOKEN",
    "CorpusFile",
    "CorpusWarning",
    "TokenizedCorpus",
    "TokenizerEncoder",
    "load_encoder",
    "place_model_corpus",
    "tokenize_corpus",
]

logger = logging.getLogger(__name__)

FILE_HEADER = "### file: "
SEP_TOKEN = "<|sep|>"
DEFAULT_MAX_FILE_BYTES = 4 << 20
# Directories that hold tool state, not source; every dot-directory is skipped as well.
SKIP_DIRS = frozenset({"__pycache__", "node_modules"})
BLOCK_SIZE = 16  # corpus block = vLLM's CPU MLA block size


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


def place_model_corpus(
    model_dir: str | Path,
    corpus_dir: str | Path,
    *,
    name: str,
    instances: Sequence[str],
    replicas: int = 1,
    block_size: int = BLOCK_SIZE,
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
