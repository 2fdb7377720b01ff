"""The one handshake between a requester and an owner: versioned, hashed, authenticated both ways.

Three frames, once per connection (the transport sends them; ``transport/frames.py`` has their layout):

1. owner -> requester ``SERVER_HELLO``: magic, ``PROTOCOL_VERSION``, a fresh ``server_nonce``;
2. requester -> owner ``CLIENT_AUTH``: a fresh ``client_nonce``, ``client_proof``, the encoded ``wire.Hello``
   (``WIRE_VERSION``, model fingerprint, ``compat_key``, corpus name and version), transport extras;
3. owner -> requester ``WELCOME``: ``server_proof``, the encoded ``wire.HelloReply``, transport info and extras
   (or an ERROR frame saying why not).

Each proof is HMAC-SHA256 under the cluster's shared secret of a role label, **both** nonces and every
byte the frame carries (length-prefixed). So a recorded CLIENT_AUTH cannot be replayed (the owner's nonce is
new on every connection), a proof cannot be reflected (the labels differ), and neither side's hello can be
altered without the secret. The owner checks the proof, then the hello (``check_hello``: wire version first,
then compatibility, then corpus), before it answers anything; the requester checks the owner's proof, then
the reply (``check_hello_reply``).

Engine-free and torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from qroute.core import wire
from qroute.errors import ConfigError, HandshakeMismatch, WireError

__all__ = [
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "accept_hello",
    "check_hello",
    "check_hello_reply",
    "check_secret",
    "client_proof",
    "compat_differences",
    "compat_key",
    "make_hello",
    "new_nonce",
    "pack_fields",
    "server_proof",
    "unpack_fields",
    "verify_proof",
]

# 1: first version (HMAC-SHA256 both ways, fields framing).
# 2: proofs bind both nonces and everything their frame carries (hello, reply, info, extras).
PROTOCOL_VERSION = 2
NONCE_BYTES = 32
_FIELD_LEN = 4


# ---- authentication ---------------------------------------------------------------------------------------


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def check_secret(secret: object) -> bytes:
    if not isinstance(secret, bytes | bytearray) or not secret:
        raise ConfigError("secret: need non-empty bytes (the shared secret of the qroute cluster)")
    return bytes(secret)


def _proof(secret: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes, carried: tuple[bytes, ...]) -> bytes:
    return hmac.new(secret, label + pack_fields(server_nonce, client_nonce, *carried), hashlib.sha256).digest()


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, *carried: bytes) -> bytes:
    """The requester's proof that it knows the secret, over both nonces and what CLIENT_AUTH carries."""
    return _proof(secret, b"qroute/requester", server_nonce, client_nonce, carried)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, *carried: bytes) -> bytes:
    """The owner's proof, over both nonces and what WELCOME carries."""
    return _proof(secret, b"qroute/owner", server_nonce, client_nonce, carried)


def verify_proof(expected: bytes, got: bytes, who: str) -> None:
    if not hmac.compare_digest(expected, got):  # constant time
        raise HandshakeMismatch(f"{who} failed to prove the shared secret (check both sides' secret)")


def pack_fields(*items: bytes) -> bytes:
    """Length-prefixed byte strings, for handshake messages (never the hot path)."""
    return b"".join(len(item).to_bytes(_FIELD_LEN, "big") + bytes(item) for item in items)


def unpack_fields(data: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + _FIELD_LEN > len(data):
            raise WireError(f"handshake message truncated at byte {pos} of {len(data)}")
        n = int.from_bytes(data[pos:pos + _FIELD_LEN], "big")
        pos += _FIELD_LEN
        if pos + n > len(data):
            raise WireError(f"handshake field of {n} bytes overruns the message ({len(data)} bytes)")
        out.append(bytes(data[pos:pos + n]))
        pos += n
    if pos != len(data):
        raise WireError(f"handshake message has {len(data) - pos} trailing bytes")
    return out


# ---- what must match --------------------------------------------------------------------------------------


def compat_key(model_fingerprint: str, latent_width: int, block_size: int, dtype: str, lse_base: str = "e",
               rope: str = "interleaved") -> str:
    """Everything two instances must agree on to exchange latent rows and partials, as a readable canonical key
    (``check_hello`` names each field that differs): latent width, block size, row format (a wire dtype name, e.g.
    ``"float32"``, or ``"fp8_ds_mla"``, DeepSeek-V3.2's FP8 row), LSE base, the pair layout of the stored rows'
    RoPE half (``"interleaved"`` or ``"neox"``: engines rope the same checkpoint differently, vLLM always
    interleaved, SGLang as ``rope_interleave`` says), and a digest of the model."""
    if dtype not in wire.WIRE_DTYPES and dtype != "fp8_ds_mla":
        raise ConfigError(f"dtype={dtype!r} must be one of {[*sorted(wire.WIRE_DTYPES), 'fp8_ds_mla']}")
    if lse_base not in ("e", "2"):
        raise ConfigError(f"lse_base={lse_base!r} must be 'e' or '2'")
    if rope not in ("interleaved", "neox"):
        raise ConfigError(f"rope={rope!r} must be 'interleaved' or 'neox'")
    if latent_width <= 0 or block_size <= 0:
        raise ConfigError(f"latent_width={latent_width} and block_size={block_size} must be > 0")
    model = hashlib.blake2b(model_fingerprint.encode(), digest_size=8, person=b"qroute-compat").hexdigest()
    return (f"latent_width={latent_width},block_size={block_size},dtype={dtype},lse_base={lse_base},rope={rope},"
            f"model={model}")


def _compat_fields(key: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in key.split(",") if "=" in item)


def compat_differences(theirs: str, ours: str) -> str:
    """What differs between two compatibility keys, field by field ("dtype bfloat16 != local float32")."""
    a, b = _compat_fields(theirs), _compat_fields(ours)
    named = [f"{name} {a.get(name)} != local {b.get(name)}"
             for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]  # fmt: skip
    return ", ".join(named) or f"{theirs!r} != local {ours!r}"


def make_hello(instance_id: str, *, model_fingerprint: str, compat: str, corpus_name: str,
               corpus_version: str) -> wire.Hello:
    return wire.Hello(wire.WIRE_VERSION, instance_id, model_fingerprint, corpus_name, corpus_version, compat)


def check_hello(hello: wire.Hello, *, model_fingerprint: str, compat: str, corpus_name: str,
                corpus_version: str) -> None:
    """Raise ``HandshakeMismatch`` naming the first thing that differs.

    Order: wire version (nothing else is comparable across versions), model, compatibility (latent width,
    block size, dtype, LSE base), then corpus.
    """
    peer = f"peer {hello.instance_id!r}"
    if hello.wire_version != wire.WIRE_VERSION:
        raise HandshakeMismatch(f"{peer}: wire version {hello.wire_version} != local {wire.WIRE_VERSION}")
    if hello.model_fingerprint != model_fingerprint:
        raise HandshakeMismatch(f"{peer}: model fingerprint {hello.model_fingerprint!r} != local {model_fingerprint!r}")
    if hello.compat_hash != compat:
        raise HandshakeMismatch(f"{peer}: incompatible rows: {compat_differences(hello.compat_hash, compat)}")
    if hello.corpus_name != corpus_name:
        raise HandshakeMismatch(f"{peer}: corpus {hello.corpus_name!r} != local {corpus_name!r}")
    if hello.corpus_version != corpus_version:
        raise HandshakeMismatch(f"{peer}: corpus version {hello.corpus_version!r} != local {corpus_version!r} "
                                f"for corpus {corpus_name!r}")  # fmt: skip


def accept_hello(instance_id: str) -> wire.HelloReply:
    """The owner's reply once ``check_hello`` passed."""
    return wire.HelloReply(wire.WIRE_VERSION, True, "", instance_id)


def check_hello_reply(reply: wire.HelloReply) -> None:
    """Requester side: raise ``HandshakeMismatch`` unless the owner accepted (its proof was checked already)."""
    who = f"owner {reply.instance_id!r}" if reply.instance_id else "owner"
    if reply.wire_version != wire.WIRE_VERSION:
        raise HandshakeMismatch(f"{who}: wire version {reply.wire_version} != local {wire.WIRE_VERSION}")
    if not reply.accepted:
        raise HandshakeMismatch(f"{who} refused the handshake: {reply.reason}")
