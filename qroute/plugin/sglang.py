"""qroute's SGLang plugin: the ``sglang.srt.plugins`` entry point ``qroute = qroute.plugin.sglang:register``.

SGLang calls ``register()`` in every process it starts (server, scheduler, detokenizer; they are spawned, so a
patch in a launcher's parent would not reach them) and only logs what a plugin raises: a failure here would go
unseen. So ``register()`` never raises; it records each step's failure, and a start-up check installed first
(a BEFORE hook on the model runner's ``build_attention_backends``) refuses to build the attention backends of an
instance that configures qroute while qroute is not active, with the reasons.

What ``register()`` does, once per process (shared/notes/sglang-plugin-api.md):

1. Checks the installed SGLang against the version qroute is built for (``SGLANG_VERSION``): the registries it
   touches are internal, and were renamed before (``nsa`` -> ``dsa``).
2. Adds ``qroute`` to the ``--attention-backend`` / ``--decode-attention-backend`` choices
   (``add_attention_backend_choices``, SGLang's extension point) and registers its factory
   (``register_attention_backend``): ``qroute.plugin.sglang_backend.QRouteSGLangBackend``.
3. Tells the DeepSeek model code about the name: ``FORWARD_ABSORB_CORE_ATTENTION_BACKENDS`` (absorbed MLA with
   split ``q_nope`` / ``q_rope`` inputs) and a handler that picks absorbed MLA for every forward, prefill included.
   On CPU it also registers that handler for ``torch_native`` when SGLang has none: without it SGLang routes a
   DeepSeek prefill to MHA, whose 128-wide query the torch-native backend runs against the 576-wide latent cache
   and crashes (shared/notes/sglang-cpu.md). Like vLLM's RoPE fix this applies to stock instances too: it is what
   lets the stock reference run at all.
4. The backend's factory logs one line, ``qroute active: ...``, in each model process that builds it (SGLang
   configures its logging after it loads plugins, so ``register()`` itself cannot be heard).

"Configured" means the environment names a qroute config file, ``QROUTE_SGLANG_CONFIG`` (JSON with the vLLM
connector's ``kv_connector_extra_config`` keys, ``qroute.core.config.QRouteConfig``). The backend itself is chosen
with ``--attention-backend qroute`` or ``--decode-attention-backend qroute``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from qroute.errors import ConfigError
from qroute.plugin.install_steps import check_installed, run_steps

__all__ = ["BACKEND_NAME", "CONFIG_ENV", "SGLANG_VERSION", "ensure_active", "load_config", "register"]

logger = logging.getLogger("sglang.qroute")

BACKEND_NAME = "qroute"
CONFIG_ENV = "QROUTE_SGLANG_CONFIG"
SGLANG_VERSION = "0.5.23"
_CHECK_TARGET = ("sglang.srt.model_executor.model_runner_components.attention_backend_setup."
                 "build_attention_backends")  # fmt: skip

_INIT_NEW_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
_FINISH_TARGET = "sglang.srt.managers.schedule_batch.Req.update_finish_state"

_lock = threading.Lock()
_registered = False
_failures: dict[str, str] = {}


def register() -> None:
    """Install qroute's hooks in this SGLang process. Idempotent; never raises (see the module docstring)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
        steps = [("start-up check", _install_check), ("version", _check_version), ("backend", _register_backend),
                 ("model dispatch", _register_dispatch), ("request hooks", _install_request_hooks)]  # fmt: skip
        run_steps(steps, _failures, logger)  # SGLang only logs a raise: the start-up check reports


def _install_check() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_CHECK_TARGET, _check_before_backends, HookType.BEFORE)


def _install_request_hooks() -> None:
    """What the corpus side needs of SGLang's requests (``qroute.plugin.sglang_corpus``): a forward batch's ``Req``
    objects, and when each finishes. Both hooks do nothing where no corpus is configured."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from qroute.plugin.sglang_corpus import keep_requests, request_finished

    HookRegistry.register(_INIT_NEW_TARGET, keep_requests, HookType.AFTER)
    HookRegistry.register(_FINISH_TARGET, request_finished, HookType.AFTER)


def _check_version() -> None:
    import sglang

    if sglang.__version__ != SGLANG_VERSION:
        raise ConfigError(f"qroute's SGLang plugin is built for sglang {SGLANG_VERSION}, found {sglang.__version__}")


def _register_backend() -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(_create_backend)


def _create_backend(runner: Any) -> Any:
    from qroute.plugin.sglang_backend import QRouteSGLangBackend

    if not runner.use_mla_backend:
        raise ConfigError("qroute's SGLang backend serves MLA models only (DeepSeek-V2/V3 family)")
    _levelled_log()
    backend = QRouteSGLangBackend(runner, load_config())
    # logged here, not in register(): SGLang configures its logging after it loads plugins
    corpus = backend.corpus
    logger.info("qroute active: attention backend %r (sglang %s, own part in torch, %s)", BACKEND_NAME,
                SGLANG_VERSION, f"corpus {corpus.directory.name!r}, instance {corpus.config.instance_id!r}"
                if corpus is not None else "no corpus")  # fmt: skip
    return backend


def _levelled_log() -> None:
    """qroute's lines in SGLang's log with their level (SGLang's format has none), so that its warnings and errors
    can be told from the rest (``qroute status`` shows an instance's last ones)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _absorbed_mla(attn: Any, forward_batch: Any) -> Any:
    """Every forward of a DeepSeek attention layer takes absorbed MLA (576-wide q against the latent cache)."""
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    return AttnForwardMethod.MLA


def _register_dispatch() -> None:
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry
    from sglang.srt.models.deepseek_common.utils import FORWARD_ABSORB_CORE_ATTENTION_BACKENDS

    if BACKEND_NAME not in FORWARD_ABSORB_CORE_ATTENTION_BACKENDS:
        FORWARD_ABSORB_CORE_ATTENTION_BACKENDS.append(BACKEND_NAME)
    AttentionBackendRegistry.register(BACKEND_NAME, _absorbed_mla)
    if "torch_native" not in AttentionBackendRegistry._handlers:  # SGLang's own handler, if it grows one, wins
        AttentionBackendRegistry.register("torch_native", _absorbed_mla)


def load_config() -> Any | None:
    """The instance's qroute config (``QRouteConfig``) from ``QROUTE_SGLANG_CONFIG``, or None where it is unset."""
    from qroute.core.config import QRouteConfig

    path = os.environ.get(CONFIG_ENV, "").strip()
    if not path:
        return None
    try:
        extra = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{CONFIG_ENV}={path!r}: cannot read a JSON config ({exc})") from None
    return QRouteConfig.from_extra_config(extra)


def ensure_active(decode_backend: str, prefill_backend: str, server_args: Any = None) -> None:
    """Raise ``ConfigError`` unless this instance can run qroute as configured (a no-op where it is not).
    ``server_args``: SGLang's, for what a configured instance needs of the engine (None: not checked)."""
    config = load_config()
    uses_backend = BACKEND_NAME in (decode_backend, prefill_backend)
    if config is None and not uses_backend:
        return
    check_installed(_failures, "SGLang")
    if config is None:
        return
    if BACKEND_NAME not in (decode_backend, prefill_backend) or decode_backend != prefill_backend:
        raise ConfigError(f"{CONFIG_ENV} is set but the attention backends are {prefill_backend!r} (prefill) and "
                          f"{decode_backend!r} (decode): pass --attention-backend {BACKEND_NAME}, so that every "
                          "forward, prefill included, attends to the corpus")  # fmt: skip
    if config.etcd is not None:
        raise ConfigError("qroute on SGLang has no etcd membership yet: drop 'etcd' from the config (a fixed "
                          "'instances' map)")  # fmt: skip
    transports = {config.transport, *(t for i in config.instance_ids for t in config.endpoints(i))}
    if "nixl" in transports and importlib.util.find_spec("nixl") is None:
        raise ConfigError("the config names the NIXL transport but this SGLang environment has no 'nixl' package: "
                          "use transport 'tcp', or install nixl into it")  # fmt: skip
    if server_args is None:
        return
    if not server_args.disable_radix_cache:
        # A request's own KV depends on the corpus it attended to: a prefix cached by another request (or a corpus
        # prefill of the same tokens) would be reused wrongly. vLLM's CPU platform never prefix-caches MLA.
        raise ConfigError(f"{CONFIG_ENV} is set: start SGLang with --disable-radix-cache (own KV rows depend on the "
                          "corpus a request attended to, so prefixes cannot be shared across requests yet)")
    if server_args.tp_size != 1 or server_args.dp_size != 1:
        raise ConfigError("qroute on SGLang supports --tp-size 1 and --dp-size 1 only (owners hold all heads)")


def _check_before_backends(*args: Any, model_runner: Any = None, **kwargs: Any) -> None:
    runner = model_runner if model_runner is not None else (args[0] if args else None)
    ensure_active(str(runner.decode_attention_backend_str), str(runner.prefill_attention_backend_str),
                  runner.server_args)
    return None
