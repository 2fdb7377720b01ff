"""qroute's CUDA backend (``qroute.plugin.vllm_cuda_backend``) on CPU: its own part is vLLM's Triton MLA decode
kernel run under Triton's interpreter over qroute's row extents, against the float64 dense causal reference of the
CPU backend's tests (a prefill, a decode and an extend of 17 rows in one step). Run by ``test_kernels.py`` in a
process started with ``TRITON_INTERPRET=1``.

vLLM's CPU build hands out a placeholder for Triton ("doesn't include CPU backend"); pointing
``vllm.triton_utils`` at the real Triton before vLLM's kernel module is imported makes that kernel run under the
interpreter (shared/notes/triton-cpu.md). float32 and float16 only: the interpreter does arithmetic on bf16 bit
patterns unless a kernel upcasts its tiles, which vLLM's does not (a GPU run checks bf16: scripts/gpu_check.py).
Tolerances: float32 1e-5 against float64 (summation order); float16 2e-3 (the kernel keeps float16 tiles and
rounds the softmax weights to it, about 1e-3 relative at these magnitudes)."""

from __future__ import annotations

import triton
import triton.language as tl
import vllm.triton_utils as triton_utils

triton_utils.HAS_TRITON, triton_utils.triton, triton_utils.tl = True, triton, tl

import pytest  # noqa: E402
import torch  # noqa: E402

from qroute.plugin import vllm_cuda_backend as cuda_backend  # noqa: E402
from qroute.plugin import vllm_mla_common  # noqa: E402
from tests.plugin.test_backend_forward import BLOCK, REQUESTS, SCALE, _batch, _dense  # noqa: E402


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("splits", [1, 4])
def test_own_part_is_dense_causal_attention(dtype, atol, splits):
    cache, meta, q_nope, q_pe = _batch(vllm_mla_common, dtype)
    extents = cuda_backend.row_extents(meta.decode)
    out, lse = cuda_backend.own_part(q_nope, q_pe, cache, extents, SCALE, splits)
    want_out, want_lse = _dense(cache, meta, q_nope, q_pe)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse, atol=atol, rtol=0)
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=0)


def test_chunked_launches_equal_one(monkeypatch):
    """Rows in launches of at most SCRATCH_BYTES of split-KV scratch: here 3 rows a launch, 8 launches."""
    cache, meta, q_nope, q_pe = _batch(vllm_mla_common, torch.float32, seed=3)
    extents = cuda_backend.row_extents(meta.decode)
    whole = cuda_backend.own_part(q_nope, q_pe, cache, extents, SCALE, 2)
    heads, rank = q_nope.shape[1], q_nope.shape[2]
    monkeypatch.setattr(cuda_backend, "SCRATCH_BYTES", 3 * heads * 2 * (rank + 1) * 4)
    chunked = cuda_backend.own_part(q_nope, q_pe, cache, extents, SCALE, 2)
    torch.testing.assert_close(chunked[0], whole[0], atol=0, rtol=0)
    torch.testing.assert_close(chunked[1], whole[1], atol=0, rtol=0)


def test_a_wrong_extent_is_caught():
    """Negative control: one row that sees one own token too many is far off the reference."""
    cache, meta, q_nope, q_pe = _batch(vllm_mla_common, torch.float32)
    extents = cuda_backend.row_extents(meta.decode)
    seq_lens = extents.seq_lens.clone()
    seq_lens[6] += 1  # the extend's first row now sees the token after its own
    out, _ = cuda_backend.own_part(q_nope, q_pe, cache, cuda_backend.RowExtents(extents.block_table, seq_lens),
                                   SCALE, 1)  # fmt: skip
    want_out, _ = _dense(cache, meta, q_nope, q_pe)
    assert (out[6].double() - want_out[6]).abs().max() > 1e-2
    torch.testing.assert_close(out[7:].double(), want_out[7:], atol=1e-5, rtol=0)
    assert BLOCK == cache.shape[1] and len(REQUESTS) == meta.num_reqs
