"""An ASGI middleware for ``vllm serve`` (``--middleware qroute.plugin.vllm_http.CorpusErrorMiddleware``): a
completion whose corpus attention failed is an HTTP 500, not a 200 computed without the corpus.

Why a middleware: vLLM ends a request that a KV connector reports failed with FINISHED_ERROR (HTTP 500) only from
its second step on (the scheduler fails a request for load errors in blocks computed *before* the step, none on the
first; vllm/v1/core/sched/scheduler.py ``_update_requests_with_invalid_blocks``), so a request that ends on its first
step (``max_tokens=1``) and lost its corpus there would be answered with its token and a 200. qroute's connector
puts the reason under ``kv_transfer_params.qroute.error`` of that answer; this middleware turns such a JSON
response of ``/v1/completions`` or ``/v1/chat/completions`` into vLLM's error shape with status 500 and the reason.

Streamed responses pass untouched: vLLM sends no ``kv_transfer_params`` in a stream, so a streamed request that
ends on its failed first step still ends with its token (docs/vllm-connector.md, "Known gaps"); one that goes on
is failed by vLLM at its next step (an error event in the stream).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["CorpusErrorMiddleware", "corpus_error"]

PATHS = ("/v1/completions", "/v1/chat/completions")


def corpus_error(body: bytes) -> str | None:
    """The qroute error of a completion response body, if it has one."""
    try:
        reply = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    params = reply.get("kv_transfer_params") if isinstance(reply, dict) else None
    qroute = params.get("qroute") if isinstance(params, dict) else None
    error = qroute.get("error") if isinstance(qroute, dict) else None
    return str(error) if error else None


class CorpusErrorMiddleware:
    """Pure ASGI (no framework): buffers only non-streamed JSON responses of the completion paths."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def buffered_send(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"application/json"):
                    start = message  # hold it: the status may change
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await _send_checked(send, start, b"".join(chunks))
                return
            await send(message)

        await self.app(scope, receive, buffered_send)


async def _send_checked(send: Any, start: dict, body: bytes) -> None:
    error = corpus_error(body) if start["status"] == 200 else None
    if error is not None:
        body = json.dumps({"error": {"message": f"qroute: the request's corpus attention failed: {error}",
                                     "type": "InternalServerError", "param": None, "code": 500}}).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        start = {**start, "status": 500, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
