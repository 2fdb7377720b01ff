"""The qroute wire format: versioned, size-bounded, validated msgspec messages.

Messages (frozen, tagged, array-like msgspec Structs; tag in brackets):

- ``Hello`` [hello], requester -> owner, once per connection: versions, identity, auth.
- ``HelloReply`` [hello_reply], owner -> requester, once: accepted or why not; owner's auth.
- ``RouteRequest`` [route] / ``RouteReply`` [route_reply]: absorbed query rows in, partial
  attention ``(out, lse)`` out. LSE is natural log, as everywhere in qroute.
- ``FetchRequest`` [fetch] / ``FetchReply`` [fetch_reply]: latent KV rows of corpus blocks.
- ``ErrorReply`` [error]: a typed failure for any request, by ``request_id``.

Rules: fields are only ever appended, with defaults; every change bumps ``WIRE_VERSION`` with a
line below. Tensors travel as a ``Tensor`` (dtype name, shape, raw little-endian bytes), never
pickled. ``decode`` checks the size before decoding, validates after, and raises only
``WireError``. Deadlines travel as relative timeouts: monotonic clocks of two processes (or
machines) share no epoch.

No torch here: ``to_wire`` recognises torch tensors only if torch is already imported, and
``as_torch`` imports it lazily.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import secrets
import sys
from typing import Annotated, Any

import msgspec
import numpy as np

from qroute.errors import ConfigError, HandshakeMismatch, RemoteError, WireError

__all__ = [
    "FRAME_HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_HELLO_BYTES",
    "MAX_MESSAGE_BYTES",
    "WIRE_DTYPES",
    "WIRE_VERSION",
    "ErrorCode",
    "ErrorReply",
    "FetchReply",
    "FetchRequest",
    "Hello",
    "HelloReply",
    "Message",
    "RouteReply",
    "RouteRequest",
    "Tensor",
    "accept_hello",
    "as_torch",
    "check_auth",
    "check_hello",
    "check_hello_reply",
    "compat_hash",
    "decode",
    "decode_hello",
    "encode",
    "frame",
    "frame_header",
    "frame_length",
    "from_wire",
    "make_auth",
    "make_hello",
    "to_wire",
]

# 1: first version (Hello, HelloReply, RouteRequest, RouteReply, FetchRequest, FetchReply, ErrorReply).
WIRE_VERSION = 1

# One message; a route request of 256 rows x 128 heads x 576 x 2 B is ~38 MB, a fetch of one
# 64 K-token range ~75 MB. Larger work is split by the router, or fetched instead.
MAX_MESSAGE_BYTES = 256 << 20
MAX_HELLO_BYTES = 4096
FRAME_HEADER_BYTES = 4
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES  # a frame holds exactly one message

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
_INT_DTYPES = frozenset({"int32", "int64"})
_NUMPY_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in WIRE_DTYPES if name != "bfloat16"}
_NUMPY_DTYPES["bfloat16"] = np.dtype("<u2")
MAX_NDIM = 4
NONCE_BYTES = 16
AUTH_BYTES = 32  # HMAC-SHA256

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
    """A dense little-endian C-order array: ``dtype`` in ``WIRE_DTYPES``, ``shape``, raw ``data``."""

    dtype: str
    shape: Shape
    data: bytes

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


def to_wire(x: Any, *, bfloat16_bits: bool = False) -> Tensor:
    """numpy array or torch tensor -> ``Tensor`` (one copy to bytes).

    ``bfloat16_bits=True`` sends a uint16 numpy array (as ``from_wire`` returns it) as bfloat16.
    """
    torch = sys.modules.get("torch")  # never import torch here: callers who have tensors have it
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()  # each a no-op for a contiguous CPU tensor
        if x.dtype == torch.bfloat16:
            return Tensor("bfloat16", tuple(x.shape), x.view(torch.int16).numpy().tobytes())
        name = _torch_wire_names(torch).get(x.dtype)
        if name is not None and sys.byteorder == "little":
            return Tensor(name, tuple(x.shape), x.numpy().tobytes())  # hot path: host order is the wire's
        x = x.numpy()
    if isinstance(x, np.generic):  # a numpy scalar is a 0-d array
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise WireError(f"to_wire takes a numpy array or torch tensor, not {type(x).__name__}")
    name = x.dtype.name
    if bfloat16_bits:
        if name != "uint16":
            raise WireError(f"bfloat16_bits=True needs a uint16 array, got {name}")
        name = "bfloat16"
    if name not in WIRE_DTYPES:
        raise WireError(f"array dtype {name!r} is not one of {sorted(WIRE_DTYPES)}")
    data = np.ascontiguousarray(x, dtype=_NUMPY_DTYPES[name]).tobytes()
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
    import torch  # lazy: the core must import without torch

    array = from_wire(t).copy()  # writable: torch warns on (and must not write into) bytes
    if t.dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# --------------------------------------------------------------------------- messages


class ErrorCode(enum.StrEnum):
    UNKNOWN_CORPUS = "unknown_corpus"
    VERSION_MISMATCH = "version_mismatch"
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline"
    INTERNAL = "internal"


_MSG = {"frozen": True, "array_like": True, "gc": False}


class Hello(msgspec.Struct, tag="hello", **_MSG):
    """Requester -> owner, first message. ``auth = make_auth(secret, b"hello" + nonce)``."""

    wire_version: int
    instance_id: Name
    model_fingerprint: Name
    corpus_name: Name
    corpus_version: Name
    compat_hash: Name
    nonce: bytes
    auth: bytes

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_BYTES or len(self.auth) != AUTH_BYTES:
            _fail(f"hello needs a {NONCE_BYTES}-byte nonce and a {AUTH_BYTES}-byte auth")


class HelloReply(msgspec.Struct, tag="hello_reply", **_MSG):
    """Owner -> requester. If accepted, ``auth = make_auth(secret, b"reply" + client + server nonce)``."""

    wire_version: int
    accepted: bool
    reason: Text = ""
    instance_id: Name = ""
    nonce: bytes = b""
    auth: bytes = b""

    def __post_init__(self) -> None:
        if self.accepted and (len(self.nonce) != NONCE_BYTES or len(self.auth) != AUTH_BYTES):
            _fail(f"an accepting hello_reply needs a {NONCE_BYTES}-byte nonce and a {AUTH_BYTES}-byte auth")


def _check_block_ids(block_ids: tuple[int, ...]) -> None:
    if len(set(block_ids)) != len(block_ids):
        _fail("block_ids has duplicates (each block must be attended to once)")


class RouteRequest(msgspec.Struct, tag="route", **_MSG):
    """Absorbed query rows for the owner's blocks of one layer.

    ``q_nope``: ``[num_tokens, num_heads, kv_lora_rank]``; ``q_pe``: ``[num_tokens, num_heads,
    rope_dim]`` (float32/bfloat16/float16, same dtype), ``q_pe`` not yet rotated by
    ``position_shift`` (the corpus length in front of the request's own tokens).
    ``q_positions``: optional ``[num_tokens]`` int32/int64 positions, for masks.
    ``timeout_us``: relative deadline, > 0.
    """

    request_id: U64
    corpus: Name
    layer: NonNeg
    q_nope: Tensor
    q_pe: Tensor
    position_shift: NonNeg
    block_ids: BlockIds
    timeout_us: Annotated[int, msgspec.Meta(gt=0)]
    q_positions: Tensor | None = None

    def __post_init__(self) -> None:
        qn, qp = self.q_nope, self.q_pe
        if qn.ndim != 3 or qp.ndim != 3 or qn.shape[:2] != qp.shape[:2]:
            _fail(f"q_nope {qn.shape} and q_pe {qp.shape} must be [T, H, *] with the same T and H")
        if qn.dtype not in _FLOAT_DTYPES or qp.dtype != qn.dtype:
            _fail(f"q_nope/q_pe dtypes {qn.dtype}/{qp.dtype} must match and be one of {sorted(_FLOAT_DTYPES)}")
        pos = self.q_positions
        if pos is not None and (pos.dtype not in _INT_DTYPES or pos.shape != qn.shape[:1]):
            _fail(f"q_positions {pos.dtype}{pos.shape} must be int32/int64 of shape ({qn.shape[0]},)")
        _check_block_ids(self.block_ids)


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


class FetchRequest(msgspec.Struct, tag="fetch", **_MSG):
    """Ask an owner for the latent KV rows of ``block_ids`` at ``layer``."""

    request_id: U64
    corpus: Name
    layer: NonNeg
    block_ids: BlockIds
    timeout_us: Annotated[int, msgspec.Meta(gt=0)]

    def __post_init__(self) -> None:
        _check_block_ids(self.block_ids)


class FetchReply(msgspec.Struct, tag="fetch_reply", **_MSG):
    """``rows``: ``[num_tokens, width]`` latent rows of ``block_ids`` in that order (the last
    corpus block may be partial); ``width`` is ``kv_lora_rank + rope_dim``."""

    request_id: U64
    rows: Tensor
    block_ids: BlockIds

    def __post_init__(self) -> None:
        if self.rows.ndim != 2:
            _fail(f"rows {self.rows.shape} must be [num_tokens, width]")
        if not self.block_ids and self.rows.shape[0]:
            _fail("rows without block_ids")
        _check_block_ids(self.block_ids)


class ErrorReply(msgspec.Struct, tag="error", **_MSG):
    """The request ``request_id`` failed; ``code`` says how, ``message`` says why."""

    request_id: U64
    code: ErrorCode
    message: Text = ""

    def as_exception(self) -> RemoteError:
        return RemoteError(str(self.code), self.message)


Message = Hello | HelloReply | RouteRequest | RouteReply | FetchRequest | FetchReply | ErrorReply

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)
_HELLO_DECODER = msgspec.msgpack.Decoder(Hello)
# What a malformed buffer can make msgspec or a __post_init__ raise; all become WireError.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, OverflowError)


def encode(msg: Message) -> bytes:
    return _ENCODER.encode(msg)


def decode(buf: bytes | bytearray | memoryview, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Size check, then decode, then validate; raises only ``WireError``."""
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


# --------------------------------------------------------------------------- framing


def frame_header(length: int, *, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    if not 0 <= length <= max_bytes:
        raise WireError(f"frame too large: {length} bytes > max_bytes={max_bytes}")
    return length.to_bytes(FRAME_HEADER_BYTES, "big")


def frame(payload: bytes | bytearray | memoryview, *, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """``payload`` behind a 4-byte big-endian length."""
    return frame_header(len(payload), max_bytes=max_bytes) + bytes(payload)


def frame_length(header: bytes | bytearray | memoryview, *, max_bytes: int = MAX_FRAME_BYTES) -> int:
    """Parse a frame header; reject a length over ``max_bytes`` before anything is read."""
    if len(header) != FRAME_HEADER_BYTES:
        raise WireError(f"frame header must be {FRAME_HEADER_BYTES} bytes, got {len(header)}")
    length = int.from_bytes(header, "big")
    if length > max_bytes:
        raise WireError(f"frame too large: {length} bytes > max_bytes={max_bytes}")
    return length


# --------------------------------------------------------------------------- handshake


def compat_hash(
    model_fingerprint: str, latent_width: int, block_size: int, dtype: str, lse_base: str = "e"
) -> str:
    """Hash of everything two instances must agree on to exchange latent rows and partials."""
    if dtype not in WIRE_DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {sorted(WIRE_DTYPES)}")
    if lse_base not in ("e", "2"):
        raise ConfigError(f"lse_base={lse_base!r} must be 'e' or '2'")
    if latent_width <= 0 or block_size <= 0:
        raise ConfigError(f"latent_width={latent_width} and block_size={block_size} must be > 0")
    key = f"{model_fingerprint}\x00{latent_width}\x00{block_size}\x00{dtype}\x00{lse_base}"
    return hashlib.blake2b(key.encode(), digest_size=16, person=b"qroute-compat").hexdigest()


def make_auth(secret: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256 of ``nonce`` under the shared ``secret``."""
    if not secret:
        raise ConfigError("the shared secret is empty; set a qroute secret on every instance")
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def check_auth(secret: bytes, nonce: bytes, auth: bytes) -> bool:
    return hmac.compare_digest(make_auth(secret, nonce), auth)  # constant time


def make_hello(
    instance_id: str,
    *,
    model_fingerprint: str,
    compat: str,
    corpus_name: str,
    corpus_version: str,
    secret: bytes,
    nonce: bytes | None = None,
) -> Hello:
    nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
    return Hello(
        WIRE_VERSION, instance_id, model_fingerprint, corpus_name, corpus_version, compat, nonce,
        make_auth(secret, b"hello" + nonce),
    )


def check_hello(
    hello: Hello,
    *,
    model_fingerprint: str,
    compat: str,
    corpus_name: str,
    corpus_version: str,
    secret: bytes,
) -> None:
    """Raise ``HandshakeMismatch`` naming the first thing that differs.

    Order: wire version (nothing else is comparable across versions), compatibility (model,
    latent width, block size, dtype, LSE base), corpus, then auth.
    """
    peer = f"peer {hello.instance_id!r}"
    if hello.wire_version != WIRE_VERSION:
        raise HandshakeMismatch(f"{peer}: wire version {hello.wire_version} != local {WIRE_VERSION}")
    if hello.model_fingerprint != model_fingerprint:
        raise HandshakeMismatch(
            f"{peer}: model fingerprint {hello.model_fingerprint!r} != local {model_fingerprint!r}"
        )
    if hello.compat_hash != compat:
        raise HandshakeMismatch(
            f"{peer}: compat hash differs (latent width, block size, dtype or LSE base) "
            f"{hello.compat_hash} != local {compat}"
        )
    if hello.corpus_name != corpus_name:
        raise HandshakeMismatch(f"{peer}: corpus {hello.corpus_name!r} != local {corpus_name!r}")
    if hello.corpus_version != corpus_version:
        raise HandshakeMismatch(
            f"{peer}: corpus version {hello.corpus_version!r} != local {corpus_version!r} "
            f"for corpus {corpus_name!r}"
        )
    if not check_auth(secret, b"hello" + hello.nonce, hello.auth):
        raise HandshakeMismatch(f"{peer}: auth failed (shared secret differs)")


def accept_hello(hello: Hello, *, instance_id: str, secret: bytes) -> HelloReply:
    """The owner's reply after ``check_hello`` passed; proves the owner knows the secret too."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    auth = make_auth(secret, b"reply" + hello.nonce + nonce)
    return HelloReply(WIRE_VERSION, True, "", instance_id, nonce, auth)


def check_hello_reply(reply: HelloReply, hello: Hello, *, secret: bytes) -> None:
    """Requester side: raise ``HandshakeMismatch`` unless the owner accepted and authenticated."""
    who = f"owner {reply.instance_id!r}" if reply.instance_id else "owner"
    if reply.wire_version != WIRE_VERSION:
        raise HandshakeMismatch(f"{who}: wire version {reply.wire_version} != local {WIRE_VERSION}")
    if not reply.accepted:
        raise HandshakeMismatch(f"{who} refused the handshake: {reply.reason}")
    if not check_auth(secret, b"reply" + hello.nonce + reply.nonce, reply.auth):
        raise HandshakeMismatch(f"{who}: auth failed (shared secret differs)")
