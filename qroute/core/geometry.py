"""MLA model geometry read from a Hugging Face ``config.json``.

Everything the cost model and the wire format need to know about a model: the latent width that
owners store per token and layer, the bytes of one absorbed query row and one returned row per
head, and the number of layers and heads. Engine-free and torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qroute.errors import GeometryError

# Bytes per element of the dtypes a latent cache or a query row can have.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# KV cache dtypes: plain dtypes, plus DeepSeek's FP8 MLA layout (FlashMLA's 656-byte row:
# 512 fp8 NoPE values + one fp32 scale per 128 of them + the RoPE part kept in bf16).
CACHE_DTYPES = (*DTYPE_BYTES, "fp8_ds_mla")
LSE_BYTES = 4  # the returned log-sum-exp is fp32 per head
# Owners return the partial output in float32 whatever the model dtype (``OwnerService``): the merge of partials
# is exact only if no part is rounded to the model dtype before it.
RETURN_ELEMENT_BYTES = 4
# Geometries of well-known models shipped with the repository (config values only).
MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass(frozen=True)
class MLAGeometry:
    """Shape facts of an MLA model, per layer unless a name says otherwise."""

    model_type: str
    num_layers: int
    num_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    dtype: str = "bfloat16"  # activations: query rows travel in this dtype (returned rows in float32)
    cache_dtype: str = "bfloat16"  # how owners store the latent KV
    index_topk: int | None = None  # DSA models select this many tokens per query

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise GeometryError(f"dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise GeometryError(f"cache_dtype {self.cache_dtype!r} is not supported; use one of {CACHE_DTYPES}")
        for name in ("num_layers", "num_heads", "kv_lora_rank", "qk_rope_head_dim"):
            if getattr(self, name) <= 0:
                raise GeometryError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cache_dtype == "fp8_ds_mla" and self.kv_lora_rank % 128:
            raise GeometryError(f"fp8_ds_mla needs kv_lora_rank divisible by 128, got {self.kv_lora_rank}")

    @property
    def latent_width(self) -> int:
        """Elements of one latent cache row: the compressed KV plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def latent_bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer's latent cache (what a fetch moves)."""
        if self.cache_dtype == "fp8_ds_mla":
            num_scales = self.kv_lora_rank // 128
            return self.kv_lora_rank + num_scales * 4 + self.qk_rope_head_dim * 2
        return self.latent_width * DTYPE_BYTES[self.cache_dtype]

    @property
    def query_row_bytes(self) -> int:
        """Bytes of one head's absorbed query (latent part plus RoPE part): what a route sends."""
        return self.latent_width * DTYPE_BYTES[self.dtype]

    @property
    def return_row_bytes(self) -> int:
        """Bytes of one head's partial result: the float32 latent output plus its fp32 LSE."""
        return self.kv_lora_rank * RETURN_ELEMENT_BYTES + LSE_BYTES

    @property
    def latent_bytes_per_token_all_layers(self) -> int:
        return self.latent_bytes_per_token * self.num_layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "v_head_dim": self.v_head_dim,
            "dtype": self.dtype,
            "cache_dtype": self.cache_dtype,
            "index_topk": self.index_topk,
            "latent_bytes_per_token": self.latent_bytes_per_token,
            "query_row_bytes": self.query_row_bytes,
            "return_row_bytes": self.return_row_bytes,
        }


def load_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Read an HF config from a dict, a ``config.json`` path, or a model directory."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise GeometryError(f"no model config at {path}: pass a config.json or a model directory")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GeometryError(f"cannot read model config {path}: {exc}") from exc


def geometry_from_config(
    source: str | Path | dict[str, Any], *, cache_dtype: str | None = None, dtype: str | None = None
) -> MLAGeometry:
    """Build the geometry of an MLA model from its HF config.

    ``cache_dtype`` defaults to the FP8 MLA layout for models with a DSA indexer (DeepSeek-V3.2,
    GLM-5.x serve their sparse cache that way) and to the model dtype otherwise.
    """
    config = load_config(source)
    # Multimodal wrappers nest the language model's config.
    config = config.get("text_config", config)
    if "kv_lora_rank" not in config or config.get("kv_lora_rank") is None:
        model_type = config.get("model_type", "unknown")
        raise GeometryError(
            f"model_type {model_type!r} has no kv_lora_rank: qroute serves Multi-head Latent Attention "
            "models (DeepSeek-V2/V3/V3.2, GLM-5.x, Kimi-K2) only"
        )
    model_dtype = dtype or _config_dtype(config)
    index_topk = config.get("index_topk")
    if cache_dtype is None:
        cache_dtype = "fp8_ds_mla" if index_topk else model_dtype
    try:
        return MLAGeometry(
            model_type=str(config.get("model_type", "unknown")),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            kv_lora_rank=int(config["kv_lora_rank"]),
            qk_rope_head_dim=int(config["qk_rope_head_dim"]),
            qk_nope_head_dim=int(config.get("qk_nope_head_dim", 0)),
            v_head_dim=int(config.get("v_head_dim", 0)),
            dtype=model_dtype,
            cache_dtype=cache_dtype,
            index_topk=int(index_topk) if index_topk else None,
        )
    except KeyError as exc:
        raise GeometryError(f"model config lacks {exc.args[0]!r}, which MLA geometry needs") from exc


def _config_dtype(config: dict[str, Any]) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    name = str(name).removeprefix("torch.")
    # Checkpoints stored in fp8 still run activations in bf16.
    return name if name in DTYPE_BYTES else "bfloat16"


def model_fingerprint(model_dir: str | Path) -> str:
    """A short stable id of a model: config, tokenizer and weights.

    Hashing every weight byte of a large model would take minutes, so for each safetensors file
    we hash its name, size, header (names, shapes, dtypes) and its first and last MiB.
    """
    root = Path(model_dir)
    config = load_config(root)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = root / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    for path in sorted(root.glob("*.safetensors")):
        digest.update(_weights_summary(path))
    return digest.hexdigest()


def _weights_summary(path: Path) -> bytes:
    mib = 1 << 20
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = f.read(min(header_len, size))
        f.seek(0)
        head = f.read(mib)
        f.seek(max(0, size - mib))
        tail = f.read(mib)
    return b"|".join([path.name.encode(), str(size).encode(), header, head, tail])
