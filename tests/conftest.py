"""Shared fixtures: one tiny model per test session, built into a temporary cache."""

import os
from pathlib import Path

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
