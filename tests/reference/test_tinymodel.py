"""Tests for qroute.reference.tinymodel and .tokenizer: determinism, caching, and loading in transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before transformers is imported: it reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

torch = pytest.importorskip("torch")

from qroute.errors import ConfigError  # noqa: E402
from qroute.reference.tinymodel import COMPLETE_MARKER, build_tiny_model, tiny_model_dir  # noqa: E402
from qroute.reference.tokenizer import SPECIAL_TOKENS, build_tokenizer  # noqa: E402

PROMPTS = ["def foo(x):", "The quick brown fox", "Hello world. ", "import numpy as np\n"]
NUM_GREEDY_STEPS = 16
# Well above fp32 noise on logits of this size (~1e-5; vLLM vs transformers differ by <= 3e-5).
MIN_GREEDY_MARGIN = 1e-4


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def hf_model(model_dir: Path):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _assert_clean_load(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info.get(key)}"


def _greedy(model, input_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy decode without a KV cache; returns new token ids and top-1 minus top-2 logit margins."""
    ids = list(input_ids)
    margins = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            top = logits.topk(2)
            margins.append((top.values[0] - top.values[1]).item())
            ids.append(int(top.indices[0]))
    return ids[len(input_ids) :], margins


def test_build_is_deterministic(tmp_path: Path, model_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    assert set(_files(again)) == {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert _files(again) == _files(model_dir)


def test_build_is_deterministic_across_processes(tmp_path: Path, model_dir: Path) -> None:
    # A fresh interpreter has fresh hash seeds (tokenizers is Rust), and another trainer thread count.
    code = (
        "import sys; from pathlib import Path; from qroute.reference.tinymodel import build_tiny_model; "
        "build_tiny_model(Path(sys.argv[1]))"
    )
    env = {**os.environ, "RAYON_NUM_THREADS": "2"}
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert _files(tmp_path) == _files(model_dir)


def test_different_seed_changes_weights_only(tmp_path: Path, model_dir: Path) -> None:
    other = build_tiny_model(tmp_path, seed=1)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    assert (other / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()


def test_cache_hit_does_not_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QROUTE_CACHE", str(tmp_path))
    first = tiny_model_dir(num_layers=1)
    assert first.parent == tmp_path / "models" and first.name.startswith("tiny-")
    assert (first / COMPLETE_MARKER).exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert build_tiny_model(num_layers=1) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    assert tiny_model_dir(num_layers=1, seed=1) != first
    # No temporary build directories are left behind.
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")) == []


def test_incomplete_cache_entry_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QROUTE_CACHE", str(tmp_path))
    path = tiny_model_dir(num_layers=1)
    (path / COMPLETE_MARKER).unlink()
    (path / "model.safetensors").write_bytes(b"truncated")
    assert tiny_model_dir(num_layers=1) == path
    assert (path / COMPLETE_MARKER).exists()
    assert (path / "model.safetensors").stat().st_size > 1000


def test_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (512, 64)
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] == 2
    assert config["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 163840  # DeepSeek-V3's range
    assert config["rope_scaling"]["type"] == "yarn" and config["rope_scaling"]["factor"] == 40.0
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == config["dtype"] == "float32"


def test_loads_in_transformers_with_exact_weights(model_dir: Path, hf_model) -> None:
    from safetensors.torch import load_file

    model, info = hf_model
    _assert_clean_load(info)
    params = dict(model.named_parameters())
    saved = load_file(model_dir / "model.safetensors")
    assert set(saved) == set(params)
    for name, tensor in saved.items():
        assert torch.equal(params[name].detach(), tensor), name
    assert 3_900_000 < sum(t.numel() for t in saved.values()) < 4_100_000
    assert torch.all(saved["model.norm.weight"] == 1)
    assert 0.015 < saved["model.embed_tokens.weight"].std().item() < 0.025


def test_tokenizer_round_trip_and_chat_template(hf_tokenizer) -> None:
    tok = hf_tokenizer
    assert len(tok) == 4096
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "def f(x):\n    return x + 1  # héllo 世界 <|sep|> next file\n"
    ids = tok.encode(text)
    assert ids.count(tok.convert_tokens_to_ids("<|sep|>")) == 1
    assert tok.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|bos|><|system|>Be brief.<|eos|><|user|>Hi there<|eos|><|assistant|>"
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>")


def test_greedy_decoding_has_clear_margins(tmp_path: Path, hf_model, hf_tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    model, _ = hf_model
    # Scaling lm_head scales every logit: same greedy tokens, margins twice as large.
    doubled = transformers.AutoModelForCausalLM.from_pretrained(
        build_tiny_model(tmp_path, logit_scale=40.0), dtype=torch.float32
    ).eval()
    all_margins = []
    for prompt in PROMPTS:
        prompt_ids = hf_tokenizer.encode(prompt)
        tokens, margins = _greedy(model, prompt_ids, NUM_GREEDY_STEPS)
        tokens2, margins2 = _greedy(doubled, prompt_ids, NUM_GREEDY_STEPS)
        assert tokens2 == tokens
        assert margins2 == pytest.approx([2 * m for m in margins], rel=1e-3, abs=1e-4)
        all_margins += margins
    print(f"min greedy margin {min(all_margins):.6f} over {len(all_margins)} steps")
    assert min(all_margins) > MIN_GREEDY_MARGIN
    assert sorted(all_margins)[len(all_margins) // 2] > 0.3


def test_moe_variant_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    path = build_tiny_model(tmp_path, moe=True)
    config = json.loads((path / "config.json").read_text())
    assert config["first_k_dense_replace"] == 1 and config["topk_method"] == "noaux_tc"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    _assert_clean_load(info)
    saved = load_file(path / "model.safetensors")
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in saved
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in saved
    # transformers fuses per-expert tensors on load; check the fused result, not just the names.
    experts = model.model.layers[1].mlp.experts
    if hasattr(experts, "gate_up_proj"):
        gate_up = torch.cat(
            [
                saved["model.layers.1.mlp.experts.3.gate_proj.weight"],
                saved["model.layers.1.mlp.experts.3.up_proj.weight"],
            ]
        )
        assert torch.equal(experts.gate_up_proj[3].detach(), gate_up)
    with torch.no_grad():
        logits = model(torch.tensor([[0, 10, 20, 30]])).logits
    assert torch.isfinite(logits).all()


def test_bfloat16_weights(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = build_tiny_model(tmp_path, dtype="bfloat16", num_layers=2, moe=True)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(path / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes.pop("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
    assert set(dtypes.values()) == {"BF16"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": "float16"},
        {"num_layers": 0},
        {"hidden_size": -1},
        {"num_heads": 2.5},
        {"seed": -1},
        {"vocab_size": 100},
        {"logit_scale": 0.0},
        {"logit_scale": float("nan")},
        {"moe": True, "num_layers": 1},
    ],
)
def test_invalid_arguments_raise_config_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        build_tiny_model(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_tokenizer_rejects_bad_vocab_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tokenizer(tmp_path, vocab_size=100_000)
