"""The stock NIXL prefill/decode pair's OpenAI endpoint for ``qroute bench ab``: a proxy in the manner of vLLM's
``tests/v1/kv_connector/nixl_integration/toy_proxy_server.py`` (written here, not copied).

``POST /v1/completions``: the prompt goes to the prefill instance P with ``max_tokens: 1`` and
``kv_transfer_params: {do_remote_decode: true}``; P computes the prompt's KV and answers with the parameters that
let the decode instance D pull it over NIXL; the same request, with those parameters, goes to D, whose answer
(streamed or not) is the client's. ``GET /health`` is healthy when both are. Run as
``python -m qroute.bench.pd_proxy --prefill URL --decode URL --port N``.
"""

from __future__ import annotations

import argparse

import httpx
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the endpoints' annotations here
from fastapi.responses import JSONResponse, StreamingResponse

__all__ = ["build_app", "prefill_params"]

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip


def prefill_params(request: dict) -> dict:
    """P's request: the client's, unstreamed, one token, asking P to keep the KV for a remote decode."""
    body = {k: v for k, v in request.items() if k not in ("stream", "stream_options", "min_tokens")}
    return {**body, "max_tokens": 1, "kv_transfer_params": dict(PREFILL_PARAMS)}


def build_app(prefill: str, decode: str, timeout_s: float = 600.0) -> FastAPI:
    app = FastAPI()
    client = httpx.AsyncClient(timeout=timeout_s)

    @app.get("/health")
    async def health():
        ok = all([(await client.get(u.removesuffix("/v1") + "/health")).status_code == 200 for u in (prefill, decode)])
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        first = await client.post(prefill + "/completions", json=prefill_params(body))
        if first.status_code != 200:
            return JSONResponse(first.json(), status_code=first.status_code)
        params = first.json().get("kv_transfer_params")
        if not params:
            return JSONResponse({"error": {"message": "the prefill instance returned no kv_transfer_params "
                                           "(is it a NixlConnector kv_producer?)"}}, status_code=502)  # fmt: skip
        decode_body = {**body, "kv_transfer_params": params}
        if not body.get("stream"):
            second = await client.post(decode + "/completions", json=decode_body)
            return JSONResponse(second.json(), status_code=second.status_code)

        async def relay():
            async with client.stream("POST", decode + "/completions", json=decode_body) as reply:
                async for chunk in reply.aiter_raw():
                    yield chunk

        return StreamingResponse(relay(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", required=True, help="P's OpenAI base URL (http://host:port/v1)")
    parser.add_argument("--decode", required=True, help="D's OpenAI base URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(build_app(args.prefill, args.decode), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
