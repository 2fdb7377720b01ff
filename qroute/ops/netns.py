"""Instances as separate hosts on one machine: one network namespace each, joined by veth pairs to a bridge.

``qroute up --netns`` (and the partition test) puts instance ``k`` in namespace ``qr-<id>`` with address
``10.77.0.<k+1>`` on its own ``eth0``; the other end of its veth pair is on the bridge ``qr-br0`` in the launcher's
namespace, which has ``10.77.0.254``, so the launcher reaches every instance and they reach each other only
through the bridge. ``cut`` takes an instance's link down (it is partitioned from everyone, the launcher
included) and ``restore`` brings it back. Needs root (``ip netns``) and addresses local to this machine only.

What a namespace does not cut: UCX's shared-memory transports (``UCX_TLS=sm,self``, NIXL's setting on this
machine) go through ``/dev/shm``, not the network, so a NIXL link keeps moving data across a cut veth; the
partition test runs over TCP. Separate hosts use UCX's network transports (docs/deploy.md).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from qroute.errors import ConfigError

__all__ = ["BRIDGE", "address", "create", "cut", "destroy", "exec_prefix", "namespace", "restore"]

BRIDGE = "qr-br0"
SUBNET = "10.77.0"
BRIDGE_ADDRESS = f"{SUBNET}.254"


def namespace(instance_id: str) -> str:
    return f"qr-{instance_id}"


def address(k: int) -> str:
    """Instance ``k``'s address on the bridge."""
    if not 0 <= k < 250:
        raise ConfigError(f"--netns supports at most 250 instances, got index {k}")
    return f"{SUBNET}.{k + 1}"


def _veth(instance_id: str) -> str:
    return f"qr-v-{instance_id}"[:15]  # interface names are at most 15 bytes


def exec_prefix(instance_id: str) -> list[str]:
    """What runs a command inside the instance's namespace (``ip netns exec`` execs it: same PID, same group)."""
    return ["ip", "netns", "exec", namespace(instance_id)]


def _ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ConfigError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()} (network namespaces need root)")


def create(instance_ids: Sequence[str]) -> None:
    """The bridge, and one namespace with its veth pair and address per instance (what exists already is replaced)."""
    destroy(instance_ids)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for k, instance_id in enumerate(instance_ids):
        ns, veth = namespace(instance_id), _veth(instance_id)
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", BRIDGE, "up")
        _ip("-n", ns, "addr", "add", f"{address(k)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")


def cut(instance_id: str) -> None:
    """Partition the instance from every other one (and from the launcher)."""
    _ip("link", "set", _veth(instance_id), "down")


def restore(instance_id: str) -> None:
    _ip("link", "set", _veth(instance_id), "up")


def destroy(instance_ids: Sequence[str]) -> None:
    """Remove the namespaces (their veth pairs go with them) and the bridge; what is not there is skipped. No
    instances: nothing to remove (the bridge may be another cluster's)."""
    if not instance_ids:
        return
    for instance_id in instance_ids:
        _ip("netns", "del", namespace(instance_id), check=False)
    _ip("link", "del", BRIDGE, check=False)
