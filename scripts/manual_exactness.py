"""Exactness of qroute on vLLM: a sharded corpus over 2 instances vs one stock instance with the corpus in the prompt.

Usage (the CPU machine's limits: at most two vLLM instances at once, so the phases run one after another)::

    /work/vllmenv/bin/python scripts/manual_exactness.py [--model DIR] [--corpus-dir DIR] [--max-tokens 16]

1. Reference: one vLLM instance with qroute installed but not configured (stock attention, the plugin's RoPE
   fix), prompt = corpus token ids + question token ids, greedy, float32; generated tokens with their logprobs
   and the question's prompt logprobs.
2. qroute: two instances, the corpus placed over both (``blocks_per_chunk`` 4 by default); the corpus is
   prefilled chunk by chunk through ``/v1/completions`` exactly as the launcher does (``prefill_chunk``); then
   the question alone, once per mode (route, fetch, auto) on each instance; plus an unknown corpus, which
   must get HTTP 400.

Prints per mode: tokens identical?, max |delta logprob| over generated and question-prompt positions, the
response's qroute counters. Exit status 0 only if every mode is within ``--tol`` (1e-4) with identical tokens.
Every process started here runs in its own process group and is killed at the end.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qroute.core.config import COMPARED_MODES

REPO = Path(__file__).resolve().parent.parent
VLLM = Path(sys.executable).with_name("vllm")
SERVED = "tiny"
QUESTION = "\n# Which function computes the area of a circle, and what does Store.get return?\n"
MODES = tuple(str(m) for m in COMPARED_MODES)


def sample_corpus(root: Path) -> Path:
    """tests/conftest.py's SAMPLE_FILES (about 300 tokens), read without importing pytest."""
    tree = ast.parse((REPO / "tests" / "conftest.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SAMPLE_FILES")
    for rel, text in ast.literal_eval(node.value).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``vllm serve`` in its own process group, logging to a file."""

    def __init__(self, name: str, model: Path, port: int, log_dir: Path, extra: list[str], env: dict[str, str],
                 max_model_len: int = 2048):
        self.name, self.port = name, port
        self.log = log_dir / f"{name}.log"
        args = [str(VLLM), "serve", str(model), "--served-model-name", SERVED, "--port", str(port),
                "--enforce-eager", "--dtype", "float32", "--attention-backend", "CPU_MLA",  # not AMX_MLA: float32
                "--max-model-len", str(max_model_len), "--max-num-seqs", "4",
                *extra]
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **env}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                         start_new_session=True)  # fmt: skip
        print(f"[{name}] pid {self.proc.pid} port {port} log {self.log}", flush=True)

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"[{self.name}] exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise SystemExit(f"[{self.name}] not healthy after {timeout_s}s; see {self.log}")

    def complete(self, body: dict, expect_error: bool = False) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=json.dumps(
            {"model": SERVED, **body}).encode(), headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return {"status": r.status, **json.loads(r.read())}
        except urllib.error.HTTPError as exc:
            if not expect_error:
                raise SystemExit(f"[{self.name}] HTTP {exc.code}: {exc.read().decode()[:2000]}") from None
            return {"status": exc.code, **json.loads(exc.read() or b"{}")}

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # EngineCore / Worker children that outlived the parent
        except ProcessLookupError:
            pass


def greedy(server: Server, prompt: list[int], max_tokens: int, qroute: dict | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1, "prompt_logprobs": 1,
            "return_tokens_as_token_ids": True}
    if qroute is not None:
        body["kv_transfer_params"] = {"qroute": qroute}
    choice = (resp := server.complete(body))["choices"][0]
    lp = choice["logprobs"]
    prompt_lps = [None if d is None else d[str(tok)]["logprob"] for tok, d in zip(prompt, choice["prompt_logprobs"],
                                                                                      strict=True)]  # fmt: skip
    return {"tokens": [int(t.removeprefix("token_id:")) if t.startswith("token_id:") else t for t in lp["tokens"]],
            "text": choice["text"], "logprobs": lp["token_logprobs"], "prompt_logprobs": prompt_lps,
            "kv_transfer_params": resp.get("kv_transfer_params") or choice.get("kv_transfer_params")}  # fmt: skip


def compare(ref: dict, got: dict, num_question: int) -> dict:
    gen = max(abs(a - b) for a, b in zip(ref["logprobs"], got["logprobs"], strict=False))
    # Question prompt positions 1.. (position 0 has no logprob in the qroute request: nothing before it).
    prompt = max(abs(a - b) for a, b in zip(ref["prompt_logprobs"][-num_question + 1:], got["prompt_logprobs"][1:],
                                            strict=False))  # fmt: skip
    return {"tokens_identical": ref["text"] == got["text"] and ref["tokens"] == got["tokens"],
            "max_dlogprob_generated": gen, "max_dlogprob_prompt": prompt}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: the cached tiny float32 model)")
    ap.add_argument("--corpus-dir", type=Path, default=None, help="corpus dir (default: tests' SAMPLE_FILES)")
    ap.add_argument("--blocks-per-chunk", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--workdir", type=Path, default=None, help="logs and results (default: a temp dir)")
    ap.add_argument("--transport", default="tcp", choices=["tcp", "nixl"])
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from qroute.core.config import QRouteConfig, load_directory
    from qroute.core.corpus import load_encoder

    work = args.workdir or Path(tempfile.mkdtemp(prefix="qroute-exact-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from qroute.reference.tinymodel import build_tiny_model

        args.model = build_tiny_model(dtype="float32")
    corpus_dir = args.corpus_dir or sample_corpus(work / "corpus")
    extra = {"instance_id": "a", "instances": {"a": f"127.0.0.1:{free_port()}", "b": f"127.0.0.1:{free_port()}"},
             "corpus": {"name": "sample", "path": str(corpus_dir), "blocks_per_chunk": args.blocks_per_chunk},
             "transport": args.transport, "mode": "auto"}  # fmt: skip
    tokens, directory = load_directory(QRouteConfig.from_extra_config(extra), args.model)
    corpus_ids = [int(t) for t in tokens.token_ids]
    question = load_encoder(args.model)(QUESTION)
    print(f"corpus {directory.num_tokens} tokens, {len(directory.chunks)} chunks, owners "
          f"{[c.owners for c in directory.chunks]}; question {len(question)} tokens; workdir {work}", flush=True)

    max_model_len = max(2048, 1 << (len(corpus_ids) + len(question) + args.max_tokens).bit_length())
    servers: list[Server] = []
    try:
        ref_server = Server("reference", args.model, free_port(), work, [], {}, max_model_len)
        servers.append(ref_server)
        ref_server.wait_healthy()
        reference = greedy(ref_server, corpus_ids + question, args.max_tokens)
        ref_server.stop()
        servers.clear()

        env = {"QROUTE_SECRET": os.environ.get("QROUTE_SECRET", "manual-exactness-secret")}
        qroute = {}
        for name in ("a", "b"):
            ktc = {"kv_connector": "QRouteConnector", "kv_connector_module_path": "qroute.connectors.vllm",
                   "kv_role": "kv_both", "kv_connector_extra_config": {**extra, "instance_id": name}}  # fmt: skip
            qroute[name] = Server(f"qroute-{name}", args.model, free_port(), work, [
                "--kv-transfer-config", json.dumps(ktc),
                "--logits-processors", "qroute.plugin.vllm_validate:CorpusValidator"], env, max_model_len)  # fmt: skip
            servers.append(qroute[name])
        for server in qroute.values():
            server.wait_healthy()

        early = qroute["b"].complete({"prompt": question, "max_tokens": 1})["kv_transfer_params"]["qroute"]
        print(f"before the corpus prefill -> {early}", flush=True)
        ready_checked = "not ready" in early.get("error", "")
        t0 = time.monotonic()
        for chunk in directory.chunks:
            for owner in chunk.owners:
                resp = qroute[owner].complete({"prompt": corpus_ids[chunk.start:chunk.end], "max_tokens": 1,
                                               "kv_transfer_params": {"qroute": {"corpus": directory.name,
                                                                                 "prefill_chunk": chunk.chunk_id}}})
                got = (resp.get("kv_transfer_params") or {}).get("qroute", {})
                if got.get("stored_chunk") != chunk.chunk_id:
                    raise SystemExit(f"chunk {chunk.chunk_id} on {owner}: not stored: {got}")
                print(f"prefilled chunk {chunk.chunk_id} on {owner}: {got}", flush=True)
        print(f"corpus prefill took {time.monotonic() - t0:.1f}s", flush=True)

        bad = qroute["a"].complete({"prompt": question, "max_tokens": 1,
                                    "kv_transfer_params": {"qroute": {"corpus": "nope"}}}, expect_error=True)
        print(f"unknown corpus -> HTTP {bad['status']}: {json.dumps(bad)[:300]}", flush=True)

        # Bad requests are answered, not fatal: an error in kv_transfer_params, and the engine keeps serving.
        wrong = qroute["a"].complete({"prompt": [1, 2, 3], "max_tokens": 1, "kv_transfer_params": {
            "qroute": {"corpus": directory.name, "prefill_chunk": 0}}})["kv_transfer_params"]["qroute"]
        local = qroute["a"].complete({"prompt": question, "max_tokens": 1, "kv_transfer_params": {
            "qroute": {"corpus": directory.name, "mode": "local"}}})["kv_transfer_params"]["qroute"]
        print(f"bad prefill -> {wrong}\nmode local with remote blocks -> {local}", flush=True)
        ok = ready_checked and bad["status"] == 400 and "error" in wrong and "error" in local

        results = {}

        def record(key: str, got: dict) -> None:
            nonlocal ok
            row = {**compare(reference, got, len(question)), "counters": got["kv_transfer_params"]}
            results[key] = row
            ok &= row["tokens_identical"] and max(row["max_dlogprob_generated"], row["max_dlogprob_prompt"]) \
                <= args.tol
            print(f"{key}: {json.dumps(row)}", flush=True)

        for name, server in qroute.items():
            for mode in MODES:
                record(f"{name}/{mode}", greedy(server, question, args.max_tokens,
                                                {"corpus": directory.name, "mode": mode}))  # fmt: skip
        # Sensitivity: without the corpus the answer must move (else this check proves nothing).
        alone = greedy(qroute["a"], question, args.max_tokens, {"corpus": None})
        blind = compare(reference, alone, len(question))
        print(f"a/no-corpus (must differ): {json.dumps(blind)}", flush=True)
        ok &= max(blind["max_dlogprob_generated"], blind["max_dlogprob_prompt"]) > 100 * args.tol
        # The same requests batched together (mixed prefill and decode rows in one step).
        jobs = [(name, mode) for name in qroute for mode in MODES]
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = {job: pool.submit(greedy, qroute[job[0]], question, args.max_tokens,
                                        {"corpus": directory.name, "mode": job[1]}) for job in jobs}  # fmt: skip
        for (name, mode), future in futures.items():
            record(f"{name}/{mode}/concurrent", future.result())
        # An owner dies: the next request degrades to an error in its response, and the instance keeps serving.
        qroute["b"].stop()
        t1 = time.monotonic()
        dead = greedy(qroute["a"], question, 4, {"corpus": directory.name, "mode": "route"})["kv_transfer_params"]
        after = greedy(qroute["a"], question, 4, {"corpus": None})
        print(f"owner b killed -> {dead} ({time.monotonic() - t1:.1f}s); a still serves: {len(after['tokens'])} "
              "tokens", flush=True)  # fmt: skip
        ok &= "error" in dead["qroute"] and len(after["tokens"]) == 4
        (work / "results.json").write_text(json.dumps({"reference": reference, "results": results}, indent=1))
        print(f"{'PASS' if ok else 'FAIL'}: tol {args.tol}; results in {work / 'results.json'}", flush=True)
        return 0 if ok else 1
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
