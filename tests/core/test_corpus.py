"""Tests for qroute.core.corpus: tokenization, layout, placement, directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest

from qroute.core.corpus import FILE_HEADER, CorpusWarning, load_encoder, tokenize_corpus
from qroute.core.placement import CorpusDirectory, CorpusLayout, build_directory, corpus_version, place_chunk
from qroute.errors import ConfigError, CorpusError

SEP = [0xFFFF]


def byte_encode(text: str) -> list[int]:
    """A tiny fake tokenizer: one token per UTF-8 byte."""
    return list(text.encode())


def decode_bytes(ids: np.ndarray) -> bytes:
    return bytes(int(i) for i in ids if i < 256)


def write(root: Path, rel: str, data: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- tokenization


def test_files_in_sorted_order_with_headers_and_separators(tmp_path: Path) -> None:
    write(tmp_path, "b.py", "bee")
    write(tmp_path, "a/z.txt", "zed")
    write(tmp_path, "a.txt", "ay")
    corpus = tokenize_corpus(tmp_path, byte_encode, sep_ids=SEP)

    assert [f.path for f in corpus.files] == ["a.txt", "a/z.txt", "b.py"]
    expected: list[int] = []
    for rel, body in [("a.txt", "ay"), ("a/z.txt", "zed"), ("b.py", "bee")]:
        expected += byte_encode(f"{FILE_HEADER}{rel}\n") + byte_encode(body) + SEP
    assert corpus.token_ids.tolist() == expected
    assert corpus.token_ids.dtype == np.int64 and not corpus.token_ids.flags.writeable
    # File spans tile the stream, each ending in the separator.
    assert corpus.files[0].start == 0 and corpus.files[-1].end == corpus.num_tokens
    for before, after in zip(corpus.files, corpus.files[1:], strict=False):
        assert before.end == after.start
    for f in corpus.files:
        assert corpus.token_ids[f.end - 1] == SEP[0]


def test_hidden_and_cache_dirs_skipped(tmp_path: Path) -> None:
    write(tmp_path, "src/main.py", "print(1)")
    write(tmp_path, ".git/config", "secret")
    write(tmp_path, ".venv/lib/x.py", "x")
    write(tmp_path, "src/__pycache__/main.txt", "cache")
    write(tmp_path, ".env", "TOKEN=1")
    corpus = tokenize_corpus(tmp_path, byte_encode, sep_ids=SEP)
    assert [f.path for f in corpus.files] == ["src/main.py"]
    assert b"secret" not in decode_bytes(corpus.token_ids)


def test_binary_oversized_and_unreadable_files_warned_and_skipped(tmp_path: Path) -> None:
    write(tmp_path, "ok.txt", "fine")
    write(tmp_path, "nul.bin", b"abc\x00def")
    write(tmp_path, "latin1.txt", b"caf\xe9")
    write(tmp_path, "big.txt", "x" * 200)
    locked = write(tmp_path, "locked.txt", "hidden")
    locked.chmod(0)
    can_lock = not os.access(locked, os.R_OK)  # root reads anything
    try:
        with pytest.warns(CorpusWarning) as record:
            corpus = tokenize_corpus(tmp_path, byte_encode, sep_ids=SEP, max_file_bytes=100)
    finally:
        locked.chmod(0o644)
    message = str(record[0].message)
    assert "nul.bin (binary" in message and "latin1.txt (binary" in message
    assert "big.txt (200 bytes > max_file_bytes=100)" in message
    expected = ["ok.txt"] if can_lock else ["locked.txt", "ok.txt"]
    assert [f.path for f in corpus.files] == expected
    if can_lock:
        assert "locked.txt (unreadable" in message
    assert len(corpus.skipped) == 3 + can_lock


def test_read_error_is_warned_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod 0 does not stop root, so simulate the failing read.
    write(tmp_path, "ok.txt", "fine")
    write(tmp_path, "eio.txt", "gone")
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "eio.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.warns(CorpusWarning, match=r"eio.txt \(unreadable \(Permission denied\)\)"):
        corpus = tokenize_corpus(tmp_path, byte_encode, sep_ids=SEP)
    assert [f.path for f in corpus.files] == ["ok.txt"]


def test_missing_root_not_a_dir_and_empty(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        tokenize_corpus(tmp_path / "nope", byte_encode, sep_ids=SEP)
    file = write(tmp_path, "file.txt", "x")
    with pytest.raises(CorpusError, match="not a directory"):
        tokenize_corpus(file, byte_encode, sep_ids=SEP)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="is empty"):
        tokenize_corpus(empty, byte_encode, sep_ids=SEP)
    write(empty, "blank.txt", "")
    write(empty, "bin.dat", b"\x00\x01")
    with pytest.warns(CorpusWarning), pytest.raises(CorpusError, match="is empty"):
        tokenize_corpus(empty, byte_encode, sep_ids=SEP)


def test_bad_token_ids_from_encoder_rejected(tmp_path: Path) -> None:
    write(tmp_path, "a.txt", "a")
    with pytest.raises(CorpusError, match="token id"):
        tokenize_corpus(tmp_path, lambda s: [-1], sep_ids=SEP)


def test_load_encoder_with_trained_bpe(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|sep|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = ["def main():\n    return 42\n", "import os\nprint(os.getcwd())\n"] * 20
    tok.train_from_iterator(lines, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))

    encoder = load_encoder(tmp_path)
    sep_id = tok.token_to_id("<|sep|>")
    assert encoder.sep_ids == [sep_id]
    ids = encoder("def main():")
    assert ids and tok.decode(ids) == "def main():"
    # Corpus text that spells the separator must not become the separator token.
    assert sep_id not in encoder("a <|sep|> b")

    root = tmp_path / "corpus"
    write(root, "m.py", lines[0])
    corpus = tokenize_corpus(root, encoder, sep_ids=encoder.sep_ids)
    assert corpus.token_ids[-1] == sep_id
    assert tok.decode(corpus.token_ids[:-1].tolist()) == f"{FILE_HEADER}m.py\n{lines[0]}"

    with pytest.raises(CorpusError, match="tokenizer.json"):
        load_encoder(tmp_path / "corpus")


# --------------------------------------------------------------------------- layout


def test_layout_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="block_size=24 must be a positive multiple of engine_block_size=16"):
        CorpusLayout(block_size=24)
    with pytest.raises(ConfigError, match="block_size=0"):
        CorpusLayout(block_size=0)
    with pytest.raises(ConfigError, match="blocks_per_chunk"):
        CorpusLayout(blocks_per_chunk=0)
    assert CorpusLayout(block_size=64, engine_block_size=32).chunk_tokens == 64 * 64


@pytest.mark.parametrize("num_tokens", [1, 15, 16, 17, 128, 129, 1000])
@pytest.mark.parametrize("block_size,blocks_per_chunk", [(16, 1), (16, 4), (32, 3)])
def test_blocks_and_chunks_cover_the_corpus(num_tokens: int, block_size: int, blocks_per_chunk: int) -> None:
    d = build_directory(
        "c", np.arange(num_tokens), instances=["a", "b"], model_fingerprint="m",
        block_size=block_size, blocks_per_chunk=blocks_per_chunk,
    )
    chunk_tokens = block_size * blocks_per_chunk
    assert len(d.chunks) == -(-num_tokens // chunk_tokens)
    assert d.num_blocks == -(-num_tokens // block_size)
    assert d.chunks[0].start == 0 and d.chunks[-1].end == num_tokens
    for i, c in enumerate(d.chunks):
        assert c.chunk_id == i
        assert c.end - c.start == chunk_tokens or i == len(d.chunks) - 1
    for pos in {0, num_tokens // 2, num_tokens - 1}:
        c = d.chunk_for_token(pos)
        assert c.start <= pos < c.end
        assert d.chunk_for_block(pos // block_size) == c
    with pytest.raises(CorpusError, match="outside"):
        d.chunk_for_token(num_tokens)
    with pytest.raises(CorpusError, match="outside"):
        d.chunk_for_block(d.num_blocks)


# --------------------------------------------------------------------------- placement


def test_replicas_are_distinct_and_primary_first() -> None:
    instances = [f"i{k}" for k in range(5)]
    d = build_directory("c", np.arange(16 * 200), instances=instances, model_fingerprint="m",
                        replicas=3, blocks_per_chunk=1)
    for c in d.chunks:
        assert len(c.owners) == 3 and len(set(c.owners)) == 3
        # The replica set extends the single-owner placement: the primary is the R=1 owner.
        assert c.owners[0] == place_chunk("c", c.chunk_id, instances, 1)[0]
        assert d.owners_of(c.chunk_id) == c.owners
    held = sum(len(d.chunks_of(i)) for i in instances)
    assert held == 3 * len(d.chunks)
    assert sum(len(d.chunks_of(i, primary_only=True)) for i in instances) == len(d.chunks)
    with pytest.raises(ConfigError, match="replicas=6 exceeds"):
        build_directory("c", [1], instances=instances, model_fingerprint="m", replicas=6)
    with pytest.raises(ConfigError, match="replicas=0"):
        build_directory("c", [1], instances=instances, model_fingerprint="m", replicas=0)
    with pytest.raises(ConfigError, match="duplicates"):
        build_directory("c", [1], instances=["a", "a"], model_fingerprint="m")
    with pytest.raises(CorpusError, match="no chunk 999"):
        d.owners_of(999)


def test_balance_over_four_instances() -> None:
    instances = ["a", "b", "c", "d"]
    counts = Counter(place_chunk("bal", c, instances)[0] for c in range(2000))
    expected = 2000 / 4
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in instances)
    assert chi2 < 16.27, counts  # 3 degrees of freedom, p = 0.001
    assert max(counts.values()) / min(counts.values()) < 1.25, counts


def test_adding_an_instance_moves_about_one_fifth_only_to_it() -> None:
    old, new = ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]
    d4 = build_directory("mv", np.arange(16 * 1000), instances=old, model_fingerprint="m", blocks_per_chunk=1)
    d5 = d4.with_instances(new)
    assert d5.version == d4.version
    moved = [(a, b) for a, b in zip(d4.chunks, d5.chunks, strict=True) if a.owners != b.owners]
    assert 0.15 < len(moved) / 1000 < 0.25
    assert all(b.owners == ("e",) for _, b in moved)


def test_removing_an_instance_moves_only_its_chunks() -> None:
    d4 = build_directory("mv", np.arange(16 * 1000), instances=["a", "b", "c", "d"],
                         model_fingerprint="m", blocks_per_chunk=1, replicas=2)
    d3 = d4.with_instances(["a", "b", "d"])
    for before, after in zip(d4.chunks, d3.chunks, strict=True):
        if "c" not in before.owners:
            assert after.owners == before.owners
        else:  # survivors keep their rank order; only c's slot is refilled (by the next-ranked)
            survivors = tuple(o for o in before.owners if o != "c")
            assert after.owners[: len(survivors)] == survivors
            assert "c" not in after.owners


# --------------------------------------------------------------------------- directory


def _directory() -> CorpusDirectory:
    return build_directory("code", np.arange(5000) % 97, instances=["x", "y", "z"],
                           model_fingerprint="tiny-mla@abc", replicas=2, blocks_per_chunk=8)


def test_directory_round_trip() -> None:
    d = _directory()
    again = CorpusDirectory.from_bytes(d.to_bytes())
    assert again == d and again.chunks[3].owners == d.chunks[3].owners
    assert CorpusDirectory.from_bytes(memoryview(d.to_bytes())) == d


@pytest.mark.parametrize(
    "buf",
    [b"", b"\xc1", b"\x93\x01\x02\x03", msgspec.msgpack.encode({"name": "x"})],
    ids=["empty", "reserved-byte", "array", "missing-fields"],
)
def test_malformed_directory_bytes(buf: bytes) -> None:
    with pytest.raises(CorpusError, match="malformed"):
        CorpusDirectory.from_bytes(buf)


def test_directory_semantic_validation() -> None:
    d = _directory()
    bad = [
        msgspec.structs.replace(d, num_tokens=d.num_tokens + 5000),
        msgspec.structs.replace(d, chunks=d.chunks[:-1]),
        msgspec.structs.replace(d, chunks=(d.chunks[1],) + d.chunks[1:]),
        msgspec.structs.replace(d, chunks=(msgspec.structs.replace(d.chunks[0], owners=("x", "w")),) + d.chunks[1:]),
        msgspec.structs.replace(d, chunks=(msgspec.structs.replace(d.chunks[0], owners=("x", "x")),) + d.chunks[1:]),
        msgspec.structs.replace(d, block_size=0),
        msgspec.structs.replace(d, replicas=4),
        msgspec.structs.replace(d, version="not-a-hash"),
    ]
    for b in bad:
        with pytest.raises(CorpusError, match="malformed"):
            CorpusDirectory.from_bytes(b.to_bytes())
    truncated = d.to_bytes()[:-3]
    with pytest.raises(CorpusError, match="malformed"):
        CorpusDirectory.from_bytes(truncated)


def test_version_hash_is_deterministic_and_sensitive() -> None:
    tokens = np.arange(3000) % 101
    layout = CorpusLayout()
    v = corpus_version(tokens, layout)
    assert v == corpus_version(tokens.tolist(), CorpusLayout()) == corpus_version(tokens.astype(np.int32), layout)
    assert v == _version_in_subprocess(tokens.tolist())  # no per-process hash seed
    changed = tokens.copy()
    changed[1234] += 1
    assert corpus_version(changed, layout) != v
    assert corpus_version(tokens[:-1], layout) != v
    assert corpus_version(tokens, CorpusLayout(blocks_per_chunk=32)) != v
    assert corpus_version(tokens, CorpusLayout(block_size=32)) != v


def _version_in_subprocess(tokens: list[int]) -> str:
    code = (
        "import sys, json; from qroute.core.placement import corpus_version, CorpusLayout;"
        "print(corpus_version(json.load(sys.stdin), CorpusLayout()))"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], input=str(tokens), capture_output=True, text=True,
                         env=env, check=True, cwd=Path(__file__).parents[2])
    return out.stdout.strip()


def test_placement_is_deterministic_across_processes() -> None:
    code = ("from qroute.core.placement import place_chunk; "
            "print([place_chunk('p', c, ['a','b','c'])[0] for c in range(50)])")
    env = dict(os.environ, PYTHONHASHSEED="7")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == str([place_chunk("p", c, ["a", "b", "c"])[0] for c in range(50)])


def test_core_imports_without_torch_or_engines() -> None:
    code = (
        "import sys; sys.modules.update(torch=None, vllm=None, sglang=None);"
        "import qroute.core.corpus, qroute.core.wire;"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
