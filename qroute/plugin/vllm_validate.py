"""``CorpusValidator``: HTTP 400 for a request naming a corpus this instance does not serve.

Pass it on qroute instances only: ``--logits-processors qroute.plugin.vllm_validate:CorpusValidator``.
vLLM calls ``validate_params`` in the **API server process** when a request is admitted and turns its
``ValueError`` into HTTP 400 (docs/vllm-internals.md (c)); the engine itself must never raise for a bad
request (the EngineCore would die). The processor does nothing to logits (``apply`` is the identity and it
is argmax-invariant, so greedy decoding skips it).

Which corpora are known, decided here once per process (a classmethod sees no ``VllmConfig``):

1. ``QROUTE_CORPORA`` (comma-separated names) when set: the launcher's explicit list wins;
2. else the ``--kv-transfer-config`` in ``sys.argv`` (the API server's own command line), whose
   ``kv_connector_extra_config`` (and its ``config_file``) names the corpus;
3. else nothing is known (e.g. the offline ``vllm.LLM`` API): every name passes here, and the engine
   answers an unknown corpus with ``"error"`` in the response's ``kv_transfer_params`` instead.

Also refused with 400: ``kv_transfer_params.qroute`` that is not an object, an unknown ``mode``, a
``prefill_chunk`` that is not an int >= 0.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from qroute.core.config import CORPORA_ENV, Mode, corpus_names_from_argv, parse_request_params
from qroute.errors import ConfigError

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

__all__ = ["CorpusValidator", "known_corpora"]

logger = logging.getLogger("vllm.qroute")


@functools.cache
def known_corpora() -> frozenset[str] | None:
    """The corpus names this process accepts, or None when it cannot tell (see the module docstring)."""
    listed = os.environ.get(CORPORA_ENV, "").strip()
    if listed:
        return frozenset(name.strip() for name in listed.split(",") if name.strip())
    try:
        names = corpus_names_from_argv(sys.argv)
    except ConfigError as exc:  # the engine will refuse this config at start-up with the same message
        logger.warning("qroute: cannot read corpus names from the command line (%s)", exc)
        return None
    return frozenset(names) if names is not None else None


class CorpusValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        kv_params = (sampling_params.extra_args or {}).get("kv_transfer_params") or {}
        if not isinstance(kv_params, dict) or "qroute" not in kv_params:
            return
        try:
            parse_request_params(kv_params["qroute"], default_corpus=None, default_mode=Mode.AUTO,
                                 known_corpora=known_corpora())  # fmt: skip
        except ConfigError as exc:  # vLLM turns a ValueError here into HTTP 400
            raise ValueError(str(exc)) from None

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
