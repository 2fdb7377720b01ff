"""How qroute's engine plugins (``plugin.vllm``, ``plugin.sglang``) install their hooks: each step run once per
process, a failure recorded rather than raised (vLLM would crash stock instances on a raise, SGLang would only log
it), and reported by the plugin's ``ensure_active`` where qroute is configured. Imports no engine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from qroute.errors import ConfigError

__all__ = ["check_installed", "run_steps"]


def run_steps(steps: Iterable[tuple[str, Callable[[], object]]], failures: dict[str, str],
              logger: logging.Logger) -> None:  # fmt: skip
    """Run every step; a step that raises is recorded in ``failures`` (name -> why) and logged, never raised."""
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # see the module docstring
            failures[name] = f"{type(exc).__name__}: {exc}"
            logger.warning("qroute: plugin step %r failed (%s); qroute cannot be enabled here", name, exc)


def check_installed(failures: Mapping[str, str], engine: str) -> None:
    """Raise ``ConfigError`` naming every failed step, if any."""
    if failures:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(failures.items()))
        raise ConfigError(f"qroute is configured but its {engine} plugin failed to install ({detail})")
