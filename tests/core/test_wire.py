"""Tests for qroute.core.wire (round trips, validation, size bounds, fuzzing) and qroute.core.handshake's hello."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qroute.core import handshake, wire
from qroute.core.wire import (
    ErrorCode,
    ErrorReply,
    Hello,
    HelloReply,
    RouteReply,
    RouteRequest,
    Tensor,
    as_torch,
    decode,
    encode,
    from_wire,
    to_wire,
)
from qroute.errors import ConfigError, HandshakeMismatch, RemoteError, WireError

T, H, RANK, ROPE = 3, 4, 16, 8


def rng_array(shape: tuple[int, ...], dtype: str = "float32", seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def route_request(dtype: str = "float32", **kw: object) -> RouteRequest:
    fields: dict[str, object] = dict(
        request_id=7, corpus="code", layer=2,
        q_nope=to_wire(torch.randn(T, H, RANK, dtype=getattr(torch, dtype))),
        q_pe=to_wire(torch.randn(T, H, ROPE, dtype=getattr(torch, dtype))),
        block_ids=(0, 5, 9), timeout_us=50_000,
    )
    fields.update(kw)
    return RouteRequest(**fields)  # type: ignore[arg-type]


def hello(**kw: object) -> Hello:
    fields: dict[str, object] = dict(
        model_fingerprint="tiny@1", compat=handshake.compat_key("tiny@1", 576, 64, "bfloat16"),
        corpus_name="code", corpus_version="v1",
    )
    fields.update(kw)
    return handshake.make_hello("req-0", **fields)  # type: ignore[arg-type]


def all_messages() -> list[wire.Message]:
    h = hello()
    return [
        h,
        handshake.accept_hello("own-1"),
        HelloReply(wire.WIRE_VERSION, False, "corpus version differs"),
        route_request(),
        route_request("bfloat16"),
        route_request("float16", q_nope=to_wire(rng_array((0, H, RANK), "float16")),
                      q_pe=to_wire(rng_array((0, H, ROPE), "float16")), block_ids=()),
        RouteReply(7, to_wire(rng_array((T, H, RANK))), to_wire(rng_array((T, H)))),
        ErrorReply(8, ErrorCode.OVERLOADED, "queue full"),
    ]


MESSAGES = all_messages()
VALID = [encode(m) for m in MESSAGES]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: wire.Message) -> None:
    buf = encode(msg)
    assert decode(buf) == msg
    assert decode(memoryview(buf)) == msg and decode(bytearray(buf)) == msg


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 3, 4), (1, 2, 3, 4)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8", "int32", "int64"])
def test_numpy_tensor_round_trip(shape: tuple[int, ...], dtype: str) -> None:
    x = np.asarray(rng_array(shape) * 50).astype(dtype)
    t = to_wire(x)
    assert (t.dtype, t.shape) == (dtype, shape)
    back = from_wire(msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=Tensor))
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(as_torch(t).numpy(), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_torch_tensor_round_trip(dtype: torch.dtype) -> None:
    x = torch.randn(T, H, RANK).to(dtype)
    msg = RouteReply(1, to_wire(x.float()), to_wire(torch.zeros(T, H)))
    t = to_wire(x)
    assert t.dtype == str(dtype).removeprefix("torch.")
    back = as_torch(msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=Tensor))
    assert back.dtype == dtype and torch.equal(back, x)
    assert decode(encode(msg)) == msg


def test_bfloat16_travels_as_uint16_bits() -> None:
    x = torch.randn(4, 5).bfloat16()
    t = to_wire(x)
    bits = from_wire(t)
    assert bits.dtype == np.uint16 and bits.shape == (4, 5)
    np.testing.assert_array_equal(bits.view(np.int16), x.view(torch.int16).numpy())
    assert to_wire(bits, bfloat16_bits=True) == t
    assert torch.equal(as_torch(t), x)


def test_big_endian_and_strided_arrays_are_normalised() -> None:
    x = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    t = to_wire(x)
    assert t.dtype == "float32" and t.data == np.ascontiguousarray(x, "<f4").tobytes()
    np.testing.assert_array_equal(from_wire(t), x)


def test_decoded_tensors_view_the_buffer() -> None:
    x = np.arange(6, dtype="<f4")
    buf = bytearray(encode(RouteReply(1, to_wire(x.reshape(1, 2, 3)), to_wire(np.zeros((1, 2), "<f4")))))
    reply = decode(buf)
    assert isinstance(reply.out.data, memoryview)
    at = bytes(buf).index(x.tobytes())
    buf[at:at + 4] = np.float32(42).tobytes()  # the buffer changes under the decoded tensor: no copy was made
    assert from_wire(reply.out).reshape(-1)[0] == 42
    copied = as_torch(reply.out)  # as_torch copies: later changes to the buffer do not reach it
    buf[at:at + 4] = np.float32(0).tobytes()
    assert copied.reshape(-1)[0] == 42


def _decoded_queries(k: int, q_nope: torch.Tensor, q_pe: torch.Tensor) -> tuple[Tensor, Tensor]:
    request = decode(encode(RouteRequest(k, "c", 0, to_wire(q_nope), to_wire(q_pe), (0,), 1)))
    return request.q_nope, request.q_pe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joined_tensors_equal_the_concatenation(dtype: torch.dtype) -> None:
    messages = [(torch.randn(t, 3, 8).to(dtype), torch.randn(t, 3, 2).to(dtype)) for t in (1, 3, 2)]
    joined = wire.as_torch_joined([_decoded_queries(k, a, b) for k, (a, b) in enumerate(messages)])
    want = torch.cat([torch.cat([a, b], dim=-1) for a, b in messages])
    assert joined.dtype == dtype and torch.equal(joined, want)


def test_joined_tensors_must_agree_but_in_their_rows() -> None:
    a, b = to_wire(np.zeros((1, 3, 8), "<f4")), to_wire(np.zeros((1, 3, 2), "<f4"))
    assert wire.as_torch_joined([(a, b), (to_wire(np.ones((4, 3, 8), "<f4")), to_wire(np.ones((4, 3, 2), "<f4")))]
                                ).shape == (5, 3, 10)  # fmt: skip
    for other in [(a, to_wire(np.zeros((1, 3, 5), "<f4"))),  # another width
                  (to_wire(np.zeros((1, 4, 8), "<f4")), b),  # other heads
                  (to_wire(np.zeros((1, 3, 8), "<f2")), b),  # another dtype
                  (a, to_wire(np.zeros((2, 3, 2), "<f4")))]:  # pieces of one message with different rows
        with pytest.raises(WireError, match="one T per message"):
            wire.as_torch_joined([(a, b), other])
    with pytest.raises(WireError, match="2 tensors to join, not 1"):
        wire.as_torch_joined([(a, b), (a,)])


def test_error_reply_to_exception() -> None:
    exc = ErrorReply(3, ErrorCode.DEADLINE, "took 12 ms").as_exception()
    assert isinstance(exc, RemoteError) and exc.code is ErrorCode.DEADLINE and "deadline: took 12 ms" in str(exc)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "args,match",
    [
        (("float64", (2,), bytes(16)), "dtype 'float64'"),
        (("float32", (2,), bytes(7)), "needs 8"),
        (("float32", (1, 1, 1, 1, 1), bytes(4)), "<= 4"),
        (("float32", (-1,), b""), "non-negative"),
        (("int32", (2**40, 2**40), bytes(4)), "needs"),
    ],
)
def test_bad_tensor_raises_wire_error(args: tuple[str, tuple[int, ...], bytes], match: str) -> None:
    with pytest.raises(WireError, match=match):
        Tensor(*args)
    # The same tensor arriving over the wire (built without validation) is refused too.
    raw = msgspec.msgpack.encode(["fetch_reply", 1, list(args), [0]])
    with pytest.raises(WireError):
        decode(raw)


def test_to_wire_rejects_unsupported_inputs() -> None:
    with pytest.raises(WireError, match="float64"):
        to_wire(np.zeros(3))
    with pytest.raises(WireError, match="numpy array or torch tensor"):
        to_wire([1.0, 2.0])
    with pytest.raises(WireError, match="uint16"):
        to_wire(np.zeros(3, np.float32), bfloat16_bits=True)


def _tensor(shape: tuple[int, ...], dtype: str = "float32") -> Tensor:
    return Tensor(dtype, shape, bytes(int(np.prod(shape)) * wire.WIRE_DTYPES[dtype]))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: route_request(q_pe=_tensor((T + 1, H, ROPE))), "same T and H"),
        (lambda: route_request(q_pe=_tensor((T, H + 1, ROPE))), "same T and H"),
        (lambda: route_request(q_nope=_tensor((T, H))), r"\[T, H, \*\]"),
        (lambda: route_request(q_pe=_tensor((T, H, ROPE), "float16")), "must match"),
        (lambda: route_request(q_nope=_tensor((T, H, RANK), "int32"), q_pe=_tensor((T, H, ROPE), "int32")),
         "must match and be one of"),
        (lambda: route_request(block_ids=(1, 1)), "duplicates"),
        (lambda: RouteReply(1, _tensor((T, H, RANK)), _tensor((T, H + 1))), "out.shape"),
        (lambda: RouteReply(1, _tensor((T, H, RANK)), _tensor((T, H), "float16")), "lse float16"),
        (lambda: RouteReply(1, _tensor((T, H)), _tensor((T,))), "kv_lora_rank"),
    ],
)
def test_semantic_validation(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError, match=match):
        build()


def test_invalid_message_on_the_wire_raises_wire_error() -> None:
    # Bypass __post_init__ by encoding plain lists with the message layout.
    good = route_request()
    fields = [getattr(good, f) for f in good.__struct_fields__]
    bad_pe = ["float32", [T + 1, H, ROPE], bytes((T + 1) * H * ROPE * 4)]
    for index, value in [(5, [1, 1]), (6, 0), (6, -3), (2, -1), (0, -1), (4, bad_pe), (1, "x" * 300)]:
        mutated = list(fields)
        mutated[index] = value
        with pytest.raises(WireError):
            decode(msgspec.msgpack.encode(["route", *mutated]))
    with pytest.raises(WireError, match="Invalid enum value"):
        decode(msgspec.msgpack.encode(["error", 1, 999, "x"]))
    with pytest.raises(WireError):
        decode(msgspec.msgpack.encode(["nope", 1]))


def test_oversized_buffer_rejected_before_decoding() -> None:
    buf = VALID[3]
    with pytest.raises(WireError, match="too large"):
        decode(buf, max_bytes=len(buf) - 1)
    assert decode(buf, max_bytes=len(buf)) == MESSAGES[3]
    # Even a garbage buffer says "too large", not "malformed": the size is checked first.
    with pytest.raises(WireError, match="too large"):
        decode(b"\xc1" * 100, max_bytes=10)
    with pytest.raises(WireError, match="hello too large"):
        wire.decode_hello(bytes(wire.MAX_HELLO_BYTES + 1))


def test_decode_hello_accepts_only_hello() -> None:
    h = hello()
    assert wire.decode_hello(encode(h)) == h
    with pytest.raises(WireError):
        wire.decode_hello(VALID[-1])


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_only_wire_errors(buf: bytes) -> None:
    try:
        msg = decode(buf)
    except WireError:
        return
    assert decode(encode(msg)) == msg  # whatever decodes is a valid message


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_wire_error(buf: bytes) -> None:
    _decode_only_wire_errors(buf)


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_encodings_only_raise_wire_error(buf: bytes, edits: list[tuple[int, int]]) -> None:
    mutated = bytearray(buf)
    for pos, value in edits:
        mutated[pos % len(mutated)] = value
    _decode_only_wire_errors(bytes(mutated))


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_truncated_or_extended_encodings_only_raise_wire_error(buf: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(buf)))
    tail = data.draw(st.binary(max_size=16))
    _decode_only_wire_errors(buf[:cut] + tail)


# --------------------------------------------------------------------------- handshake

SECRET = b"s3cret"


def check(h: Hello, **kw: object) -> None:
    expected: dict[str, object] = dict(
        model_fingerprint="tiny@1", compat=handshake.compat_key("tiny@1", 576, 64, "bfloat16"),
        corpus_name="code", corpus_version="v1",
    )
    expected.update(kw)
    handshake.check_hello(h, **expected)  # type: ignore[arg-type]


def test_matching_handshake_passes_both_ways() -> None:
    h = wire.decode_hello(encode(hello()))
    check(h)
    reply = decode(encode(handshake.accept_hello("own-1")))
    assert isinstance(reply, HelloReply)
    handshake.check_hello_reply(reply)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(model_fingerprint="other@2"), "model fingerprint"),
        (dict(compat=handshake.compat_key("tiny@1", 576, 64, "float32")), "incompatible rows: dtype"),
        # an engine that ropes the same checkpoint the other way (SGLang honours rope_interleave, vLLM does not)
        (dict(compat=handshake.compat_key("tiny@1", 576, 64, "bfloat16", rope="neox")), "incompatible rows: rope"),
        (dict(corpus_name="docs"), "corpus 'code'"),
        (dict(corpus_version="v2"), "corpus version"),
    ],
)
def test_handshake_mismatch_names_the_field(kw: dict[str, object], match: str) -> None:
    with pytest.raises(HandshakeMismatch, match=match):
        check(hello(), **kw)


def test_wire_version_checked_first() -> None:
    h = msgspec.structs.replace(hello(), wire_version=wire.WIRE_VERSION + 1, model_fingerprint="x")
    with pytest.raises(HandshakeMismatch, match="wire version"):
        check(h)


def test_hello_reply_checks() -> None:
    with pytest.raises(HandshakeMismatch, match="refused the handshake: corpus version differs"):
        handshake.check_hello_reply(HelloReply(wire.WIRE_VERSION, False, "corpus version differs"))
    with pytest.raises(HandshakeMismatch, match="wire version"):
        handshake.check_hello_reply(HelloReply(wire.WIRE_VERSION + 1, True))


def test_proofs_bind_both_nonces_the_carried_bytes_and_the_role() -> None:
    server, client, hello_bytes = handshake.new_nonce(), handshake.new_nonce(), encode(hello())
    assert len(server) == handshake.NONCE_BYTES and server != client
    proof = handshake.client_proof(SECRET, server, client, hello_bytes, b"extra")
    handshake.verify_proof(handshake.client_proof(SECRET, server, client, hello_bytes, b"extra"), proof, "requester")
    other_server = handshake.new_nonce()
    changed = [
        handshake.client_proof(SECRET, other_server, client, hello_bytes, b"extra"),  # replayed on a new connection
        handshake.client_proof(SECRET, server, handshake.new_nonce(), hello_bytes, b"extra"),
        handshake.client_proof(SECRET, server, client, encode(hello(corpus_name="other")), b"extra"),  # spliced hello
        handshake.client_proof(SECRET, server, client, hello_bytes + b"extra"),  # fields are length-prefixed
        handshake.server_proof(SECRET, server, client, hello_bytes, b"extra"),  # reflected: the owner's label
        handshake.client_proof(b"guess", server, client, hello_bytes, b"extra"),
    ]
    for expected in changed:
        with pytest.raises(HandshakeMismatch, match="shared secret"):
            handshake.verify_proof(expected, proof, "requester")
    with pytest.raises(ConfigError, match="secret"):
        handshake.check_secret(b"")


def test_fields_round_trip_and_refuse_malformed() -> None:
    packed = handshake.pack_fields(b"a", b"", b"xyz")
    assert handshake.unpack_fields(packed, 3) == [b"a", b"", b"xyz"]
    for bad, count in [(packed[:-1], 3), (packed + b"!", 3), (packed, 4)]:
        with pytest.raises(WireError, match="handshake"):
            handshake.unpack_fields(bad, count)


def test_compat_key() -> None:
    compat_key = handshake.compat_key
    base = compat_key("m", 576, 64, "bfloat16")
    assert base == compat_key("m", 576, 64, "bfloat16", "e")
    variants = {
        compat_key("m2", 576, 64, "bfloat16"), compat_key("m", 656, 64, "bfloat16"),
        compat_key("m", 576, 32, "bfloat16"), compat_key("m", 576, 64, "float32"),
        compat_key("m", 576, 64, "bfloat16", "2"), compat_key("m", 576, 64, "bfloat16", rope="neox"),
    }
    assert base not in variants and len(variants) == 6
    assert base == compat_key("m", 576, 64, "bfloat16", rope="interleaved")
    with pytest.raises(ConfigError, match="lse_base"):
        compat_key("m", 576, 64, "bfloat16", "10")
    with pytest.raises(ConfigError, match="rope"):
        compat_key("m", 576, 64, "bfloat16", rope="gptj")
    with pytest.raises(ConfigError, match="dtype"):
        compat_key("m", 576, 64, "fp8")


@pytest.mark.parametrize("theirs,named", [
    (("tiny@1", 576, 64, "float32"), "dtype float32 != local bfloat16"),
    (("tiny@1", 576, 32, "bfloat16"), "block_size 32 != local 64"),
    (("tiny@1", 656, 64, "bfloat16"), "latent_width 656 != local 576"),
])  # fmt: skip
def test_an_incompatible_peer_is_told_which_field_differs(theirs, named) -> None:
    with pytest.raises(HandshakeMismatch, match=named):
        check(hello(compat=handshake.compat_key(*theirs)))


def test_messages_are_frozen_tagged_arrays() -> None:
    for msg in all_messages():
        assert type(msg).__struct_config__.frozen and type(msg).__struct_config__.array_like
        assert msgspec.msgpack.decode(encode(msg))[0] == type(msg).__struct_config__.tag
        with pytest.raises(AttributeError):
            setattr(msg, type(msg).__struct_fields__[0], 1)


def test_schema_evolution_appended_fields() -> None:
    # A newer peer appends fields (with defaults): this version ignores them.
    request = route_request()
    raw = msgspec.msgpack.decode(encode(request))
    assert decode(msgspec.msgpack.encode([*raw, "future", 3])) == request
    # An older peer omits trailing defaulted fields: they take their defaults.
    reply = handshake.accept_hello("own-1")
    raw = msgspec.msgpack.decode(encode(reply))
    assert raw[-1] == "own-1" and decode(msgspec.msgpack.encode(raw[:-1])) == wire.HelloReply(wire.WIRE_VERSION, True)
