"""qroute's SGLang plugin against the real ``sglang`` package: ``sglang_checks.py`` in a pytest process of the SGLang
venv (``.sgl-venv``, made by ``make test``; SGLang's torch cannot share a process with vLLM's CPU build)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_the_plugin_against_the_real_sglang_package():
    from qroute.errors import ConfigError
    from qroute.ops.sglang_serve import sglang_env, sglang_python

    try:
        python = sglang_python()
    except ConfigError as exc:
        pytest.skip(str(exc))
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           str(HERE / "sglang_checks.py")], capture_output=True, text=True, env=sglang_env(),
                          timeout=600, cwd=HERE.parents[1])  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 4 and "skipped" not in summary, summary
