"""The qroute connector's configuration: ``kv_connector_extra_config`` of ``--kv-transfer-config``.

Engine-free (no vllm, no torch): the launcher imports this module to write and check the same config,
and to build the same corpus directory (``load_directory``) as every instance.

Keys (``QRouteConfig.from_extra_config``; ``config_file`` names a YAML file with the same keys, explicit
keys win over the file's):

- ``instance_id`` (str): this instance, one of ``instances``.
- ``instances`` (dict id -> address): every instance's owner-service address(es), this one included: "host:port"
  (served over ``transport``), "nixl://host:port" / "tcp://host:port", or a list of such, one per transport the
  instance serves (each on its own port). A requester connects to a peer over every transport both serve and keeps
  the one whose probed round trip is lower (``qroute.dataplane.owner_links``).
- ``corpus`` ({"name", "path", "replicas": 1, "blocks_per_chunk": 16}).
- ``transport`` ("tcp" | "nixl", default "tcp": the transport of addresses without one); ``fabric`` (profile name
  or YAML path; default "loopback-tcp" / "loopback-nixl" by each link's transport); ``mode`` ("auto" | "route" |
  "fetch" | "local").
- ``secret_env`` (name of the env var holding the shared secret, default "QROUTE_SECRET"; the secret
  itself never goes into a config); ``timeout_s`` (2.0); ``cache_bytes`` (0: no cache of fetched blocks).
- ``selector`` ("dense" | "summary" | "indexer", default "dense"), ``topk`` (blocks per layer, for "summary"),
  ``window`` (most recent corpus blocks always attended, default 0): which corpus blocks a request attends to
  (``qroute.dataplane.selection``); a request may override them in ``kv_transfer_params.qroute``.
- ``etcd`` ({"endpoint": "http://host:2379", "cluster": "qroute", "ttl_s": 10}): membership through etcd
  (``qroute.dataplane.membership``): the instance keeps a record there, follows the others' and re-places the corpus
  when members join or leave. ``join`` (false): this instance joins a running cluster (``instances`` then needs only
  its own entry); its chunks are copied from their holders before it serves them.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qroute.core.corpus import BLOCK_SIZE, place_model_corpus
from qroute.core.placement import CorpusDirectory
from qroute.errors import ConfigError

__all__ = [
    "BLOCK_SIZE",
    "COMPARED_MODES",
    "CORPORA_ENV",
    "MODES",
    "CorpusConfig",
    "EtcdConfig",
    "Mode",
    "QRouteConfig",
    "RequestParams",
    "SELECTORS",
    "Selection",
    "corpus_names_from_argv",
    "load_directory",
    "parse_request_params",
]


class Mode(StrEnum):
    """How a requester attends to corpus blocks it does not hold: the cost model decides (``auto``), or always
    ``route`` / ``fetch``; ``local`` needs every block resident."""

    AUTO = "auto"
    ROUTE = "route"
    FETCH = "fetch"
    LOCAL = "local"


MODES = tuple(m.value for m in Mode)
COMPARED_MODES = (Mode.ROUTE, Mode.FETCH, Mode.AUTO)  # what `qroute check` and the demos compare to one instance
TRANSPORTS = ("tcp", "nixl")
CORPORA_ENV = "QROUTE_CORPORA"  # comma-separated corpus names, for the API server's validator
_KEYS = {"instance_id", "instances", "corpus", "transport", "fabric", "mode", "secret_env", "timeout_s",
         "cache_bytes", "config_file", "selector", "topk", "window", "etcd", "join"}  # fmt: skip
SELECTORS = ("dense", "summary", "indexer")


@dataclass(frozen=True)
class Selection:
    """Which corpus blocks a request attends to (``qroute.dataplane.selection``): ``selector`` (every block,
    ``dense``; the ``topk`` blocks of highest key bound per layer, ``summary``; DSA's indexer output, ``indexer``)
    and ``window``, the most recent corpus blocks always included."""

    selector: str = "dense"
    topk: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ConfigError(f"selector {self.selector!r} is not one of {', '.join(SELECTORS)}")
        for name in ("topk", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
        if self.selector == "summary" and self.topk < 1:
            raise ConfigError(f"selector 'summary' needs topk >= 1 blocks, got {self.topk}")

    @property
    def dense(self) -> bool:
        return self.selector == "dense"
_CORPUS_KEYS = {"name", "path", "replicas", "blocks_per_chunk"}


def _where(key: str) -> str:
    return f"kv_connector_extra_config[{key!r}]"


@dataclass(frozen=True)
class CorpusConfig:
    name: str
    path: str
    replicas: int = 1
    blocks_per_chunk: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "\x00" in self.name:
            raise ConfigError(f"{_where('corpus')}['name'] must be a non-empty str, got {self.name!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"{_where('corpus')}['path'] must be a corpus directory path, got {self.path!r}")
        for key in ("replicas", "blocks_per_chunk"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{_where('corpus')}[{key!r}] must be an int >= 1, got {value!r}")


_ETCD_KEYS = {"endpoint", "cluster", "ttl_s"}


@dataclass(frozen=True)
class EtcdConfig:
    endpoint: str
    cluster: str = "qroute"
    ttl_s: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{_where('etcd')}['endpoint'] must be an http(s) URL, got {self.endpoint!r}")
        if not isinstance(self.cluster, str) or not self.cluster or "/" in self.cluster:
            raise ConfigError(f"{_where('etcd')}['cluster'] must be a name without '/', got {self.cluster!r}")
        if not isinstance(self.ttl_s, int) or isinstance(self.ttl_s, bool) or not 2 <= self.ttl_s <= 3600:
            raise ConfigError(f"{_where('etcd')}['ttl_s'] must be an int in 2..3600 seconds, got {self.ttl_s!r}")


@dataclass(frozen=True)
class QRouteConfig:
    instance_id: str
    instances: Mapping[str, str]
    corpus: CorpusConfig
    transport: str = "tcp"
    fabric: str = ""  # "" = loopback-<transport>
    mode: str = "auto"
    secret_env: str = "QROUTE_SECRET"
    timeout_s: float = 2.0
    cache_bytes: int = 0
    selector: str = "dense"
    topk: int = 0
    window: int = 0
    etcd: EtcdConfig | None = None
    join: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.join, bool) or (self.join and self.etcd is None):
            raise ConfigError(f"{_where('join')}={self.join!r}: joining a running cluster needs {_where('etcd')}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"{_where('transport')}={self.transport!r}; allowed: {', '.join(TRANSPORTS)}")
        if not isinstance(self.instances, Mapping) or not self.instances:
            raise ConfigError(f"{_where('instances')} must be a non-empty dict of instance id -> 'host:port'")
        for name in self.instances:
            if not isinstance(name, str) or not name or "\x00" in name:
                raise ConfigError(f"{_where('instances')}: instance id {name!r} must be a non-empty str")
            self.endpoints(name)
        if self.instance_id not in self.instances:
            raise ConfigError(f"{_where('instance_id')}={self.instance_id!r} is not one of "
                              f"{_where('instances')} {sorted(self.instances)}")
        if self.corpus.replicas > len(self.instances) and not self.join:
            raise ConfigError(f"{_where('corpus')}['replicas']={self.corpus.replicas} exceeds the "
                              f"{len(self.instances)} instances")
        if not isinstance(self.fabric, str):
            raise ConfigError(f"{_where('fabric')} must be a profile name or a YAML path, got {self.fabric!r}")
        if self.mode not in MODES:
            raise ConfigError(f"{_where('mode')}={self.mode!r}; allowed: {', '.join(MODES)}")
        if not isinstance(self.secret_env, str) or not self.secret_env or "=" in self.secret_env:
            raise ConfigError(f"{_where('secret_env')} must name an environment variable, got {self.secret_env!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ConfigError(f"{_where('timeout_s')} must be a positive number of seconds, got {self.timeout_s!r}")
        if isinstance(self.cache_bytes, bool) or not isinstance(self.cache_bytes, int) or self.cache_bytes < 0:
            raise ConfigError(f"{_where('cache_bytes')} must be an int >= 0, got {self.cache_bytes!r}")
        try:
            Selection(self.selector, self.topk, self.window)
        except ConfigError as exc:
            raise ConfigError(f"kv_connector_extra_config: {exc}") from None

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> QRouteConfig:
        """Validate ``kv_connector_extra_config`` (plus its ``config_file``, if any)."""
        merged = dict(extra or {})
        config_file = merged.pop("config_file", None)
        if config_file is not None:
            merged = {**_read_yaml(config_file), **merged}  # explicit keys win
            merged.pop("config_file", None)
        unknown = set(merged) - _KEYS
        if unknown:
            raise ConfigError(f"kv_connector_extra_config: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        for key in ("instance_id", "instances", "corpus"):
            if key not in merged:
                raise ConfigError(f"{_where(key)} is required for QRouteConnector")
        corpus = merged.pop("corpus")
        if not isinstance(corpus, Mapping):
            raise ConfigError(f"{_where('corpus')} must be a dict with keys {sorted(_CORPUS_KEYS)}")
        unknown = set(corpus) - _CORPUS_KEYS
        if unknown or "name" not in corpus or "path" not in corpus:
            raise ConfigError(f"{_where('corpus')}: needs 'name' and 'path', allows {sorted(_CORPUS_KEYS)}; "
                              f"got {sorted(corpus)}")
        etcd = merged.pop("etcd", None)
        if etcd is not None:
            if not isinstance(etcd, Mapping) or set(etcd) - _ETCD_KEYS or "endpoint" not in etcd:
                raise ConfigError(f"{_where('etcd')} must be a dict with 'endpoint' and optionally 'cluster', "
                                  f"'ttl_s'; got {etcd!r}")  # fmt: skip
            merged["etcd"] = EtcdConfig(**etcd)
        instances = merged.pop("instances")
        if isinstance(instances, Mapping):
            instances = {str(k): v for k, v in instances.items()}
        return cls(corpus=CorpusConfig(**corpus), instances=instances, **merged)

    # -- derived ------------------------------------------------------------------------------------

    @property
    def instance_ids(self) -> tuple[str, ...]:
        """Every instance, sorted: the placement's instance order on every instance."""
        return tuple(sorted(self.instances))

    @property
    def selection(self) -> Selection:
        """The configured default selection."""
        return Selection(self.selector, self.topk, self.window)

    def fabric_name(self, transport: str | None = None) -> str:
        """The fabric profile that prices links over ``transport`` (default: ``transport``'s): the configured
        one, else that transport's loopback profile."""
        return self.fabric or f"loopback-{transport or self.transport}"

    def endpoints(self, instance: str) -> dict[str, tuple[str, int]]:
        """Transport -> (host, port) of every owner-service endpoint of ``instance``, in the configured order."""
        return parse_endpoints(instance, self.instances[instance], self.transport)

    def read_secret(self) -> bytes:
        """The shared secret from the environment variable ``secret_env``."""
        value = os.environ.get(self.secret_env, "")
        if not value:
            raise ConfigError(f"the shared secret is missing: set the environment variable {self.secret_env} "
                              f"(named by {_where('secret_env')}) to the same value on every instance")
        return value.encode()


def parse_endpoints(instance: str, value: object, default_transport: str) -> dict[str, tuple[str, int]]:
    """Transport -> (host, port) of an ``instances`` value: "host:port" (over ``default_transport``),
    "transport://host:port", or a non-empty list of them."""
    addresses = [value] if isinstance(value, str) else value
    if not isinstance(addresses, list | tuple) or not addresses:
        raise ConfigError(f"{_where('instances')}[{instance!r}]={value!r} must be 'host:port', "
                          "'transport://host:port' or a non-empty list of them")  # fmt: skip
    found: dict[str, tuple[str, int]] = {}
    for address in addresses:
        transport, host_port = default_transport, address
        if isinstance(address, str) and "://" in address:
            transport, host_port = address.split("://", 1)
            if transport not in TRANSPORTS:
                raise ConfigError(f"{_where('instances')}[{instance!r}]: {address!r} names transport "
                                  f"{transport!r}; allowed: {', '.join(TRANSPORTS)}")  # fmt: skip
        if transport in found:
            raise ConfigError(f"{_where('instances')}[{instance!r}] lists transport {transport!r} twice")
        found[transport] = _split_address(instance, host_port)
    return found


def _split_address(instance: str, address: object) -> tuple[str, int]:
    if not isinstance(address, str) or address.count(":") != 1:
        raise ConfigError(f"{_where('instances')}[{instance!r}]={address!r} must be 'host:port'")
    host, port = address.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{_where('instances')}[{instance!r}]={address!r} must be 'host:port' with a port "
                          "in 1..65535")
    return host, int(port)


def _read_yaml(path: object) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(str(path)).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{_where('config_file')}={path!r} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{_where('config_file')}={path!r} must hold a YAML mapping of qroute keys")
    return data


def load_directory(config: QRouteConfig, model_dir: str | Path,
                   instances: Sequence[str] | None = None) -> tuple[np.ndarray, CorpusDirectory]:  # fmt: skip
    """Tokenize the configured corpus with the model's tokenizer and place it (``place_model_corpus``) on
    ``instances`` (default: the configured ones): the same directory on every instance, so no instance needs to
    ask another."""
    c = config.corpus
    instances = sorted(instances) if instances is not None else config.instance_ids
    if c.replicas > len(instances):
        raise ConfigError(f"{_where('corpus')}['replicas']={c.replicas} exceeds the {len(instances)} members "
                          f"{list(instances)}")  # fmt: skip
    return place_model_corpus(model_dir, c.path, name=c.name, instances=instances, replicas=c.replicas,
                              block_size=BLOCK_SIZE, blocks_per_chunk=c.blocks_per_chunk)  # fmt: skip


@dataclass(frozen=True)
class RequestParams:
    """A request's ``kv_transfer_params.qroute``, validated. ``corpus`` None: no corpus attention."""

    corpus: str | None
    mode: str
    prefill_chunk: int | None = None
    owner_modes: tuple[tuple[str, str], ...] = ()  # (owner instance, mode) pairs that override ``mode``
    selection: Selection = Selection()


def parse_request_params(params: object, *, default_corpus: str | None, default_mode: str,
                         known_corpora: Collection[str] | None,
                         known_instances: Collection[str] | None = None,
                         default_selection: Selection = Selection(),
                         field: str = "kv_transfer_params.qroute") -> RequestParams:
    """Validate a request's ``kv_transfer_params.qroute`` (keys missing: the defaults); raises ``ConfigError``
    naming the field. ``known_corpora`` / ``known_instances`` None accept any corpus name / owner id.
    ``"corpus": null`` opts out of corpus attention. ``"owner_modes": {"i2": "fetch"}`` decides the blocks an owner
    holds (its replicas' too) by that mode instead of ``mode``: auto, route or fetch. ``selector``, ``topk`` and
    ``window`` override ``default_selection`` (``Selection``). ``field``: where the engine's requests carry them, for
    the messages (SGLang: ``custom_params.qroute``)."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{field} must be an object, got {type(params).__name__}")
    corpus = params.get("corpus", default_corpus)
    if corpus is not None and not isinstance(corpus, str):
        raise ConfigError(f"{field}.corpus must be a corpus name or null, got {corpus!r}")
    if corpus is not None and known_corpora is not None and corpus not in known_corpora:
        raise ConfigError(f"unknown corpus {corpus!r}; this instance serves {sorted(known_corpora)}")
    mode = params.get("mode") or default_mode
    if mode not in MODES:
        raise ConfigError(f"{field}.mode {mode!r} is not one of {', '.join(MODES)}")
    chunk = params.get("prefill_chunk")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
        raise ConfigError(f"{field}.prefill_chunk must be an int >= 0, got {chunk!r}")
    d = default_selection
    try:
        selection = Selection(params.get("selector", d.selector), params.get("topk", d.topk),
                              params.get("window", d.window))  # fmt: skip
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    owner_modes = _owner_modes(params.get("owner_modes"), known_instances, field)
    return RequestParams(corpus, str(mode), chunk, owner_modes, selection)


OWNER_MODES = (Mode.AUTO, Mode.ROUTE, Mode.FETCH)  # 'local' is not a choice for blocks another instance owns


def group_mode(owners: Sequence[str], owner_modes: Mapping[str, str], default: str) -> str:
    """The mode that decides a group of blocks held by ``owners`` (in their order): that of the first owner
    ``owner_modes`` names, else ``default``."""
    return next((owner_modes[o] for o in owners if o in owner_modes), default)


def _owner_modes(raw: object, known_instances: Collection[str] | None, field: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    where = f"{field}.owner_modes"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object of owner instance id -> mode, got {type(raw).__name__}")
    for owner, mode in raw.items():
        if known_instances is not None and owner not in known_instances:
            raise ConfigError(f"{where}: {owner!r} is not an instance of this cluster ({sorted(known_instances)})")
        if mode not in OWNER_MODES:
            raise ConfigError(f"{where}[{owner!r}] = {mode!r} is not one of {', '.join(OWNER_MODES)}")
    return tuple(sorted((str(owner), str(mode)) for owner, mode in raw.items()))


def corpus_names_from_argv(argv: Sequence[str]) -> set[str] | None:
    """Corpus names configured by a ``--kv-transfer-config`` naming ``QRouteConnector`` in ``argv``.

    None when ``argv`` has no such flag (the caller then cannot tell). Reads ``--kv-transfer-config JSON``
    and ``--kv-transfer-config=JSON`` (not vLLM's dotted ``--kv-transfer-config.KEY`` form); raises
    ConfigError when the value or its qroute keys are invalid.
    """
    for i, arg in enumerate(argv):
        if arg == "--kv-transfer-config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--kv-transfer-config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        try:
            ktc = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"--kv-transfer-config is not JSON ({exc}): {shlex.quote(value)[:200]}") from exc
        if not isinstance(ktc, dict) or ktc.get("kv_connector") != "QRouteConnector":
            return None
        return {QRouteConfig.from_extra_config(ktc.get("kv_connector_extra_config")).corpus.name}
    return None
