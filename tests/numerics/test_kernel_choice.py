"""``qroute.numerics.kernels.use_triton``: the Triton kernels for CUDA tensors, the torch reference elsewhere, and
the ``QROUTE_KERNELS`` override. (That the entry points really reach the kernels is checked under Triton's
interpreter: tests/kernels/interpreted_triton_mla.py.)"""

from __future__ import annotations

import pytest
import torch

from qroute.errors import ConfigError
from qroute.numerics import kernels

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing is allocated on them


def test_auto_takes_triton_for_cuda_tensors_only(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert kernels.use_triton(CUDA)
    assert not kernels.use_triton(CPU)
    assert not kernels.use_triton(CUDA, masked=True)
    assert not kernels.use_triton(CUDA, uniform=False)


def test_the_override(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert not kernels.use_triton(CUDA)
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    assert kernels.use_triton(CPU) and not kernels.use_triton(CPU, masked=True)
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    with pytest.raises(ConfigError, match="QROUTE_KERNELS='cuda' is not one of"):
        kernels.use_triton(CUDA)
