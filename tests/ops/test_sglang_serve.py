"""Real ``sglang serve`` instances with qroute's SGLang plugin, on this CPU (SGLang's CPU engine, qroute's
``sgl_kernel`` stand-in, the tiny float32 MLA model), queried with the official ``openai`` client:

- ``--attention-backend qroute`` answers five completions in flight at once, a chat and a streamed completion with
  the same tokens as a stock ``--attention-backend torch_native`` instance (logprobs within ``check.TOLERANCE``);
  only the qroute instance says ``qroute active``;
- an instance that names a qroute config (``QROUTE_SGLANG_CONFIG``) but another attention backend refuses to
  start, saying why (SGLang itself only logs plugin errors).

Nothing here involves a corpus yet: the SGLang backend attends to each request's own tokens only (issue 13)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from qroute.errors import ConfigError, QRouteError
from qroute.ops.check import TOLERANCE
from qroute.ops.processes import stop_pid

PROMPTS = ["def area(kind, size):", "class Store:\n    def put(self, key, value):", "import math\n\n",
           "x = [i * i for i in range(10)]\nprint(", "return self.items.get(key, default)"]  # fmt: skip
PORTS = {"torch_native": 8530, "qroute": 8531}
REFUSED_PORT = 8532


@pytest.fixture(scope="module")
def sglang_instances(tiny_fp32_model, tmp_path_factory):
    from qroute.ops import sglang_serve

    try:
        sglang_serve.sglang_python()
    except ConfigError as exc:
        pytest.skip(str(exc))
    logs = tmp_path_factory.mktemp("sglang-logs")
    started = {}
    try:
        for backend, port in PORTS.items():
            command = sglang_serve.sglang_serve_command(tiny_fp32_model, port, backend=backend)
            started[backend] = (sglang_serve.start_sglang(command, sglang_serve.sglang_env(), logs / f"{backend}.log"),
                                logs / f"{backend}.log")  # fmt: skip
        urls = {backend: sglang_serve.wait_sglang(process, PORTS[backend], log)
                for backend, (process, log) in started.items()}  # fmt: skip
        yield {backend: (urls[backend], started[backend][1]) for backend in started}
    finally:
        for process, _ in started.values():
            stop_pid(process.pid)


def _answers(url: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)

    def completion(prompt: str):
        choice = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                           logprobs=1).choices[0]  # fmt: skip
        return choice.logprobs.tokens, choice.logprobs.token_logprobs

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # all in flight at once: they share engine steps
        completions = list(pool.map(completion, PROMPTS))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What does area do?"}],
                                          max_tokens=8, temperature=0).choices[0].message.content  # fmt: skip
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    return {"completions": completions, "chat": chat, "streamed": streamed}


def test_qroute_backend_answers_like_stock_torch_native(sglang_instances):
    stock, mine = (_answers(sglang_instances[b][0]) for b in ("torch_native", "qroute"))
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(mine["completions"], stock["completions"],
                                                                 strict=True):  # fmt: skip
        assert tokens == want_tokens and len(tokens) == 12
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) <= TOLERANCE
    assert mine["chat"] == stock["chat"] and mine["chat"]
    assert mine["streamed"] == stock["streamed"] == "".join(stock["completions"][0][0])
    assert len({tuple(t) for t, _ in stock["completions"]}) > 1  # the prompts really differ in what they produce


def test_only_the_qroute_instance_is_active(sglang_instances):
    logs = {b: log.read_text(errors="replace") for b, (_, log) in sglang_instances.items()}
    assert "qroute active: attention backend 'qroute'" in logs["qroute"]
    assert "qroute active" not in logs["torch_native"]


def test_a_configured_instance_without_the_qroute_backend_refuses_to_start(tiny_fp32_model, tmp_path,
                                                                           sglang_instances):  # fmt: skip
    from qroute.ops import sglang_serve

    config = tmp_path / "qroute.json"
    config.write_text(json.dumps({"corpus": {"name": "code", "path": str(tmp_path)}, "instance_id": "i0",
                                  "instances": {"i0": "127.0.0.1:9000"}}))  # fmt: skip
    log = tmp_path / "refused.log"
    command = sglang_serve.sglang_serve_command(tiny_fp32_model, REFUSED_PORT, backend="torch_native")
    process = sglang_serve.start_sglang(command, sglang_serve.sglang_env(QROUTE_SGLANG_CONFIG=str(config)), log)
    try:
        with pytest.raises(QRouteError, match="exited with code"):
            sglang_serve.wait_sglang(process, REFUSED_PORT, log, timeout_s=240)
    finally:
        stop_pid(process.pid)
    assert "the attention backends are 'torch_native' (prefill) and 'torch_native' (decode)" in log.read_text(
        errors="replace")
