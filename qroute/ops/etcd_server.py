"""A local etcd server on loopback, for ``qroute up --etcd`` and the tests (Debian's ``etcd-server`` package).

One member, its data in the state directory, client and peer URLs on loopback ports; started in its own process
group and stopped by PID like the instances.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qroute.dataplane.etcd_client import EtcdClient, EtcdError
from qroute.errors import ConfigError, QRouteError
from qroute.ops.processes import spawn, stop_pid

__all__ = ["EtcdServer", "etcd_binary", "start_etcd"]

START_TIMEOUT_S = 30.0


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise ConfigError("etcd is not installed: `apt-get install etcd-server` (Debian) puts it on PATH")
    return path


@dataclass
class EtcdServer:
    endpoint: str  # client URL
    pid: int
    data_dir: str

    def stop(self) -> None:
        stop_pid(self.pid)


def start_etcd(data_dir: Path, client_port: int, *, host: str = "127.0.0.1", log_path: Path | None = None,
               env: dict[str, str] | None = None) -> EtcdServer:  # fmt: skip
    """Start a one-member etcd serving clients on ``host:client_port`` (peers on the next port) with a fresh data
    directory; waits until it answers."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    client, peer = f"http://{host}:{client_port}", f"http://{host}:{client_port + 1}"
    cmd = [etcd_binary(), "--name", "qroute", "--data-dir", str(data_dir),
           "--listen-client-urls", client, "--advertise-client-urls", client,
           "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
           "--initial-cluster", f"qroute={peer}", "--log-level", "warn"]  # fmt: skip
    process = spawn(cmd, env or {"PATH": "/usr/bin:/bin"}, log_path or data_dir.parent / "etcd.log")
    server = EtcdServer(client, process.pid, str(data_dir))
    deadline = time.monotonic() + START_TIMEOUT_S
    client_api = EtcdClient(client, timeout_s=1.0)
    while True:
        if process.poll() is not None:
            raise QRouteError(f"etcd exited with code {process.returncode} at start-up; see {log_path}")
        try:
            client_api.version()
            return server
        except EtcdError:
            if time.monotonic() > deadline:
                server.stop()
                raise QRouteError(f"etcd at {client} did not answer within {START_TIMEOUT_S:.0f} s") from None
            time.sleep(0.2)
