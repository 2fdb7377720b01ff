import json

import pytest

from qroute.core.geometry import MODELS_DIR, geometry_from_config, model_fingerprint
from qroute.errors import GeometryError


@pytest.mark.parametrize(
    "name, layers, heads, latent_bytes",
    [("deepseek-v3", 61, 128, 1152), ("deepseek-v3.2", 61, 128, 656), ("glm-5.1", 78, 64, 656)],
)
def test_shipped_geometries(name, layers, heads, latent_bytes):
    g = geometry_from_config(MODELS_DIR / f"{name}.json")
    assert (g.num_layers, g.num_heads, g.latent_bytes_per_token) == (layers, heads, latent_bytes)
    assert g.latent_width == 576
    assert g.query_row_bytes == 1152  # 576 bf16 values per head
    assert g.return_row_bytes == 2052  # 512 float32 values (owners reply in float32) plus an fp32 LSE


def test_cache_dtype_override_and_float32():
    g = geometry_from_config(MODELS_DIR / "deepseek-v3.2.json", cache_dtype="bfloat16")
    assert g.latent_bytes_per_token == 1152
    g32 = geometry_from_config(MODELS_DIR / "deepseek-v3.json", dtype="float32", cache_dtype="float32")
    assert (g32.latent_bytes_per_token, g32.query_row_bytes, g32.return_row_bytes) == (2304, 2304, 2052)


def test_non_mla_config_is_refused(tmp_path):
    llama = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    with pytest.raises(GeometryError, match="Multi-head Latent Attention"):
        geometry_from_config(llama)
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(GeometryError, match="llama"):
        geometry_from_config(tmp_path)


def test_missing_and_broken_config(tmp_path):
    with pytest.raises(GeometryError, match="no model config"):
        geometry_from_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GeometryError, match="cannot read"):
        geometry_from_config(tmp_path)
    with pytest.raises(GeometryError, match="num_hidden_layers"):
        geometry_from_config({"kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_attention_heads": 4})


def test_fingerprint_tracks_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "kv_lora_rank": 512}))
    weights = tmp_path / "model.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    first = model_fingerprint(tmp_path)
    assert first == model_fingerprint(tmp_path)
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\x01" * 8)
    second = model_fingerprint(tmp_path)
    assert second != first
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "kv_lora_rank": 256}))
    assert model_fingerprint(tmp_path) not in (first, second)
