"""The completion-error middleware as vLLM's server runs it: a Starlette app with the middleware added
(``app.add_middleware``, what ``vllm serve --middleware`` does for a class), driven over ASGI by httpx.
(Through a real ``vllm serve``: tests/ops/test_failures.py.)"""

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from qroute.plugin.vllm_http import CorpusErrorMiddleware, corpus_error

FAILED = {"choices": [{"text": "x"}], "kv_transfer_params": {"qroute": {"route": 0, "error": "owner 'i1' is down"}}}
SERVED = {"choices": [{"text": "x"}], "kv_transfer_params": {"qroute": {"route": 4}}}


def app_answering(reply, *, stream: bool = False):
    async def endpoint(request):
        if stream:
            async def events():
                yield f"data: {json.dumps(reply)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse(reply)

    app = Starlette(routes=[Route(path, endpoint, methods=["POST"])
                            for path in ("/v1/completions", "/v1/chat/completions", "/v1/other")])  # fmt: skip
    app.add_middleware(CorpusErrorMiddleware)
    return app


def post(app, path="/v1/completions"):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(path, json={"prompt": [1]})
    return asyncio.run(go())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_completion_that_lost_its_corpus_is_a_500_with_the_reason(path):
    response = post(app_answering(FAILED), path)
    assert response.status_code == 500
    body = response.json()
    assert "choices" not in body and body["error"]["code"] == 500
    assert "owner 'i1' is down" in body["error"]["message"]
    assert int(response.headers["content-length"]) == len(response.content)


def test_a_served_completion_passes_unchanged():
    response = post(app_answering(SERVED))
    assert response.status_code == 200 and response.json() == SERVED


def test_other_paths_and_streams_pass_unchanged():
    assert post(app_answering(FAILED), "/v1/other").status_code == 200
    streamed = post(app_answering(FAILED, stream=True))
    assert streamed.status_code == 200 and "owner 'i1' is down" in streamed.text


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'{"kv_transfer_params": null}',
                                  b'{"kv_transfer_params": {"qroute": "x"}}',
                                  b'{"kv_transfer_params": {"qroute": {}}}'])
def test_bodies_without_a_qroute_error_have_none(body):
    assert corpus_error(body) is None
