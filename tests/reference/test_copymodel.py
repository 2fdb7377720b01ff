"""The copying model (qroute.reference.copymodel): it continues a text from its context, at any position the
model's rope covers, and cannot without that context; its build is deterministic."""

import pytest

torch = pytest.importorskip("torch")

from qroute.errors import ConfigError  # noqa: E402
from qroute.reference.copymodel import ROPE_PAIRS, rope_profile  # noqa: E402
from qroute.reference.prepared import prefix_attend  # noqa: E402
from qroute.reference.refmodel import RefMLAModel  # noqa: E402
from qroute.reference.tinymodel import build_tiny_model, copy_model_dir, model_config  # noqa: E402

CONTEXT_TOKENS = 2048
PROMPT, ANSWER = 6, 8


@pytest.fixture(scope="module")
def model() -> RefMLAModel:
    return RefMLAModel.from_dir(copy_model_dir())


def _greedy(model: RefMLAModel, prompt: list[int], steps: int, attend, first_position: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        positions = torch.arange(len(tokens)) + first_position
        tokens.append(int(model.forward(torch.tensor(tokens), positions, attend)[-1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("first_position", [0, 150_000], ids=["start", "near-163840"])
def test_continues_text_from_its_context_and_not_without(model, first_position):
    gen = torch.Generator().manual_seed(7)
    context = torch.randint(3, model.config["vocab_size"], (CONTEXT_TOKENS,), generator=gen)
    positions = torch.arange(CONTEXT_TOKENS) + first_position
    _, rows = model.forward_collect(context, positions)
    with_context = prefix_attend(model, rows)
    after = first_position + CONTEXT_TOKENS
    copied = 0
    for start in (5, 900, CONTEXT_TOKENS - PROMPT - ANSWER):  # near the start, the middle and the end
        prompt = context[start:start + PROMPT].tolist()
        wanted = context[start + PROMPT:start + PROMPT + ANSWER].tolist()
        assert _greedy(model, prompt, ANSWER, with_context, after) == wanted, start
        alone = _greedy(model, prompt, ANSWER, None, after)
        copied += alone == wanted
    assert copied == 0, "without its context the model must not produce the text"


def test_rope_profile_singles_out_the_wanted_offset():
    config = model_config(dtype="float32", num_layers=2, hidden_size=512, num_heads=4, moe=False, vocab_size=4096)
    from qroute.numerics.rope import rope_inv_freq

    key = rope_profile(config).view(-1, 2)[:, 0] ** 2  # the per-pair weights
    assert key[ROPE_PAIRS:].abs().max() == 0 and torch.isclose(key.sum(), torch.tensor(1.0, dtype=key.dtype))
    offsets = torch.arange(1, config["max_position_embeddings"] + 1, dtype=torch.float64)
    scores = (key[None] * torch.cos(offsets[:, None] * rope_inv_freq(config).double()[None])).sum(-1)
    assert float(1 - scores.max()) >= 0.2  # the docstring's lead over every other offset


def test_build_is_deterministic_and_checks_geometry(tmp_path):
    a = build_tiny_model(tmp_path / "a", hidden_size=512, skill="copy")
    b = build_tiny_model(tmp_path / "b", hidden_size=512, skill="copy")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="hidden_size"):
        build_tiny_model(tmp_path / "c", hidden_size=256, skill="copy")
    with pytest.raises(ConfigError, match="skill"):
        build_tiny_model(tmp_path / "d", skill="poetry")
