"""The qroute wire format: versioned, size-bounded, validated msgspec messages.

Messages (frozen, tagged, array-like msgspec Structs; tag in brackets):

- ``Hello`` [hello], requester -> owner, once per connection, inside the transport's authenticated
  handshake (``qroute.core.handshake``): versions, identity, what must match.
- ``HelloReply`` [hello_reply], owner -> requester, once: accepted or why not.
- ``RouteRequest`` [route] / ``RouteReply`` [route_reply]: absorbed query rows in, partial
  attention ``(out, lse)`` out. LSE is natural log, as everywhere in qroute.
- ``ErrorReply`` [error]: a typed failure (``qroute.errors.ErrorCode``) for any request, by ``request_id``.

Latent rows are never a message: a requester fetches them with a one-sided read of the owner's
registered region (``Connection.read``).

Rules: fields are only ever appended, with defaults; every change bumps ``WIRE_VERSION`` with a
line below. Tensors travel as a ``Tensor`` (dtype name, shape, raw little-endian bytes), never
pickled. ``decode`` checks the size before decoding, validates after, and raises only
``WireError``. Deadlines travel as relative timeouts: monotonic clocks of two processes (or
machines) share no epoch.

No torch here: ``to_wire`` recognises torch tensors only if torch is already imported, and
``as_torch`` imports it lazily.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import numpy as np

from qroute.errors import ErrorCode, RemoteError, WireError

__all__ = [
    "MAX_HELLO_BYTES",
    "MAX_MESSAGE_BYTES",
    "WIRE_DTYPES",
    "WIRE_VERSION",
    "ErrorCode",
    "ErrorReply",
    "Hello",
    "HelloReply",
    "Message",
    "RouteReply",
    "RouteRequest",
    "Tensor",
    "as_torch",
    "as_torch_joined",
    "decode",
    "decode_hello",
    "encode",
    "from_wire",
    "to_wire",
]

# 1: first version (Hello, HelloReply, RouteRequest, RouteReply, FetchRequest, FetchReply, ErrorReply).
# 2: one handshake: Hello/HelloReply lose nonce and auth (the transport's proofs bind both nonces and the
#    hello); FetchRequest/FetchReply removed (fetch is a one-sided read); RouteRequest loses position_shift
#    (queries arrive at corpus positions) and q_positions; ErrorReply.code is the integer ErrorCode.
# 3: Hello.compat_hash holds ``handshake.compat_key`` (readable fields, so a refusal names what differs), not a
#    digest.
WIRE_VERSION = 3

# One message; a route request of 256 rows x 128 heads x 576 x 2 B is ~38 MB. Larger work is split by
# the router, or fetched instead.
MAX_MESSAGE_BYTES = 256 << 20
MAX_HELLO_BYTES = 4096

# name -> itemsize. bfloat16 has no numpy dtype: it travels and decodes as raw uint16 bits.
WIRE_DTYPES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "uint8": 1,
    "int32": 4,
    "int64": 8,
}
_FLOAT_DTYPES = frozenset({"float32", "bfloat16", "float16"})
_NUMPY_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in WIRE_DTYPES if name != "bfloat16"}
_NUMPY_DTYPES["bfloat16"] = np.dtype("<u2")
_WIRE_ORDER_NAMES = {dtype: name for name, dtype in _NUMPY_DTYPES.items() if name != "bfloat16"}
MAX_NDIM = 4

U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgspec decodes ints up to 2**64 - 1
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
BlockIds = Annotated[tuple[NonNeg, ...], msgspec.Meta(max_length=1 << 22)]
Shape = Annotated[tuple[NonNeg, ...], msgspec.Meta(max_length=MAX_NDIM)]


def _fail(msg: str) -> None:
    raise WireError(msg)


# --------------------------------------------------------------------------- tensors


class Tensor(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A dense little-endian C-order array: ``dtype`` in ``WIRE_DTYPES``, ``shape``, raw ``data``: when decoded, a
    view of the decoded buffer (no copy: an owner reads a route's rows where they landed in its inbox, so the
    buffer must not change while the tensor is used); when built by ``to_wire``, a view of the source array."""

    dtype: str
    shape: Shape
    data: memoryview

    def __post_init__(self) -> None:
        itemsize = WIRE_DTYPES.get(self.dtype)
        if itemsize is None:
            _fail(f"tensor dtype {self.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
        if len(self.shape) > MAX_NDIM or any(d < 0 for d in self.shape):
            _fail(f"tensor shape {self.shape} must have <= {MAX_NDIM} non-negative dims")
        if len(self.data) != math.prod(self.shape) * itemsize:
            _fail(
                f"tensor data is {len(self.data)} bytes; shape {self.shape} x {self.dtype} "
                f"needs {math.prod(self.shape) * itemsize}"
            )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:  # never dump megabytes of data into a log line
        return f"Tensor({self.dtype}, {self.shape}, {len(self.data)} B)"


def _bytes_of(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, as a view (no copy)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def to_wire(x: Any, *, bfloat16_bits: bool = False) -> Tensor:
    """numpy array or torch tensor -> ``Tensor``. A contiguous CPU input is not copied: the ``Tensor`` views its
    memory until ``encode`` copies it into the message, so encode before changing ``x``.

    ``bfloat16_bits=True`` sends a uint16 numpy array (as ``from_wire`` returns it) as bfloat16.
    """
    torch = sys.modules.get("torch")  # never import torch here: callers who have tensors have it
    if torch is not None and isinstance(x, torch.Tensor):
        if x.requires_grad or x.device.type != "cpu" or not x.is_contiguous():
            x = x.detach().cpu().contiguous()  # three calls of a few microseconds each: only when needed
        if x.dtype == torch.bfloat16:
            return Tensor("bfloat16", tuple(x.shape), _bytes_of(x.view(torch.int16).numpy()))
        name = _torch_wire_names(torch).get(x.dtype)
        if name is not None and sys.byteorder == "little":
            return Tensor(name, tuple(x.shape), _bytes_of(x.numpy()))  # hot path: host order is the wire's
        x = x.numpy()
    if isinstance(x, np.generic):  # a numpy scalar is a 0-d array
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise WireError(f"to_wire takes a numpy array or torch tensor, not {type(x).__name__}")
    name = _WIRE_ORDER_NAMES.get(x.dtype)  # a dict look-up: numpy's dtype.name is computed in Python per call
    if name is not None and not bfloat16_bits and x.flags.c_contiguous:
        return Tensor(name, x.shape, _bytes_of(x))  # hot path: already in the wire's byte order and layout
    name = x.dtype.name
    if bfloat16_bits:
        if name != "uint16":
            raise WireError(f"bfloat16_bits=True needs a uint16 array, got {name}")
        name = "bfloat16"
    if name not in WIRE_DTYPES:
        raise WireError(f"array dtype {name!r} is not one of {sorted(WIRE_DTYPES)}")
    data = _bytes_of(np.ascontiguousarray(x, dtype=_NUMPY_DTYPES[name]))
    return Tensor(name, tuple(int(d) for d in x.shape), data)


_TORCH_WIRE_NAMES: dict[Any, str] = {}


def _torch_wire_names(torch: Any) -> dict[Any, str]:
    """torch dtype -> wire dtype name (bfloat16 apart), built on first use: this module never imports torch."""
    if not _TORCH_WIRE_NAMES:
        _TORCH_WIRE_NAMES.update({getattr(torch, n): n for n in WIRE_DTYPES if n != "bfloat16"})
    return _TORCH_WIRE_NAMES


def from_wire(t: Tensor) -> np.ndarray:
    """``Tensor`` -> read-only numpy view of its bytes (no copy); bfloat16 comes back as uint16 bits."""
    return np.frombuffer(t.data, dtype=_NUMPY_DTYPES[t.dtype]).reshape(t.shape)


def as_torch(t: Tensor) -> Any:
    """``Tensor`` -> a new, writable CPU torch tensor of the same dtype (bfloat16 included)."""
    return _torch_of(from_wire(t).copy(), t.dtype)  # writable: torch warns on (and must not write into) bytes


def as_torch_joined(rows: Sequence[Sequence[Tensor]]) -> Any:
    """Several messages' tensors as one new torch tensor, with one copy from the wire: ``rows[m]`` are message
    ``m``'s ``[T_m, H, W_i]`` tensors (one dtype), laid side by side on the last axis; the messages follow one
    another on the first. The result is ``[sum T_m, H, sum W_i]``: what ``torch.cat`` of ``as_torch``'s would give,
    without the intermediate tensors (an owner stacks every requester's ``q_nope | q_pe`` this way)."""
    first = rows[0]
    dtype, heads = first[0].dtype, first[0].shape[1]
    widths = [t.shape[2] for t in first]
    total = 0
    for msg in rows:  # a plain loop: this runs per route, and generator expressions cost microseconds here
        num = msg[0].shape[0]
        if len(msg) != len(widths):
            raise WireError(f"every message must give {len(widths)} tensors to join, not {len(msg)}")
        for t, width in zip(msg, widths, strict=True):
            if t.dtype != dtype or len(t.shape) != 3 or t.shape[0] != num or t.shape[1] != heads or t.shape[2] != width:
                raise WireError(f"tensors to join must be [T, {heads}, W] {dtype}, one T per message, widths {widths}")
        total += num
    joined = np.empty((total, heads, sum(widths)), _NUMPY_DTYPES[dtype])
    row = 0
    for msg in rows:
        stop, col = row + msg[0].shape[0], 0
        for t, width in zip(msg, widths, strict=True):
            joined[row:stop, :, col:col + width] = from_wire(t)
            col += width
        row = stop
    return _torch_of(joined, dtype)


def _torch_of(array: np.ndarray, dtype: str) -> Any:
    import torch  # lazy: the core must import without torch

    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# --------------------------------------------------------------------------- messages


_MSG = {"frozen": True, "array_like": True, "gc": False}


class Hello(msgspec.Struct, tag="hello", **_MSG):
    """Requester -> owner, carried (and authenticated) by the transport's handshake."""

    wire_version: int
    instance_id: Name
    model_fingerprint: Name
    corpus_name: Name
    corpus_version: Name
    compat_hash: Name


class HelloReply(msgspec.Struct, tag="hello_reply", **_MSG):
    """Owner -> requester, carried (and authenticated) by the transport's handshake."""

    wire_version: int
    accepted: bool
    reason: Text = ""
    instance_id: Name = ""


class RouteRequest(msgspec.Struct, tag="route", **_MSG):
    """Absorbed query rows for the owner's blocks of one layer.

    ``q_nope``: ``[num_tokens, num_heads, kv_lora_rank]``; ``q_pe``: ``[num_tokens, num_heads,
    rope_dim]`` (float32/bfloat16/float16, same dtype), roped at the rows' corpus positions (the
    requester moved them there: ``qroute.numerics.rope.PositionShift``).
    ``timeout_us``: relative deadline, > 0.
    """

    request_id: U64
    corpus: Name
    layer: NonNeg
    q_nope: Tensor
    q_pe: Tensor
    block_ids: BlockIds
    timeout_us: Annotated[int, msgspec.Meta(gt=0)]

    def __post_init__(self) -> None:
        qn, qp = self.q_nope, self.q_pe
        if qn.ndim != 3 or qp.ndim != 3 or qn.shape[:2] != qp.shape[:2]:
            _fail(f"q_nope {qn.shape} and q_pe {qp.shape} must be [T, H, *] with the same T and H")
        if qn.dtype not in _FLOAT_DTYPES or qp.dtype != qn.dtype:
            _fail(f"q_nope/q_pe dtypes {qn.dtype}/{qp.dtype} must match and be one of {sorted(_FLOAT_DTYPES)}")
        if len(set(self.block_ids)) != len(self.block_ids):
            _fail("block_ids has duplicates (each block must be attended to once)")


class RouteReply(msgspec.Struct, tag="route_reply", **_MSG):
    """Partial attention over the owner's selected blocks.

    ``out``: ``[num_tokens, num_heads, kv_lora_rank]`` float32 or bfloat16; ``lse``:
    ``[num_tokens, num_heads]`` float32, natural log; an empty part is ``(0, -inf)``.
    """

    request_id: U64
    out: Tensor
    lse: Tensor

    def __post_init__(self) -> None:
        out, lse = self.out, self.lse
        if out.ndim != 3 or out.dtype not in ("float32", "bfloat16"):
            _fail(f"out {out.dtype}{out.shape} must be float32/bfloat16 [T, H, kv_lora_rank]")
        if lse.dtype != "float32" or lse.shape != out.shape[:2]:
            _fail(f"lse {lse.dtype}{lse.shape} must be float32 of shape out.shape[:2] = {out.shape[:2]}")


class ErrorReply(msgspec.Struct, tag="error", **_MSG):
    """The request ``request_id`` failed; ``code`` says how, ``message`` says why."""

    request_id: U64
    code: ErrorCode
    message: Text = ""

    def as_exception(self) -> RemoteError:
        return RemoteError(self.code, self.message)


Message = Hello | HelloReply | RouteRequest | RouteReply | ErrorReply

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)
_HELLO_DECODER = msgspec.msgpack.Decoder(Hello)
# What a malformed buffer can make msgspec or a __post_init__ raise; all become WireError.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, OverflowError)


def encode(msg: Message) -> bytes:
    return _ENCODER.encode(msg)


def decode(buf: bytes | bytearray | memoryview, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Size check, then decode, then validate; raises only ``WireError``. Tensors view ``buf`` (see ``Tensor``)."""
    if len(buf) > max_bytes:  # before msgspec allocates anything
        raise WireError(f"message too large: {len(buf)} bytes > max_bytes={max_bytes}")
    try:
        return _DECODER.decode(buf)
    except _DECODE_ERRORS as exc:
        raise WireError(f"malformed message: {exc}") from exc


def decode_hello(buf: bytes | bytearray | memoryview) -> Hello:
    """Decode the first message of a connection; only a small ``Hello`` is accepted."""
    if len(buf) > MAX_HELLO_BYTES:
        raise WireError(f"hello too large: {len(buf)} bytes > {MAX_HELLO_BYTES}")
    try:
        return _HELLO_DECODER.decode(buf)
    except _DECODE_ERRORS as exc:
        raise WireError(f"malformed hello: {exc}") from exc
