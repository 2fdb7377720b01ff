"""qroute's CUDA attention backend (``qroute.plugin.vllm_cuda_backend``): its host logic and wiring, on CPU.

No GPU is available to this project: where a test needs vLLM to believe it runs on CUDA, the platform's
``is_cpu`` / ``is_cuda`` answers are swapped on the live platform object (the one fake here; the condition cannot
be caused otherwise on this machine). The own part's numerics (vLLM's Triton MLA kernel over qroute's row
extents) are checked under Triton's interpreter: tests/kernels/interpreted_vllm_cuda.py."""

from __future__ import annotations

import logging

import pytest
import torch

from qroute.errors import ConfigError
from tests.plugin.test_backend_forward import REQUESTS, _batch
from tests.plugin.test_plugin_registration import _config


@pytest.fixture(scope="module")
def plugin(vllm):
    from qroute.plugin import vllm as plugin_module

    plugin_module.register()
    return plugin_module


@pytest.fixture(scope="module")
def cuda_backend(plugin):
    from qroute.plugin import vllm_cuda_backend

    return vllm_cuda_backend


@pytest.fixture
def on_cuda(monkeypatch):
    """vLLM's platform answers as CUDA's would; the CUSTOM slot is restored afterwards."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends import registry

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    return current_platform


def test_every_row_becomes_one_decode_row_with_its_causal_extent(cuda_backend):
    from qroute.plugin import vllm_mla_common

    _, meta, _, _ = _batch(vllm_mla_common, torch.float32)
    extents = cuda_backend.row_extents(meta.decode)
    want = [seq_len - qlen + j + 1 for seq_len, qlen in REQUESTS for j in range(qlen)]
    assert extents.seq_lens.tolist() == want  # prefill 1..5, decode 40, extend 17..33
    owners = [r for r, (_, qlen) in enumerate(REQUESTS) for _ in range(qlen)]
    assert torch.equal(extents.block_table, meta.decode.block_table[owners])
    assert extents.seq_lens.dtype == meta.decode.seq_lens.dtype
    assert cuda_backend.row_extents(meta.decode) is extents  # planned on the first layer, reused by the others


def test_the_backend_is_triton_mla_with_every_row_absorbed_and_no_cuda_graph(cuda_backend):
    from vllm.model_executor.layers.attention.mla_attention import QueryLenSupport
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.mla.triton_mla import TritonMLAImpl, TritonMLAMetadataBuilder

    backend, builder = cuda_backend.QRouteMLABackend, cuda_backend.QRouteTritonMLAMetadataBuilder
    assert backend.get_name() == "CUSTOM"
    assert builder._cudagraph_support is AttentionCGSupport.NEVER
    assert builder.query_len_support is QueryLenSupport.VARLEN and builder.reorder_batch_threshold == 1 << 30
    assert not any(d.startswith("fp8") for d in backend.supported_kv_cache_dtypes)
    # not configured: vLLM's Triton MLA, unchanged
    assert backend.get_impl_cls() is TritonMLAImpl and backend.get_builder_cls() is TritonMLAMetadataBuilder


def test_register_puts_the_backend_in_the_custom_slot_on_cuda(plugin, on_cuda):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    plugin._register_backend(on_cuda)
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.CUDA_BACKEND_PATH
    assert AttentionBackendEnum.CUSTOM.get_class().__name__ == "QRouteMLABackend"
    register_backend(AttentionBackendEnum.CUSTOM, "other.plugin.Backend")
    with pytest.raises(ConfigError, match="CUSTOM attention backend slot already holds 'other.plugin.Backend'"):
        plugin._register_backend(on_cuda)


def test_a_configured_cuda_instance_needs_attention_backend_custom(plugin, cuda_backend, on_cuda, caplog,
                                                                   monkeypatch):  # fmt: skip
    from vllm.config import set_current_vllm_config

    custom, triton_mla = _config(qroute=True, backend="CUSTOM"), _config(qroute=True, backend="TRITON_MLA")
    with pytest.raises(ConfigError, match="CUSTOM backend slot holds None"):
        plugin.ensure_active(custom)  # nothing registered there yet
    plugin._register_backend(on_cuda)
    with pytest.raises(ConfigError, match="pass --attention-backend CUSTOM"):
        plugin.ensure_active(triton_mla)
    monkeypatch.setattr(plugin, "_active_logged", False)
    caplog.set_level(logging.INFO, logger="vllm.qroute")
    with set_current_vllm_config(custom):
        assert cuda_backend.QRouteMLABackend.get_impl_cls() is cuda_backend.QRouteTritonMLAImpl
        assert cuda_backend.QRouteMLABackend.get_builder_cls() is cuda_backend.QRouteTritonMLAMetadataBuilder
    active = [r.getMessage() for r in caplog.records if r.getMessage().startswith("qroute active:")]
    assert len(active) == 1 and "QRouteMLABackend (CUSTOM slot" in active[0], active
