"""``interpreted_triton_mla.py`` runs in a pytest process started with ``TRITON_INTERPRET=1`` (``test_kernels.py``):
the interpreter must be chosen before Triton is first imported, and the rest of the suite imports it through vLLM."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def kernels():
    pytest.importorskip("triton")
    from qroute.numerics import triton_mla

    assert triton_mla.interpreted(), "run with TRITON_INTERPRET=1 from the start of the process (test_kernels.py)"
    return triton_mla
