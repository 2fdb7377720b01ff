"""qroute's SGLang plugin against the real ``sglang`` 0.5.23 package, in the SGLang venv (``.sgl-venv``): run by
``test_sglang_plugin.py`` in a pytest process of that venv (SGLang pins another torch than vLLM's CPU build, so the
two cannot share a process); not collected on its own.

- the wiring after SGLang's own ``load_plugins()``: the CLI choice, the backend registry, the DeepSeek absorb list
  and handler, the start-up hook; ``prepare_server_args`` parses ``--attention-backend qroute``;
- the start-up check's refusals;
- the backend's numerics on a real ``MLATokenToKVPool`` / ``ReqToTokenPool`` against SGLang's torch-native backend
  (the stock path qroute wraps): a step of two extends over cached prefixes and a fresh prefill, then a decode
  step, float32, both input conventions (split absorbed and 576-wide). Tolerance 1e-5: both compute in float32,
  differing only in summation order; a negative control (one wrong slot) must exceed it."""

from __future__ import annotations

import itertools
import json
import types

import pytest
import torch

H, R, P, SCALE = 4, 512, 64, 0.0884


@pytest.fixture(scope="module")
def loaded():
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from qroute.plugin import sglang as plugin

    assert plugin._registered and plugin._failures == {}, plugin._failures
    return plugin


def test_the_plugin_is_wired_into_sglang(loaded, tmp_path):
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.model_executor.model_runner_components import attention_backend_setup
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod
    from sglang.srt.models.deepseek_common.utils import FORWARD_ABSORB_CORE_ATTENTION_BACKENDS
    from sglang.srt.server_args import prepare_server_args

    assert "qroute" in ATTENTION_BACKEND_CHOICES and "qroute" in ATTENTION_BACKENDS
    assert "qroute" in FORWARD_ABSORB_CORE_ATTENTION_BACKENDS
    prefill = types.SimpleNamespace(forward_mode=types.SimpleNamespace(is_extend=lambda: True))
    assert AttentionBackendRegistry.get_handler("qroute")(None, prefill) is AttnForwardMethod.MLA
    assert AttentionBackendRegistry.get_handler("torch_native")(None, prefill) is AttnForwardMethod.MLA
    assert hasattr(attention_backend_setup.build_attention_backends, "__wrapped__")  # the start-up check
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "model_type":
                                                   "deepseek_v3"}))  # fmt: skip
    for flag in ("--attention-backend", "--decode-attention-backend"):
        args = prepare_server_args(["--model-path", str(model), flag, "qroute", "--device", "cpu"])
        assert getattr(args, flag.removeprefix("--").replace("-", "_")) == "qroute"


def test_the_start_up_check_refuses_what_cannot_run(loaded, monkeypatch, tmp_path):
    from qroute.errors import ConfigError

    monkeypatch.delenv(loaded.CONFIG_ENV, raising=False)
    loaded.ensure_active("torch_native", "torch_native")  # stock: nothing to check
    loaded.ensure_active("qroute", "qroute")  # qroute's backend without a corpus: exact single-instance attention
    config = tmp_path / "qroute.json"
    config.write_text(json.dumps({"corpus": {"name": "code", "path": str(tmp_path)}, "instance_id": "i0",
                                  "instances": {"i0": "127.0.0.1:9000"}}))
    monkeypatch.setenv(loaded.CONFIG_ENV, str(config))
    with pytest.raises(ConfigError, match="backends are 'torch_native' .prefill. and 'torch_native' .decode.: pass "
                                          "--attention-backend qroute"):  # fmt: skip
        loaded.ensure_active("torch_native", "torch_native")
    with pytest.raises(ConfigError, match="'qroute' .prefill. and 'torch_native' .decode."):  # stock decode: no corpus
        loaded.ensure_active("torch_native", "qroute")
    loaded.ensure_active("qroute", "qroute")  # the backend for every forward: a corpus can be served
    args = types.SimpleNamespace(disable_radix_cache=False, tp_size=1, dp_size=1)
    with pytest.raises(ConfigError, match="--disable-radix-cache"):
        loaded.ensure_active("qroute", "qroute", args)
    args.disable_radix_cache, args.tp_size = True, 2
    with pytest.raises(ConfigError, match="--tp-size 1"):
        loaded.ensure_active("qroute", "qroute", args)
    args.tp_size = 1
    loaded.ensure_active("qroute", "qroute", args)
    config.write_text(json.dumps({"corpus": {"name": "code", "path": str(tmp_path)}, "instance_id": "i0",
                                  "instances": {"i0": "127.0.0.1:9000"}, "etcd": {"endpoint": "http://127.0.0.1:1"}}))
    with pytest.raises(ConfigError, match="no etcd membership"):
        loaded.ensure_active("qroute", "qroute", args)
    config.write_text(json.dumps({"instance_id": "i0"}))  # the connector's own validation speaks
    with pytest.raises(ConfigError, match="'instances'.* is required"):
        loaded.ensure_active("qroute", "qroute")
    config.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read a JSON config"):
        loaded.ensure_active("qroute", "qroute")
    monkeypatch.delenv(loaded.CONFIG_ENV)
    monkeypatch.setitem(loaded._failures, "backend", "ImportError: moved")
    with pytest.raises(ConfigError, match="failed to install.*moved"):
        loaded.ensure_active("qroute", "qroute")


# (cached prefix, new tokens) per request of the extend step; then every request decodes one token
REQUESTS = [(10, 6), (0, 5), (20, 1)]


def _world():
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool, ReqToTokenPool

    pool = MLATokenToKVPool(size=512, page_size=1, dtype=torch.float32, kv_lora_rank=R, qk_rope_head_dim=P,
                            layer_num=1, device="cpu", enable_memory_saver=False)  # fmt: skip
    req_to_token = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    runner = types.SimpleNamespace(device="cpu", req_to_token_pool=req_to_token, token_to_kv_pool=pool)
    layer = RadixAttention(H, R + P, SCALE, num_kv_heads=1, layer_id=0, v_head_dim=R)
    return runner, layer


def _step(runner, forward_mode, lens, seed):
    """Place each request's tokens in scattered pool slots, write the cached prefixes, and return the step's
    inputs: new rows' queries and latent rows, and the forward batch."""
    g = torch.Generator().manual_seed(seed)
    table = runner.req_to_token_pool.req_to_token
    free = torch.randperm(500, generator=g) + 1  # disjoint scattered slots for every request (0 is the pad)
    new_locs, extend_lens, prefix_lens, seq_lens = [], [], [], []
    for req, (cached, new) in enumerate(lens):
        seq_len = cached + new
        if forward_mode.is_extend():  # and a slot for the request's next (decoded) token
            table[req, :seq_len + 1] = free[40 * req:40 * req + seq_len + 1].to(table.dtype)
        new_locs.append(table[req, cached:seq_len].long())
        extend_lens.append(new)
        prefix_lens.append(cached)
        seq_lens.append(seq_len)
    out_cache_loc = torch.cat(new_locs)
    num = out_cache_loc.shape[0]
    batch = types.SimpleNamespace(
        forward_mode=forward_mode, out_cache_loc=out_cache_loc, req_pool_indices=torch.arange(len(lens)),
        seq_lens=torch.tensor(seq_lens), extend_prefix_lens=torch.tensor(prefix_lens),
        extend_seq_lens=torch.tensor(extend_lens), encoder_lens=None,
    )  # fmt: skip
    q = torch.randn(num, H, R + P, generator=g)
    k = torch.randn(num, 1, R + P, generator=g)
    return batch, q, k


def _fill_prefixes(runner, layer, lens, seed):
    cache = runner.token_to_kv_pool.get_key_buffer(layer.layer_id)
    g = torch.Generator().manual_seed(seed)
    table = runner.req_to_token_pool.req_to_token
    for req, (cached, _) in enumerate(lens):
        cache[table[req, :cached].long()] = torch.randn(cached, 1, R + P, generator=g)


@pytest.mark.parametrize("split", [False, True])
def test_the_backend_equals_torch_native_attention(loaded, split):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.runtime_context import get_parallel

    from qroute.plugin.sglang_backend import QRouteSGLangBackend

    runner, layer = _world()
    stock, qroute = TorchNativeAttnBackend(runner), QRouteSGLangBackend(runner)
    with get_parallel().override(dcp_enabled=False, attn_dcp_size=1):
        for mode, lens, seed in ((ForwardMode.EXTEND, REQUESTS, 1),
                                 (ForwardMode.DECODE, [(c + n, 1) for c, n in REQUESTS], 2)):  # fmt: skip
            batch, q, k = _step(runner, mode, lens, seed)
            if mode.is_extend():
                _fill_prefixes(runner, layer, lens, seed + 10)
            assert (batch.out_cache_loc > 0).all() and batch.out_cache_loc.unique().numel() == q.shape[0]
            for backend in (stock, qroute):
                backend.init_forward_metadata(batch)
            run = stock.forward_extend if mode.is_extend() else stock.forward_decode
            want = run(q, k, k[..., :R], layer, batch)
            mine = qroute.forward_extend if mode.is_extend() else qroute.forward_decode
            if split:
                got = mine(q[..., :R].reshape(-1, H * R), k[..., :R], k[..., :R], layer, batch,
                           q_rope=q[..., R:].reshape(-1, H * P), k_rope=k[..., R:])  # fmt: skip
            else:
                got = mine(q, k, k[..., :R], layer, batch)
            assert got.shape == want.shape == (q.shape[0], H * R)
            planned = qroute._own_rows(batch)
            assert planned is qroute._own_rows(batch)  # planned once per forward, for every layer
            bounds = [0, *itertools.accumulate(n for _, n in lens)]
            assert [(rows.start, rows.stop) for rows in planned] == list(zip(bounds[:-1], bounds[1:], strict=True))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # negative control: one wrong own slot moves a row far beyond the tolerance
        table = runner.req_to_token_pool.req_to_token
        table[0, 0] = table[1, 0]
        qroute.init_forward_metadata(batch)  # the own rows are planned per forward, from the page table
        got = qroute.forward_decode(q, k, k[..., :R], layer, batch, save_kv_cache=False)
        assert (got[0] - want[0]).abs().max() > 1e-3
