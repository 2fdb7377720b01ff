"""A pure-torch stand-in for the few ``sgl_kernel`` names SGLang's CPU path imports at module import time
(shared/notes/sglang-cpu.md): PyPI's ``sglang-kernel`` is a CUDA build that cannot import on a CPU-only machine,
and SGLang's CPU kernel build is not on PyPI. Put ``CPU_KERNEL_PATH`` first on ``PYTHONPATH`` of an SGLang process
on such a machine (``qroute``'s SGLang launcher and tests do); on a GPU machine leave it out."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CPU_KERNEL_PATH"]

CPU_KERNEL_PATH = Path(__file__).resolve().parent
