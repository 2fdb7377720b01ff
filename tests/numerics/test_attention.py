"""qroute.numerics.attention: partial absorbed-MLA attention and the exact merge, against a plain dense reference."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qroute.numerics.attention as attention
from qroute.errors import ConfigError
from qroute.numerics.attention import empty_part, lse_from_base2, merge, partial_attention
from qroute.numerics.rope import PositionShift, apply_rope, rope_inv_freq

ROPE = 64
SCALE = 192**-0.5


@pytest.fixture(autouse=True, params=["fused", "op-by-op"])
def kernel_path(request, monkeypatch):
    """Every test runs on both CPU paths: PyTorch's fused attention kernel and the op-by-op one (used for
    masks, other devices, and torch builds without the kernel)."""
    if request.param == "op-by-op":
        monkeypatch.setattr(attention, "_FLASH_CPU", None)
    elif attention._FLASH_CPU is None:
        pytest.skip("this torch build has no fused CPU attention kernel")
    return request.param


def test_fused_and_op_by_op_paths_agree(monkeypatch):
    q_nope, q_pe, cache, slots = make_inputs(3, 16, 200)
    fused = partial_attention(q_nope, q_pe, cache, slots, SCALE)
    monkeypatch.setattr(attention, "_FLASH_CPU", None)
    plain = partial_attention(q_nope, q_pe, cache, slots, SCALE)
    assert fused[0].is_contiguous() and fused[0].shape == plain[0].shape and fused[1].shape == plain[1].shape
    assert_part_close(fused, plain)


def attention_ref(q_nope, q_pe, rows, scale, kv_lora_rank, visible=None):
    """Dense attention over all ``rows [S, R + P]``: softmax over the concatenated scores, float64."""
    q_nope, q_pe, rows = q_nope.double(), q_pe.double(), rows.double()
    latent, k_pe = rows[:, :kv_lora_rank], rows[:, kv_lora_rank:]
    scores = (torch.einsum("thr,sr->ths", q_nope, latent) + torch.einsum("thp,sp->ths", q_pe, k_pe)) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return torch.einsum("ths,sr->thr", probs, latent).float(), lse.float()


def make_inputs(num_tokens, num_heads, num_keys, kv_lora_rank=512, num_slots=None, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    num_slots = num_slots or num_keys + 7
    q_nope = torch.randn(num_tokens, num_heads, kv_lora_rank, generator=gen) * 0.2
    q_pe = torch.randn(num_tokens, num_heads, ROPE, generator=gen)
    cache = torch.randn(num_slots, kv_lora_rank + ROPE, generator=gen)
    slots = torch.randperm(num_slots, generator=gen)[:num_keys]
    return q_nope.to(dtype), q_pe.to(dtype), cache.to(dtype), slots


def assert_part_close(part, ref, atol=1e-5):
    out, lse = part
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref[0], atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref[1], atol=atol, rtol=0)


@pytest.mark.parametrize("num_keys", [1, 13, 130])
@pytest.mark.parametrize("num_heads", [1, 4, 16])
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_random_splits_merge_to_dense(num_tokens, num_heads, num_keys):
    q_nope, q_pe, cache, slots = make_inputs(num_tokens, num_heads, num_keys)
    ref = attention_ref(q_nope, q_pe, cache[slots], SCALE, 512)
    assert_part_close(partial_attention(q_nope, q_pe, cache, slots, SCALE), ref)
    rng = random.Random(num_tokens * 1000 + num_heads * 10 + num_keys)
    for num_parts in range(1, 9):
        owner = torch.tensor([rng.randrange(num_parts) for _ in range(num_keys)])
        parts = [partial_attention(q_nope, q_pe, cache, slots[owner == i], SCALE) for i in range(num_parts)]
        rng.shuffle(parts)
        assert_part_close(merge(parts), ref)


def test_small_latent_width():
    q_nope, q_pe, cache, slots = make_inputs(3, 2, 20, kv_lora_rank=32)
    ref = attention_ref(q_nope, q_pe, cache[slots], 0.3, 32)
    halves = [partial_attention(q_nope, q_pe, cache, s, 0.3, 32) for s in (slots[:7], slots[7:])]
    assert_part_close(merge(halves), ref)


def test_halves_of_one_query_buffer_are_attended_in_place():
    """q_nope and q_pe as the two halves of one [T, H, R + P] buffer (how an owner decodes its routes) are read as
    one query without a concatenation, with the answer of separate tensors; halves of different buffers are
    concatenated."""
    q_nope, q_pe, cache, slots = make_inputs(3, 4, 50)
    joint = torch.cat([q_nope, q_pe], dim=-1)
    halves = joint[..., :512], joint[..., 512:]
    view = attention._joint_query(*halves)
    assert view.data_ptr() == joint.data_ptr() and torch.equal(view, joint)
    assert attention._joint_query(q_nope, q_pe).data_ptr() not in (q_nope.data_ptr(), q_pe.data_ptr())
    other = torch.cat([q_nope, q_pe], dim=-1)  # the same values, but q_pe from another buffer
    assert torch.equal(attention._joint_query(halves[0], other[..., 512:]), joint)
    got, want = partial_attention(*halves, cache, slots, SCALE), partial_attention(q_nope, q_pe, cache, slots, SCALE)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_key_chunking_is_exact(monkeypatch):
    monkeypatch.setattr(attention, "_MAX_SCORE_ELEMS", 40)  # 5 keys per chunk at T*H = 8
    q_nope, q_pe, cache, slots = make_inputs(2, 4, 23)
    assert_part_close(partial_attention(q_nope, q_pe, cache, slots, SCALE), attention_ref(
        q_nope, q_pe, cache[slots], SCALE, 512))  # fmt: skip


def test_fused_key_split_is_exact(monkeypatch):
    """A decode row's few heads cannot keep the fused kernel's threads busy: its keys are split over the threads
    (equal chunks along the batch dimension plus a tail) and the parts merged, exactly."""
    if attention._FLASH_CPU is None:
        pytest.skip("this torch build has no fused CPU attention kernel")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(attention, "_MIN_KEYS_PER_SPLIT", 16)
    calls = []
    flash = attention._FLASH_CPU

    def counted(q, k, v, **kw):
        calls.append(k.shape[:3])
        return flash(q, k, v, **kw)

    monkeypatch.setattr(attention, "_FLASH_CPU", counted)
    q_nope, q_pe, cache, slots = make_inputs(1, 4, 203)
    assert_part_close(partial_attention(q_nope, q_pe, cache, slots, SCALE), attention_ref(
        q_nope, q_pe, cache[slots], SCALE, 512))  # fmt: skip
    assert calls == [(8, 1, 25), (1, 1, 3)]  # 2 chunks per thread of 203 // 8 keys, then the 3 left over
    calls.clear()
    partial_attention(*make_inputs(64, 4, 203)[:3], range(0, 203), SCALE)  # 8 query blocks: no split
    assert calls == [(1, 1, 203)]


def test_empty_parts_are_neutral():
    q_nope, q_pe, cache, slots = make_inputs(3, 4, 10)
    part = partial_attention(q_nope, q_pe, cache, slots, SCALE)
    empty = empty_part(3, 4, 512, "cpu")
    none = partial_attention(q_nope, q_pe, cache, slots[:0], SCALE)
    assert torch.equal(none[0], empty[0]) and torch.equal(none[1], empty[1])
    for merged in (merge([part, empty]), merge([empty, part, none])):
        torch.testing.assert_close(merged[0], part[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(merged[1], part[1], atol=1e-6, rtol=0)
    # A -inf part's out is ignored even when it is garbage (a kernel may leave it unwritten).
    garbage = (torch.full_like(empty[0], float("nan")), empty[1])
    merged = merge([garbage, part])
    torch.testing.assert_close(merged[0], part[0], atol=1e-6, rtol=0)


def test_all_empty_gives_zero_and_minus_inf():
    empty = empty_part(2, 3, 512)
    for out, lse in (merge([empty]), merge([empty, empty, empty])):
        assert torch.equal(out, torch.zeros(2, 3, 512))
        assert torch.isneginf(lse).all() and lse.shape == (2, 3)


def test_paged_equals_flat():
    gen = torch.Generator().manual_seed(1)
    paged = torch.randn(6, 16, 512 + ROPE, generator=gen)  # [num_blocks, block_size, width]
    q_nope, q_pe, _, _ = make_inputs(4, 8, 1)
    blocks, offsets = torch.tensor([5, 0, 0, 3, 5]), torch.tensor([1, 0, 15, 7, 2])
    slots = blocks * 16 + offsets
    out_p, lse_p = partial_attention(q_nope, q_pe, paged, slots, SCALE)
    out_f, lse_f = partial_attention(q_nope, q_pe, paged.reshape(-1, 512 + ROPE), slots, SCALE)
    assert torch.equal(out_p, out_f) and torch.equal(lse_p, lse_f)
    assert_part_close((out_p, lse_p), attention_ref(q_nope, q_pe, paged[blocks, offsets], SCALE, 512))


@pytest.mark.parametrize("num_parts", [1, 3])
def test_causal_positions(num_parts):
    q_nope, q_pe, cache, slots = make_inputs(6, 4, 30)
    kv_positions = torch.randperm(30)
    q_positions = torch.tensor([-1, 0, 3, 15, 29, 40])  # row 0 sees nothing
    visible = kv_positions[None, :] <= q_positions[:, None]
    ref = attention_ref(q_nope, q_pe, cache[slots], SCALE, 512, visible)
    owner = torch.arange(30) % num_parts
    parts = [
        partial_attention(q_nope, q_pe, cache, slots[owner == i], SCALE,
                          q_positions=q_positions, kv_positions=kv_positions[owner == i])
        for i in range(num_parts)
    ]  # fmt: skip
    out, lse = merge(parts)
    assert_part_close((out, lse), ref)
    assert torch.isneginf(lse[0]).all() and torch.equal(out[0], torch.zeros(4, 512))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_float32(dtype):
    q_nope, q_pe, cache, slots = make_inputs(3, 4, 40, dtype=dtype)
    ref = attention_ref(q_nope, q_pe, cache[slots], SCALE, 512)  # same (rounded) inputs, upcast
    parts = [partial_attention(q_nope, q_pe, cache, s, SCALE) for s in (slots[:25], slots[25:])]
    assert_part_close(merge(parts), ref)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("num_corpus", [9, 300])
def test_rotating_relative_query_equals_absolute_positions(num_corpus, interleaved):
    # Corpus keys stored at global positions 0..N-1; own queries numbered from 0 locally.
    gen = torch.Generator().manual_seed(2)
    inv_freq = rope_inv_freq({"rope_theta": 10000, "qk_rope_head_dim": ROPE})
    num_tokens, num_heads = 5, 4
    q_nope = torch.randn(num_tokens, num_heads, 512, generator=gen) * 0.2
    q_raw = torch.randn(num_tokens, num_heads, ROPE, generator=gen) * 2
    latent = torch.randn(num_corpus, 512, generator=gen)
    k_pe = apply_rope(torch.randn(num_corpus, ROPE, generator=gen) * 2, torch.arange(num_corpus), inv_freq,
                      interleaved)  # fmt: skip
    cache = torch.cat([latent, k_pe], dim=-1)
    slots = torch.arange(num_corpus)
    local = torch.arange(num_tokens)
    q_abs = apply_rope(q_raw, local + num_corpus, inv_freq, interleaved)
    ref = attention_ref(q_nope, q_abs, cache, SCALE, 512)
    q_rel = apply_rope(q_raw, local, inv_freq, interleaved)
    for shift in (PositionShift(local, local + num_corpus, inv_freq, interleaved=interleaved, engine_table=False),
                  PositionShift(local, local + num_corpus, inv_freq, interleaved=interleaved)):  # fmt: skip
        assert_part_close(partial_attention(q_nope, shift(q_rel), cache, slots, SCALE), ref)


def test_lse_from_base2():
    scores = torch.randn(3, 4, 50) * 5
    lse = torch.logsumexp(scores, dim=-1)
    lse2 = torch.log2(torch.exp2(scores * math.log2(math.e)).sum(-1))  # FlashInfer's base-2 convention
    torch.testing.assert_close(lse_from_base2(lse2), lse, atol=1e-5, rtol=0)
    minus_inf = lse_from_base2(torch.tensor([float("-inf"), 0.0], dtype=torch.bfloat16))
    assert minus_inf.dtype == torch.float32 and torch.isneginf(minus_inf[0]) and minus_inf[1] == 0


def _random_parts(seed: int, num_parts: int, num_tokens: int, num_heads: int):
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(num_parts):
        out = torch.randn(num_tokens, num_heads, 8, generator=gen)
        lse = torch.randn(num_tokens, num_heads, generator=gen) * 10
        lse = lse.masked_fill(torch.rand(num_tokens, num_heads, generator=gen) < 0.3, float("-inf"))
        parts.append((out.masked_fill(torch.isneginf(lse)[..., None], 0.0), lse))
    return parts


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_parts=st.integers(1, 6),
    num_tokens=st.integers(1, 3),
    num_heads=st.integers(1, 3),
    data=st.data(),
)
def test_merge_is_order_independent_and_associative(seed, num_parts, num_tokens, num_heads, data):
    parts = _random_parts(seed, num_parts, num_tokens, num_heads)
    whole = merge(parts)
    order = data.draw(st.permutations(range(num_parts)))
    cut = data.draw(st.integers(1, num_parts))
    permuted = [parts[i] for i in order]
    grouped = merge([merge(permuted[:cut])] + ([merge(permuted[cut:])] if cut < num_parts else []))
    for other in (merge(permuted), grouped):
        assert not other[0].isnan().any() and not other[1].isnan().any()
        torch.testing.assert_close(other[0], whole[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other[1], whole[1], atol=1e-5, rtol=1e-5)


def test_validation_errors_name_the_value():
    q_nope, q_pe, cache, slots = make_inputs(2, 3, 5)
    cases = [
        ((q_nope[..., :100], q_pe, cache, slots), {}, "q_nope shape"),
        ((q_nope, q_pe[:1], cache, slots), {}, "q_pe shape"),
        ((q_nope, q_pe, cache[:, :500], slots), {}, "kv_cache shape"),
        ((q_nope, q_pe, cache.double(), slots), {}, "kv_cache dtype"),
        ((q_nope.int(), q_pe, cache, slots), {}, "q_nope dtype"),
        ((q_nope, q_pe, cache, slots.float()), {}, "slots must be"),
        ((q_nope, q_pe, cache, torch.tensor([-1])), {}, "slots must lie"),
        ((q_nope, q_pe, cache, torch.tensor([cache.shape[0]])), {}, "slots must lie"),
        ((q_nope, q_pe, cache, slots), {"q_positions": torch.arange(2)}, "both"),
        ((q_nope, q_pe, cache, slots), {"q_positions": torch.arange(2), "kv_positions": torch.arange(4)},
         "kv_positions has length"),
    ]  # fmt: skip
    for args, kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            partial_attention(*args, SCALE, **kwargs)
    with pytest.raises(ConfigError, match="scale"):
        partial_attention(q_nope, q_pe, cache, slots, float("nan"))
    with pytest.raises(ConfigError, match="at least one part"):
        merge([])
    with pytest.raises(ConfigError, match="part 1"):
        merge([empty_part(2, 3, 8), empty_part(2, 4, 8)])
    assert issubclass(ConfigError, ValueError)


def test_no_query_rows_give_an_empty_part():
    """A route of zero rows (valid on the wire) is answered, not an error: found by `qroute fuzz`."""
    cache = torch.randn(8, 576)
    out, lse = partial_attention(torch.randn(0, 4, 512), torch.randn(0, 4, 64), cache, range(0, 8), 0.1, 512)
    assert out.shape == (0, 4, 512) and lse.shape == (0, 4)
