"""The Triton kernels against the torch reference (``qroute.numerics.attention``), under Triton's interpreter on
CPU, on the real latent geometry (kv_lora_rank 512, rope 64) at reduced token counts. Run by
``test_kernels.py`` in a process of its own started with ``TRITON_INTERPRET=1`` (the interpreter must be chosen
before Triton is first imported, which the rest of the suite does through vLLM); not collected on its own.

Tolerances: float32 1e-5 (both sides accumulate in float32; the reference differs only in summation order). bf16 and
fp16 inputs: the kernel upcasts each loaded tile under the interpreter and computes in float32, as the reference
does after its own upcast, so the same 1e-5 holds; on a GPU the kernel rounds the softmax weights to the input dtype
before the second product (standard flash attention), which costs about 1e-2 relative: that check waits for a
GPU machine (issue 14). FP8 ``fp8_ds_mla`` rows: the kernel dequantizes each e4m3 value times its tile's
scale in float32, as ``RowFormat.decode`` does, so against attention over the dequantized rows the same 1e-5 holds
(float32 queries; bf16 queries are upcast under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from qroute.numerics.attention import merge, partial_attention
from qroute.numerics.rowformat import FP8_DS_MLA, row_format

R, P = 512, 64
ATOL = 1e-5


def _inputs(t, h, n, s, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_nope = torch.randn(t, h, R, generator=g).to(dtype)
    q_pe = torch.randn(t, h, P, generator=g).to(dtype)
    cache = torch.randn(n, R + P, generator=g).to(dtype)
    slots = torch.randperm(n, generator=g)[:s]  # scattered rows, in no order
    return q_nope, q_pe, cache, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,h,s", [(2, 16, 100), (1, 4, 37), (3, 16, 32)])
def test_partial_attention_matches_the_reference(kernels, dtype, t, h, s):
    q_nope, q_pe, cache, slots = _inputs(t, h, 160, s, dtype)
    out, lse = kernels.partial_attention_triton(q_nope, q_pe, cache, slots, 0.07)
    ref_out, ref_lse = partial_attention(q_nope, q_pe, cache, slots, 0.07, R)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == (t, h, R) and lse.shape == (t, h)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)


def test_128_heads(kernels):
    q_nope, q_pe, cache, slots = _inputs(1, 128, 80, 64, torch.float32, seed=3)
    out, lse = kernels.partial_attention_triton(q_nope, q_pe, cache, slots, 0.05)
    ref_out, ref_lse = partial_attention(q_nope, q_pe, cache, slots, 0.05, R)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)


def test_no_keys_and_no_rows_are_empty_parts(kernels):
    q_nope, q_pe, cache, _ = _inputs(2, 16, 8, 0, torch.float32)
    out, lse = kernels.partial_attention_triton(q_nope, q_pe, cache, torch.empty(0, dtype=torch.int64), 0.1)
    assert torch.equal(out, torch.zeros(2, 16, R)) and torch.isneginf(lse).all()
    out, lse = kernels.partial_attention_triton(q_nope[:0], q_pe[:0], cache, torch.arange(4), 0.1)
    assert out.shape == (0, 16, R) and lse.shape == (0, 16)


def test_stacked_requesters_in_one_launch_equal_each_alone(kernels):
    """The batched owner: three requesters' rows for the same blocks in one launch."""
    q_nope, q_pe, cache, slots = _inputs(6, 16, 120, 90, torch.float32, seed=5)
    together = kernels.partial_attention_triton(q_nope, q_pe, cache, slots, 0.06)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        alone = kernels.partial_attention_triton(q_nope[rows], q_pe[rows], cache, slots, 0.06)
        torch.testing.assert_close(together[0][rows], alone[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(together[1][rows], alone[1], atol=1e-6, rtol=0)


def test_a_wrong_slot_is_caught_by_the_comparison(kernels):
    """Negative control: one wrong row moves the answer far beyond the tolerance."""
    q_nope, q_pe, cache, slots = _inputs(1, 16, 64, 40, torch.float32)
    wrong = slots.clone()
    wrong[0] = (slots[0] + 1) % 64 if (slots[0] + 1) % 64 not in slots else 63 - slots[0]
    out, _ = kernels.partial_attention_triton(q_nope, q_pe, cache, wrong, 0.07)
    ref_out, _ = partial_attention(q_nope, q_pe, cache, slots, 0.07, R)
    assert (out - ref_out).abs().max() > 100 * ATOL


def test_merge_matches_the_reference_with_empty_parts(kernels):
    g = torch.Generator().manual_seed(7)
    parts = [(torch.randn(2, 16, R, generator=g), torch.randn(2, 16, generator=g) * 3) for _ in range(3)]
    parts[1][1][0, :4] = float("-inf")  # a part with no keys for some rows
    parts[1][0][0, :4] = float("nan")  # whose out must not leak
    for _, lse_k in parts:
        lse_k[1, 15] = float("-inf")  # a row no part has keys for
    outs = torch.stack([o for o, _ in parts])
    lses = torch.stack([lse for _, lse in parts])
    out, lse = kernels.merge_triton(outs, lses)
    ref_out, ref_lse = merge(parts)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    assert torch.isneginf(lse[1, 15]) and torch.equal(out[1, 15], torch.zeros(R))


FP8 = row_format(FP8_DS_MLA, R, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,s", [(2, 16, 100), (1, 128, 40)])
def test_fp8_rows_match_attention_over_the_dequantized_rows(kernels, dtype, t, h, s):
    q_nope, q_pe, dense, slots = _inputs(t, h, 160, s, torch.float32, seed=11)
    dense[:, :R] *= torch.linspace(0.05, 4.0, 160)[:, None]  # rows whose tiles have very different scales
    stored = FP8.encode(dense)
    assert stored.dtype == torch.uint8 and stored.shape == (160, 656)
    q_nope, q_pe = q_nope.to(dtype), q_pe.to(dtype)
    out, lse = kernels.partial_attention_triton(q_nope, q_pe, stored, slots, 0.07)
    truth_out, truth_lse = _float64_attention(q_nope, q_pe, FP8.decode(stored)[slots], 0.07)
    ref_out, ref_lse = FP8.attend(q_nope, q_pe, stored, slots, 0.07)  # partial_attention over FP8.decode(rows)
    # Scores reach about 20 and rows 4x the unit scale here, so float32's rounding of the 576-term scores is what
    # both float32 computations miss the float64 truth by, and how much depends on the CPU's summation order: the
    # kernel was seen within 7e-7 of max |out| on one machine, and on an AMD EPYC at 2.7e-6 with the torch float32
    # reference itself at 2.2e-6. So the kernel must be as close to the truth as float32 attention is on this
    # machine (within 2x), or within 2e-6 of max |out|.
    bound = max(2 * (ref_out.double() - truth_out).abs().max().item(), 2e-6 * truth_out.abs().max().item())
    assert (out.double() - truth_out).abs().max() <= bound and (lse.double() - truth_lse).abs().max() <= ATOL
    assert (out - ref_out).abs().max() <= 2 * bound and (lse - ref_lse).abs().max() <= 2 * ATOL


def _float64_attention(q_nope, q_pe, rows, scale):
    q = torch.cat([q_nope, q_pe], dim=-1).double()
    scores = torch.einsum("thd,sd->ths", q, rows.double()) * scale
    return torch.einsum("ths,sd->thd", scores.softmax(dim=-1), rows[:, :R].double()), scores.logsumexp(dim=-1)


def test_fp8_rows_differ_from_the_unquantized_rows(kernels):
    """Negative control: the kernel really attends to the quantized rows (e4m3's 3 mantissa bits), not a copy of the
    dense ones, and a scale read from the wrong tile is caught."""
    q_nope, q_pe, dense, slots = _inputs(1, 16, 64, 48, torch.float32, seed=13)
    stored = FP8.encode(dense)
    out, _ = kernels.partial_attention_triton(q_nope, q_pe, stored, slots, 0.07)
    dense_out, _ = partial_attention(q_nope, q_pe, dense, slots, 0.07, R)
    assert (out - dense_out).abs().max() > 100 * ATOL
    shuffled = stored.clone()
    scales = shuffled[:, R:R + 16].view(torch.float32)
    scales[:, [0, 1]] = scales[:, [1, 0]] * 4
    wrong, _ = kernels.partial_attention_triton(q_nope, q_pe, shuffled, slots, 0.07)
    assert (wrong - out).abs().max() > 100 * ATOL


def test_the_reference_entry_points_dispatch_to_the_kernels(kernels, monkeypatch):
    """``QROUTE_KERNELS=triton`` sends ``partial_attention``, ``RowFormat.attend`` (FP8) and ``merge`` to the kernels
    (what ``auto`` does on CUDA tensors); each call is seen reaching the kernel, and the answers equal the torch
    reference's (``QROUTE_KERNELS=torch``)."""
    calls = []
    for name in ("partial_attention_triton", "merge_triton"):
        real = getattr(kernels, name)
        spy = lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)  # noqa: E731
        monkeypatch.setattr(kernels, name, spy)
    q_nope, q_pe, dense, slots = _inputs(2, 16, 96, 50, torch.float32, seed=17)
    stored = FP8.encode(dense)
    parts = [partial_attention(q_nope, q_pe, dense, slots[:20], 0.07, R),
             partial_attention(q_nope, q_pe, dense, range(60, 90), 0.07, R)]
    answers = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("QROUTE_KERNELS", choice)
        calls.clear()
        answers[choice] = [partial_attention(q_nope, q_pe, dense, slots, 0.07, R),
                           partial_attention(q_nope, q_pe, dense, range(10, 40), 0.07, R),
                           FP8.attend(q_nope, q_pe, stored, slots, 0.07), merge(parts)]
        assert calls == ([] if choice == "torch" else ["partial_attention_triton"] * 3 + ["merge_triton"])
    for (out, lse), (ref_out, ref_lse) in zip(answers["triton"], answers["torch"], strict=True):
        torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=1e-6)
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-6)
    monkeypatch.setenv("QROUTE_KERNELS", "triton")
    calls.clear()
    positions = torch.arange(50)
    partial_attention(q_nope, q_pe, dense, slots, 0.07, R, q_positions=torch.tensor([20, 49]), kv_positions=positions)
    assert calls == []  # causal masks stay on the reference: the kernel has none
