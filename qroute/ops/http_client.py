"""The HTTP calls qroute's tools make to engine instances (vLLM's and SGLang's OpenAI servers): plain ``urllib``,
JSON in and out, HTTP errors returned or raised as ``QRouteError``, never hidden."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from qroute.errors import QRouteError

__all__ = ["completion", "healthy", "http_json", "token_ids_of"]


def http_json(url: str, body: dict[str, Any] | None = None, timeout_s: float = 120.0) -> tuple[int, dict]:
    """POST ``body`` (or GET) and return (status, JSON body); HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"error": raw.decode(errors="replace")}


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def token_ids_of(tokens: list[str]) -> list[int]:
    """Token ids of an OpenAI response's logprob tokens under ``return_tokens_as_token_ids`` ("token_id:<id>")."""
    return [int(t.rsplit(":", 1)[1]) for t in tokens]


def completion(
    url: str,
    prompt: list[int],
    *,
    max_tokens: int,
    kv_transfer_params: dict | None = None,
    logprobs: bool = False,
    extra: dict | None = None,
    timeout_s: float = 300.0,
) -> dict:
    """A greedy /v1/completions call with a token-id prompt; raises QRouteError on an HTTP error."""
    body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    if logprobs:
        body["logprobs"] = 1
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    body.update(extra or {})
    status, reply = http_json(url + "/completions", body, timeout_s)
    if status != 200:
        raise QRouteError(f"{url} answered HTTP {status}: {reply}")
    return reply
