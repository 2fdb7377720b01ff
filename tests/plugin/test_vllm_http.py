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

from qroute.plugin.vllm_http import CorpusErrorMiddleware, corpus_error, one_step_stream

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


def app_recording(reply, seen: list):
    """An app that records the request body it got and answers ``reply`` unstreamed (what vLLM does for it)."""
    async def endpoint(request):
        seen.append(await request.json())
        return JSONResponse(reply)

    app = Starlette(routes=[Route(path, endpoint, methods=["POST"])
                            for path in ("/v1/completions", "/v1/chat/completions")])  # fmt: skip
    app.add_middleware(CorpusErrorMiddleware)
    return app


def post_json(app, path, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(path, json=body)
    return asyncio.run(go())


def test_a_one_token_stream_that_lost_its_corpus_is_a_500():
    seen: list = []
    body = {"prompt": [1], "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}}
    response = post_json(app_recording(FAILED, seen), "/v1/completions", body)
    assert response.status_code == 500 and "owner 'i1' is down" in response.json()["error"]["message"]
    assert seen == [{"prompt": [1], "max_tokens": 1}]  # served unstreamed, so that its answer could be checked


def test_a_one_token_stream_is_sent_as_a_stream():
    reply = {"id": "c1", "created": 5, "model": "tiny", "usage": {"completion_tokens": 1},
             "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length", "stop_reason": None}],
             "kv_transfer_params": {"qroute": {"route": 4}}}  # fmt: skip
    seen: list = []
    body = {"prompt": [1], "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}}
    response = post_json(app_recording(reply, seen), "/v1/completions", body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    first, usage = (json.loads(e) for e in events[:-1])
    assert first["object"] == "text_completion" and first["choices"][0]["text"] == "x" and first["id"] == "c1"
    assert usage["choices"] == [] and usage["usage"] == {"completion_tokens": 1}
    chat = {"id": "c2", "created": 5, "model": "tiny", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "y", "tool_calls": []}, "logprobs": None,
         "finish_reason": "length"}]}  # fmt: skip
    response = post_json(app_recording(chat, seen), "/v1/chat/completions",
                         {"messages": [], "max_completion_tokens": 1, "stream": True})
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert len(events) == 2 and json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": "y"}
    assert json.loads(events[0])["object"] == "chat.completion.chunk"
    # a stream of more than one step is left to vLLM (it fails those in the stream)
    assert not one_step_stream({"max_tokens": 2, "stream": True}) and not one_step_stream({"max_tokens": 1})
