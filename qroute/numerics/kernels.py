"""Which implementation attends, chosen at run time: the Triton kernels (``triton_mla``) on CUDA tensors, the torch
reference (``attention``) elsewhere.

``QROUTE_KERNELS`` (environment, read per call so a test can set it): ``auto`` (default) takes Triton for CUDA
tensors when Triton imports; ``torch`` always takes the reference (to rule the kernels out when debugging);
``triton`` takes the kernels on any device, CPU tensors included, which under Triton's interpreter
(``TRITON_INTERPRET=1``) is how CI checks that the dispatch really reaches them. Causal masks
(``q_positions`` / ``kv_positions``) and queries in another dtype or on another device than the rows always take
the reference: the kernels take neither (the own part on a GPU is vLLM's own kernel, ``plugin/vllm_cuda_backend``)."""

from __future__ import annotations

import functools
import os

import torch

from qroute.errors import ConfigError

__all__ = ["KERNELS_ENV", "use_triton"]

KERNELS_ENV = "QROUTE_KERNELS"
_CHOICES = ("auto", "torch", "triton")


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(device: torch.device, *, masked: bool = False, uniform: bool = True) -> bool:
    """Whether attention over tensors on ``device`` runs the Triton kernels (see the module docstring).
    ``uniform``: queries and rows are in one dtype and on one device (the kernels take nothing else)."""
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ConfigError(f"{KERNELS_ENV}={choice!r} is not one of {list(_CHOICES)}")
    if choice == "torch" or masked or not uniform:
        return False
    if choice == "triton":
        if not _triton_imports():
            raise ConfigError(f"{KERNELS_ENV}=triton but Triton is not installed")
        return True
    return device.type == "cuda" and _triton_imports()
