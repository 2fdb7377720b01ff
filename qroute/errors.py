"""The qroute exception hierarchy.

Every failure qroute raises on purpose is a ``QRouteError``; callers at the engine boundary catch
that one class and report the failure as data.
"""


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


class RemoteError(QRouteError):
    """The peer answered with a typed error (see ``wire.ErrorReply``)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
