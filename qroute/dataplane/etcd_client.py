"""A small client of etcd's v3 API over its JSON gateway (``/v3/kv/*``, ``/v3/lease/*``): what membership needs.

etcd is the coordination service (NIXL uses it for metadata exchange too); its gRPC gateway speaks JSON over plain
HTTP, so no client library is needed. Keys and values are bytes, base64 on the wire. Every call has a timeout and
raises ``EtcdError`` naming the endpoint when etcd cannot be reached or refuses.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from qroute.errors import QRouteError

__all__ = ["EtcdClient", "EtcdError", "prefix_end"]


class EtcdError(QRouteError):
    """etcd could not be reached, or refused a call."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix`` (etcd's convention: the prefix with its
    last byte incremented)."""
    key = bytearray(prefix)
    while key:
        if key[-1] < 0xFF:
            key[-1] += 1
            return bytes(key)
        key.pop()
    return b"\x00"  # every key


class EtcdClient:
    def __init__(self, endpoint: str, *, timeout_s: float = 2.0):
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise EtcdError(f"etcd at {self.endpoint} refused {path}: HTTP {exc.code} "
                            f"{exc.read()[:200].decode(errors='replace')}") from None  # fmt: skip
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise EtcdError(f"etcd at {self.endpoint} is unreachable ({path}): {exc}") from None

    def version(self) -> str:
        try:
            with urllib.request.urlopen(self.endpoint + "/version", timeout=self.timeout_s) as response:
                return json.loads(response.read())["etcdserver"]
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            raise EtcdError(f"etcd at {self.endpoint} is unreachable: {exc}") from None

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Set ``key``; with ``lease``, the key goes when the lease expires or is revoked. The new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._call("/v3/kv/put", body)["header"]["revision"])

    def get_prefix(self, prefix: bytes) -> dict[bytes, bytes]:
        """Every key under ``prefix`` and its value."""
        reply = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return {base64.b64decode(kv["key"]): base64.b64decode(kv.get("value", "")) for kv in reply.get("kvs", [])}

    def delete(self, key: bytes) -> int:
        """Delete ``key``; how many keys went."""
        return int(self._call("/v3/kv/deleterange", {"key": _b64(key)}).get("deleted", 0))

    def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""
        reply = self._call("/v3/lease/grant", {"TTL": int(ttl_s)})
        if reply.get("error"):
            raise EtcdError(f"etcd at {self.endpoint} refused a lease: {reply['error']}")
        return int(reply["ID"])

    def keepalive(self, lease: int) -> bool:
        """Renew ``lease``; False when it has expired already (its keys are gone)."""
        reply = self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(reply.get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        """End ``lease`` now: its keys go at once."""
        self._call("/v3/lease/revoke", {"ID": str(lease)})
