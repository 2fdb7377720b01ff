"""The Triton kernels: their interpreter checks (``interpreted_triton_mla.py``; vLLM's Triton MLA kernel as the CUDA
backend's own part, ``interpreted_vllm_cuda.py``) in a pytest process of their own
with ``TRITON_INTERPRET=1`` from its start, and each kernel compiled for sm_90 without a GPU, which catches what
the interpreter does not (dot sizes, shared memory). What has run where: docs/kernels.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_the_kernels_match_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(HERE / "interpreted_triton_mla.py"), str(HERE / "interpreted_vllm_cuda.py")],
                          capture_output=True, text=True, env=env,
                          timeout=540, cwd=HERE.parents[1])  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 26 and "skipped" not in summary, summary


COMPILE = """
import os, tempfile
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qroute.numerics import triton_mla as k
target = GPUTarget("cuda", 90, 32)
for dtype, cache in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "u8")):
    sig = {"q_nope": f"*{dtype}", "q_pe": f"*{dtype}", "cache": f"*{cache}", "slots": "*i64", "out": "*fp32",
           "lse": "*fp32", "M": "i32", "S": "i32", "scale": "fp32", "stride_q_nope": "i32", "stride_q_pe": "i32",
           "stride_cache": "i32", "stride_out": "i32", "R": "constexpr", "P": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "UPCAST": "constexpr", "FP8": "constexpr"}
    consts = {"R": 512, "P": 64, "BLOCK_M": k.BLOCK_M, "BLOCK_N": k.BLOCK_N, "UPCAST": False, "FP8": cache == "u8"}
    compiled = triton.compile(ASTSource(k._partial_kernel, sig, consts), target=target)
    print("partial", dtype if cache != "u8" else "fp8_ds_mla", compiled.metadata.shared)
sig = {"outs": "*fp32", "lses": "*fp32", "out": "*fp32", "lse": "*fp32", "K": "i32", "M": "i32",
       "stride_part_out": "i32", "stride_part_lse": "i32", "stride_row": "i32", "R": "constexpr",
       "BLOCK_M": "constexpr"}
compiled = triton.compile(ASTSource(k._merge_kernel, sig, {"R": 512, "BLOCK_M": k.BLOCK_M}), target=target)
print("merge fp32", compiled.metadata.shared)
"""


def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    compiled = [line.split()[:2] for line in lines if line]
    assert compiled == [["partial", "fp32"], ["partial", "bf16"], ["partial", "fp8_ds_mla"], ["merge", "fp32"]]
