"""An offline byte-level BPE tokenizer for the tiny test models.

``build_tokenizer(out_dir)`` trains a BPE with HF ``tokenizers`` on text generated here from a fixed
seed (Python-like source and English; nothing is downloaded or read from disk) and writes
``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``, which
``transformers.AutoTokenizer`` (and so vLLM) loads offline.

Special tokens take the first ids, in ``SPECIAL_TOKENS`` order: ``<|bos|>`` 0, ``<|eos|>`` 1,
``<|pad|>`` 2, ``<|user|>`` 3, ``<|assistant|>`` 4, ``<|system|>`` 5, ``<|sep|>`` 6 (the corpus file
separator). No token is added automatically on encode: ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from qroute.errors import ConfigError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM, SEP = "<|user|>", "<|assistant|>", "<|system|>", "<|sep|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, SEP)

MIN_VOCAB_SIZE = 512
MAX_VOCAB_SIZE = 8192
MODEL_MAX_LENGTH = 8192

# Unknown roles fail loudly rather than being rendered as some other role.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>"
    "{% elif message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = """
the of and to in is it that for on was with as by at be this from or are an not have has had
but which one all were they we you there their been when who will more can if no out so said
what up its about into than them only other new some could time these two may then do first any
my now such like our over man me even most made after also did many before must through back years
where much your way well down should because each just those people how too little state good very
make world still own see men work long get here between both life being under never day same another
know while last might us great old year off come since against go came right used take three
small large number value result error file path line name data list index count total size buffer
block token layer cache query key score weight table record field string bytes table model server
client request response stream batch shard route owner peer node message header payload offset length
start stop begin end open close read write send receive load store fetch update delete insert select
create build parse format check test assert raise return yield import class def lambda global pass
self none true false print range len dict set tuple int float str bool object type super property
config option param args kwargs result status state event handle queue lock thread process task job
worker manager context session module package source target input output prefix suffix text word
sentence paragraph chapter story river mountain forest garden window kitchen morning evening summer
winter village city country market school teacher student doctor family friend mother father child
water light music paper money letter question answer reason moment history science nature animal
quickly slowly carefully happily simply nearly always often sometimes rarely together alone again
""".split()

_ENGLISH_ENDINGS = [". ", ". ", ", ", "? ", "! ", "; ", ".\n", ".\n\n"]
_OPS = [" + ", " - ", " * ", " // ", " % ", " == ", " != ", " < ", " >= ", " and ", " or "]


def _pick(rng: random.Random, items: list[str]) -> str:
    # rng.random() alone keeps the text identical across Python versions.
    return items[int(rng.random() * len(items))]


def _ident(rng: random.Random) -> str:
    parts = [_pick(rng, _WORDS) for _ in range(1 + int(rng.random() * 3))]
    return "_".join(parts)


def _camel(rng: random.Random) -> str:
    return "".join(_pick(rng, _WORDS).capitalize() for _ in range(1 + int(rng.random() * 2)))


def _sentence(rng: random.Random) -> str:
    words = [_pick(rng, _WORDS) for _ in range(4 + int(rng.random() * 12))]
    words[0] = words[0].capitalize()
    return " ".join(words) + _pick(rng, _ENGLISH_ENDINGS)


def _number(rng: random.Random) -> str:
    return str(int(rng.random() * 10 ** (1 + int(rng.random() * 5))))


def _expr(rng: random.Random) -> str:
    atoms = [_ident(rng), _number(rng), f"{_ident(rng)}[{_number(rng)}]", f"len({_ident(rng)})"]
    return _pick(rng, atoms) + _pick(rng, _OPS) + _pick(rng, atoms)


def _python_snippet(rng: random.Random) -> str:
    name, arg, var = _ident(rng), _ident(rng), _ident(rng)
    lines = [
        f"import {_pick(rng, _WORDS)}",
        "",
        f"class {_camel(rng)}({_camel(rng)}):",
        f'    """{_sentence(rng).strip()}"""',
        "",
        f"    def {name}(self, {arg}: int = {_number(rng)}) -> str:",
        f"        # {_sentence(rng).strip()}",
        f"        {var} = {_expr(rng)}",
        f"        for {_ident(rng)} in range({_number(rng)}):",
        f"            if {_expr(rng)}:",
        f'                raise ValueError(f"{_pick(rng, _WORDS)} {{{arg}!r}}")',
        f"            {var} += {_expr(rng)}",
        f'        return self.{_ident(rng)}("{_pick(rng, _WORDS)}", {var})',
        "",
    ]
    return "\n".join(lines) + "\n"


def training_text(num_chunks: int = 4000, seed: int = 1234) -> list[str]:
    """The built-in training text: ``num_chunks`` alternating Python-like and English chunks."""
    rng = random.Random(seed)
    chunks = []
    for i in range(num_chunks):
        if i % 2 == 0:
            chunks.append(_python_snippet(rng))
        else:
            chunks.append("".join(_sentence(rng) for _ in range(6)))
    return chunks


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size={vocab_size!r} is not supported; use an int in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]"
        )


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    # Imported here so that importing qroute does not need `tokenizers`.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ConfigError(
            f"vocab_size={vocab_size} is larger than the built-in training text supports "
            f"({tok.get_vocab_size()} tokens); use a smaller vocab_size"
        )
    return tok.to_str(pretty=True)


def _tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "added_tokens_decoder": added,
        "additional_special_tokens": [USER, ASSISTANT, SYSTEM, SEP],
        "chat_template": CHAT_TEMPLATE,
    }


def _special_tokens_map() -> dict:
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [USER, ASSISTANT, SYSTEM, SEP],
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tokenizer(out_dir: Path, vocab_size: int = 4096) -> None:
    """Train the tokenizer (deterministically) and write its three files into ``out_dir``.

    Raises ``ConfigError`` when ``vocab_size`` is outside [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE] or
    larger than the built-in training text supports.
    """
    _check_vocab_size(vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(vocab_size), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
