"""Fixtures of the end-to-end tests: each module's clusters record their state in a directory of their own."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    """``QROUTE_STATE_DIR`` for this module's clusters (their cluster.json and instance logs)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("qroute-state")
        mp.setenv("QROUTE_STATE_DIR", str(path))
        yield path
