"""qroute.core.config: the connector's extra config, validated with errors naming the key.

Engine-free (the launcher imports the same module), so these run without vLLM.
"""

from __future__ import annotations

import json

import pytest

from qroute.core.config import QRouteConfig, corpus_names_from_argv, load_directory, parse_request_params
from qroute.errors import ConfigError


def _extra(**overrides):
    base = {
        "instance_id": "a",
        "instances": {"a": "127.0.0.1:7001", "b": "127.0.0.1:7002"},
        "corpus": {"name": "repo", "path": "/tmp/repo", "blocks_per_chunk": 4},
    }
    return {**base, **overrides}


def test_defaults_and_derived_values():
    config = QRouteConfig.from_extra_config(_extra())
    assert (config.transport, config.mode, config.secret_env, config.timeout_s, config.cache_bytes) == (
        "tcp", "auto", "QROUTE_SECRET", 2.0, 0)  # fmt: skip
    assert config.fabric_name() == "loopback-tcp"
    assert QRouteConfig.from_extra_config(_extra(transport="nixl")).fabric_name() == "loopback-nixl"
    assert config.instance_ids == ("a", "b")
    assert config.endpoints("b") == {"tcp": ("127.0.0.1", 7002)}
    assert config.corpus.replicas == 1 and config.corpus.blocks_per_chunk == 4


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"instance_id": "c"}, "instance_id"),
        ({"instances": {}}, "instances"),
        ({"instances": {"a": "localhost"}}, "instances"),
        ({"instances": {"a": "h:99999"}}, "instances"),
        ({"transport": "udp"}, "transport"),
        ({"mode": "fast"}, "mode"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"cache_bytes": -1}, "cache_bytes"),
        ({"secret_env": ""}, "secret_env"),
        ({"corpus": {"name": "repo"}}, "corpus"),
        ({"corpus": {"name": "repo", "path": "/x", "replicas": 3}}, "replicas"),
        ({"corpus": {"name": "repo", "path": "/x", "blocks_per_chunk": 0}}, "blocks_per_chunk"),
        ({"corpus": {"name": "", "path": "/x"}}, "name"),
        ({"surprise": 1}, "unknown keys"),
        ({"instances": {"a": "udp://h:1", "b": "h:2"}}, "names transport 'udp'"),
        ({"instances": {"a": ["tcp://h:1", "h:2"], "b": "h:3"}}, "lists transport 'tcp' twice"),
        ({"instances": {"a": [], "b": "h:3"}}, "non-empty list"),
        ({"instances": {"a": ["nixl://h:1", "tcp://h:x"], "b": "h:3"}}, "port"),
    ],
)
def test_invalid_values_name_the_key(overrides, names):
    with pytest.raises(ConfigError, match=names):
        QRouteConfig.from_extra_config(_extra(**overrides))


def test_an_instance_may_serve_several_transports_each_on_its_port():
    config = QRouteConfig.from_extra_config(_extra(transport="nixl", instances={
        "a": ["nixl://127.0.0.1:7001", "tcp://127.0.0.1:7101"], "b": "127.0.0.1:7002", "c": "tcp://10.0.0.3:7003"}))
    assert config.endpoints("a") == {"nixl": ("127.0.0.1", 7001), "tcp": ("127.0.0.1", 7101)}
    assert config.endpoints("b") == {"nixl": ("127.0.0.1", 7002)}  # no scheme: the configured transport
    assert config.endpoints("c") == {"tcp": ("10.0.0.3", 7003)}
    assert (config.fabric_name("tcp"), config.fabric_name("nixl")) == ("loopback-tcp", "loopback-nixl")
    assert QRouteConfig.from_extra_config(_extra(fabric="rdma")).fabric_name("tcp") == "rdma"  # configured wins


def test_required_keys():
    for key in ("instance_id", "instances", "corpus"):
        extra = _extra()
        del extra[key]
        with pytest.raises(ConfigError, match=key):
            QRouteConfig.from_extra_config(extra)


def test_config_file_fills_in_and_explicit_keys_win(tmp_path):
    path = tmp_path / "qroute.yaml"
    path.write_text("instances: {a: '127.0.0.1:7001', b: '127.0.0.1:7002'}\nmode: route\ntimeout_s: 5\n"
                    "corpus: {name: repo, path: /tmp/repo}\n")  # fmt: skip
    config = QRouteConfig.from_extra_config({"config_file": str(path), "instance_id": "b", "mode": "fetch"})
    assert (config.instance_id, config.mode, config.timeout_s) == ("b", "fetch", 5)
    with pytest.raises(ConfigError, match="config_file"):
        QRouteConfig.from_extra_config({"config_file": str(tmp_path / "missing.yaml")})


def test_secret_comes_from_the_named_env_var(monkeypatch):
    config = QRouteConfig.from_extra_config(_extra(secret_env="MY_QROUTE_SECRET"))
    monkeypatch.delenv("MY_QROUTE_SECRET", raising=False)
    with pytest.raises(ConfigError, match="MY_QROUTE_SECRET"):
        config.read_secret()
    monkeypatch.setenv("MY_QROUTE_SECRET", "s3cret")
    assert config.read_secret() == b"s3cret"


def test_corpus_names_from_argv():
    ktc = {"kv_connector": "QRouteConnector", "kv_connector_extra_config": _extra()}
    assert corpus_names_from_argv(["vllm", "serve", "m", "--kv-transfer-config", json.dumps(ktc)]) == {"repo"}
    assert corpus_names_from_argv(["serve", f"--kv-transfer-config={json.dumps(ktc)}"]) == {"repo"}
    assert corpus_names_from_argv(["serve", "m"]) is None
    other = {"kv_connector": "NixlConnector"}
    assert corpus_names_from_argv(["--kv-transfer-config", json.dumps(other)]) is None
    with pytest.raises(ConfigError, match="JSON"):
        corpus_names_from_argv(["--kv-transfer-config", "{nope"])


def test_every_instance_builds_the_same_directory(tiny_model_dir, sample_corpus):
    extra = _extra(corpus={"name": "repo", "path": str(sample_corpus), "blocks_per_chunk": 2})
    _, dir_a = load_directory(QRouteConfig.from_extra_config(extra), tiny_model_dir)
    tokens, dir_b = load_directory(QRouteConfig.from_extra_config({**extra, "instance_id": "b"}), tiny_model_dir)
    assert dir_a == dir_b and dir_a.instances == ("a", "b") and dir_a.block_size == 16
    assert dir_a.num_tokens == len(tokens) and dir_a.chunk_tokens == 32


def test_request_params_owner_modes():
    def parse(raw):
        return parse_request_params(raw, default_corpus="repo", default_mode="auto", known_corpora=("repo",),
                                    known_instances=("a", "b", "c"))  # fmt: skip

    params = parse({"mode": "route", "owner_modes": {"c": "fetch", "b": "auto"}})
    assert (params.mode, params.owner_modes) == ("route", (("b", "auto"), ("c", "fetch")))
    assert parse({}).owner_modes == ()
    with pytest.raises(ConfigError, match=r"owner_modes.*'z' is not an instance"):
        parse({"owner_modes": {"z": "route"}})
    with pytest.raises(ConfigError, match=r"owner_modes\['b'\] = 'local'"):
        parse({"owner_modes": {"b": "local"}})
    with pytest.raises(ConfigError, match="owner_modes must be an object"):
        parse({"owner_modes": ["b", "route"]})
