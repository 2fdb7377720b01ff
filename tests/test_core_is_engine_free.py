"""The core must import neither vllm nor sglang (STYLE 1); cost model and placement not even torch."""

import subprocess
import sys

import pytest

CORE = ["qroute.core.geometry", "qroute.core.costmodel", "qroute.core.corpus", "qroute.core.wire", "qroute.numerics.attention",
        "qroute.numerics.rope", "qroute.errors", "qroute.ops.cli"]
TORCH_FREE = ["qroute.core.geometry", "qroute.core.costmodel", "qroute.core.corpus", "qroute.core.wire"]

BLOCKER = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
importlib.import_module({module!r})
"""


def _import_blocked(module: str, blocked: set[str]) -> subprocess.CompletedProcess:
    code = BLOCKER.format(module=module, blocked=blocked)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", CORE)
def test_core_imports_without_engines(module):
    result = _import_blocked(module, {"vllm", "sglang"})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", TORCH_FREE)
def test_host_side_core_imports_without_torch(module):
    result = _import_blocked(module, {"vllm", "sglang", "torch"})
    assert result.returncode == 0, result.stderr


def test_blocker_really_blocks():
    result = _import_blocked("vllm", {"vllm"})
    assert result.returncode != 0 and "blocked" in result.stderr
