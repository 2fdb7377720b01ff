"""The qroute exception hierarchy.

Every failure qroute raises on purpose is a ``QRouteError``; callers at the engine boundary catch
that one class and report the failure as data.
"""

import enum


class QRouteError(Exception):
    """Base of every error qroute raises on purpose."""


class ConfigError(QRouteError, ValueError):
    """A configuration value is missing or invalid; the message names the key to change."""


class GeometryError(ConfigError):
    """A model config does not describe an MLA model qroute can serve."""


class CorpusError(QRouteError):
    """A corpus cannot be built, is unknown, or does not match its directory."""


class WireError(QRouteError, ValueError):
    """A message is malformed, oversized or fails validation. Decoders raise only this."""


class HandshakeMismatch(QRouteError):
    """Two instances disagree on protocol version, model, corpus or credentials."""


class TransportError(QRouteError):
    """A transfer failed."""


class TransportTimeout(TransportError, TimeoutError):
    """A remote call did not finish before its deadline."""


class RemoteDisconnected(TransportError, ConnectionError):
    """The peer went away."""


class ErrorCode(enum.IntEnum):
    """Every typed failure a peer reports: one enum for the transport's ERROR frames and the owner's
    ``wire.ErrorReply``. Values are on the wire: never renumber, only append."""

    # the transport (ERROR frames, transport/frames.py)
    HANDLER = 1  # the owner's handler raised
    REFUSED = 2  # over the owner's size limit, or refused before the handler ran
    HANDSHAKE = 3  # authentication or the hello failed
    PROTOCOL = 4  # an unexpected or malformed frame
    # the owner service (wire.ErrorReply)
    UNKNOWN_CORPUS = 10
    BAD_REQUEST = 11
    OVERLOADED = 12
    DEADLINE = 13
    INTERNAL = 14
    NOT_READY = 15  # the owner holds the blocks but has not stored their rows (yet, or again after a restart)

    def __str__(self) -> str:
        return self.name.lower()


class RemoteError(QRouteError):
    """The peer answered with a typed error (see ``wire.ErrorReply``)."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
