"""``sglang serve`` instances for qroute's SGLang plugin: the command, the environment and a start that waits.

SGLang lives in a venv of its own (it pins another torch build than vLLM's CPU build): ``.sgl-venv`` at the
repository root, made by ``make sglang-venv`` (``make test`` makes it), or the interpreter named by
``QROUTE_SGLANG_PYTHON``. On a machine without CUDA the instance runs SGLang's CPU engine
(``SGLANG_USE_CPU_ENGINE=1``) with qroute's pure-torch ``sgl_kernel`` stand-in first on its ``PYTHONPATH``
(``qroute.plugin.sglang_cpu_kernel``; shared/notes/sglang-cpu.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from qroute.errors import ConfigError, QRouteError
from qroute.ops.http_client import healthy
from qroute.ops.processes import spawn
from qroute.plugin.sglang_cpu_kernel import CPU_KERNEL_PATH

__all__ = ["qroute_instance", "sglang_env", "sglang_python", "sglang_serve_command", "start_sglang", "wait_sglang"]

REPO = Path(__file__).resolve().parents[2]


def sglang_python() -> Path:
    """The Python of the SGLang venv (see the module docstring); a clear error where there is none."""
    named = os.environ.get("QROUTE_SGLANG_PYTHON")
    python = Path(named) if named else REPO / ".sgl-venv" / "bin" / "python"
    if not python.exists():
        raise ConfigError(f"no SGLang environment at {python}: run `make sglang-venv` (or set QROUTE_SGLANG_PYTHON)")
    return python


def sglang_env(*, cpu: bool = True, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    if cpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CPU_KERNEL_PATH), env.get("PYTHONPATH", "")) if p)
    return env


def sglang_serve_command(model_dir: Path, port: int, *, backend: str, dtype: str = "float32",
                         max_total_tokens: int = 8192, context_length: int = 4096,
                         max_running_requests: int = 4, cpu: bool = True, host: str = "127.0.0.1",
                         extra: list[str] | None = None) -> list[str]:  # fmt: skip
    """``sglang serve`` as the notes found it working on CPU (eager, no overlap schedule, no warm-up); ``extra``
    last (argparse: the last of a repeated flag holds). ``--sleep-on-idle``: SGLang's scheduler otherwise polls at
    100 % of a core while it has nothing to do, which starves the instances that do on a small machine."""
    return [
        str(sglang_python().parent / "sglang"), "serve", "--model-path", str(model_dir),
        "--device", "cpu" if cpu else "cuda", "--attention-backend", backend, "--dtype", dtype,
        "--disable-overlap-schedule", "--skip-server-warmup", "--disable-cuda-graph", "--sleep-on-idle",
        "--max-total-tokens", str(max_total_tokens), "--context-length", str(context_length),
        "--max-running-requests", str(max_running_requests), "--served-model-name", "tiny",
        "--host", host, "--port", str(port), *(extra or []),
    ]  # fmt: skip


def qroute_instance(model_dir: Path, port: int, *, host: str, context_length: int, qroute_config: dict,
                    config_path: Path, secret_env: str, secret: str) -> tuple[list[str], dict[str, str]]:
    """Command and environment of one ``sglang serve`` instance that attends to a shared corpus: ``qroute_config``
    (the vLLM connector's ``kv_connector_extra_config`` keys) written to ``config_path`` for ``QROUTE_SGLANG_CONFIG``,
    ``--attention-backend qroute`` for every forward, no radix cache (what the plugin's start-up check demands)."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(qroute_config, indent=2))
    command = sglang_serve_command(model_dir, port, backend="qroute", context_length=context_length, host=host,
                                   max_total_tokens=max(8192, 2 * context_length),
                                   extra=["--disable-radix-cache"])  # fmt: skip
    return command, sglang_env(QROUTE_SGLANG_CONFIG=str(config_path), **{secret_env: secret})


def start_sglang(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start one instance (leader of its own process group: stop it with ``processes.stop_pid``)."""
    return spawn(command, env, log_path)


def wait_sglang(process: subprocess.Popen, port: int, log_path: Path, timeout_s: float = 300.0) -> str:
    """Wait until the instance answers ``/health``; its ``/v1`` URL. Raises if it exits or takes too long."""
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if process.poll() is not None:
            raise QRouteError(f"sglang serve on port {port} exited with code {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise QRouteError(f"sglang serve on port {port} not healthy after {timeout_s:.0f} s; see {log_path}")
        time.sleep(1.0)
    return url
