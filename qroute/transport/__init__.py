"""Transports: one contract (``base.py``), three implementations, chosen by name.

``get_transport("loopback" | "tcp" | "nixl", **opts)`` imports the implementation on first use, so NIXL (and
its UCX settings) is loaded only by processes that ask for it.
"""

from __future__ import annotations

import importlib
from typing import Any

from qroute.errors import ConfigError
from qroute.transport.base import Connection, PendingCall, Server, SupportsOneSidedRead, SupportsRawPing, Transport

__all__ = ["Connection", "PendingCall", "Server", "SupportsOneSidedRead", "SupportsRawPing", "Transport",
           "available_transports", "get_transport", "register_transport"]

_REGISTRY: dict[str, tuple[str, str]] = {
    "loopback": ("qroute.transport.loopback", "LoopbackTransport"),
    "tcp": ("qroute.transport.tcp", "TcpTransport"),
    "nixl": ("qroute.transport.nixl", "NixlTransport"),
}


def register_transport(name: str, module_path: str, class_name: str) -> None:
    """Add (or replace) a transport; the module is imported only when it is first asked for."""
    _REGISTRY[name] = (module_path, class_name)


def available_transports() -> list[str]:
    return sorted(_REGISTRY)


def get_transport(name: str, **opts: Any) -> Transport:
    """A new transport instance; ``opts`` go to its constructor (see each class's docstring)."""
    try:
        module_path, class_name = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown transport {name!r}; set it to one of: {', '.join(available_transports())}") \
            from None
    cls = getattr(importlib.import_module(module_path), class_name)
    try:
        return cls(**opts)
    except TypeError as exc:
        raise ConfigError(f"transport {name!r}: bad option ({exc}); see {module_path}.{class_name}") from None
