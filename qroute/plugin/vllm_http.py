"""An ASGI middleware for ``vllm serve`` (``--middleware qroute.plugin.vllm_http.CorpusErrorMiddleware``): a
completion whose corpus attention failed is an HTTP 500, not a 200 computed without the corpus.

Why a middleware: vLLM ends a request that a KV connector reports failed with FINISHED_ERROR (HTTP 500) only from
its second step on (the scheduler fails a request for load errors in blocks computed *before* the step, none on the
first; vllm/v1/core/sched/scheduler.py ``_update_requests_with_invalid_blocks``), so a request that ends on its first
step (``max_tokens=1``) and lost its corpus there would be answered with its token and a 200. qroute's connector
puts the reason under ``kv_transfer_params.qroute.error`` of that answer; this middleware turns such a JSON
response of ``/v1/completions`` or ``/v1/chat/completions`` into vLLM's error shape with status 500 and the reason.

A streamed request cannot be checked so (vLLM sends no ``kv_transfer_params`` in a stream): one that goes on past
its first step is failed by vLLM at its next step (an error event in the stream), but one that ends there
(``max_tokens`` or ``max_completion_tokens`` 1) would end with its token. So such a request is served unstreamed
and its one answer checked as above, then sent as the stream the client asked for (one chunk per choice, a usage
chunk where ``stream_options.include_usage`` asks for it, ``[DONE]``): the client sees a stream, or the 500.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["CorpusErrorMiddleware", "as_stream", "corpus_error", "one_step_stream"]

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


def one_step_stream(request: object) -> bool:
    """Whether a request body asks for a stream that ends on its first step (one token per choice)."""
    return isinstance(request, dict) and request.get("stream") is True and \
        any(request.get(key) == 1 for key in ("max_tokens", "max_completion_tokens"))  # fmt: skip


def as_stream(reply: dict, *, chat: bool, include_usage: bool) -> bytes:
    """The server-sent events a streamed request would have got for the unstreamed ``reply`` of a one-step request:
    one chunk per choice (its text, or its message as the delta), the usage chunk if asked for, then ``[DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": reply.get("id"), "object": kind, "created": reply.get("created"), "model": reply.get("model")}
    events = []
    for choice in reply.get("choices") or []:
        if chat:
            message = choice.get("message") or {}
            delta = {k: v for k, v in message.items() if v not in (None, [])}
            out = {"index": choice.get("index", 0), "delta": delta, "logprobs": choice.get("logprobs"),
                   "finish_reason": choice.get("finish_reason")}  # fmt: skip
        else:
            out = {k: choice.get(k) for k in ("index", "text", "logprobs", "finish_reason", "stop_reason")}
        events.append({**base, "choices": [out]})
    if include_usage:
        events.append({**base, "choices": [], "usage": reply.get("usage")})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


class CorpusErrorMiddleware:
    """Pure ASGI (no framework): buffers only non-streamed JSON responses of the completion paths, and serves a
    one-step stream unstreamed (``one_step_stream``)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST":
            body, replayed = await _read_body(receive)
            try:
                request = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                request = None
            if one_step_stream(request):
                await self._one_step_stream(scope, receive, send, request)  # the app gets the body it rewrites
                return
            receive = replayed
        await self._checked(scope, receive, send)

    async def _one_step_stream(self, scope: dict, receive: Any, send: Any, request: dict) -> None:
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        unstreamed = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
        body = json.dumps(unstreamed).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, _replay(body, receive), capture)
        reply = b"".join(chunks)
        if start.get("status") != 200 or corpus_error(reply) is not None:
            await _send_checked(send, start, reply)  # the 500 with the reason, or the server's own error as is
            return
        events = as_stream(json.loads(reply), chat=scope["path"].endswith("chat/completions"),
                           include_usage=include_usage)  # fmt: skip
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"content-length", str(len(events)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": events, "more_body": False})

    async def _checked(self, scope: dict, receive: Any, send: Any) -> None:
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


async def _read_body(receive: Any) -> tuple[bytes, Any]:
    """The whole request body, and a ``receive`` that hands it to the app again."""
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts), _replay(b"".join(parts), receive, first=message)
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts), _replay(b"".join(parts), receive)


def _replay(body: bytes, receive: Any, first: dict | None = None) -> Any:
    pending = [{"type": "http.request", "body": body, "more_body": False}] + ([first] if first else [])

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _send_checked(send: Any, start: dict, body: bytes) -> None:
    error = corpus_error(body) if start["status"] == 200 else None
    if error is not None:
        body = json.dumps({"error": {"message": f"qroute: the request's corpus attention failed: {error}",
                                     "type": "InternalServerError", "param": None, "code": 500}}).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        start = {**start, "status": 500, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
