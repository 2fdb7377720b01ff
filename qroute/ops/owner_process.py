"""``qroute owner``: run one engine-free owner as its own process.

It prepares the corpus with the reference model (every owner computes the same exact-mode prefill
and keeps its share), serves its shard over the chosen transport, prints one JSON line with its
address on stdout, and serves until SIGTERM or SIGINT. The shared secret comes from the environment
(``QROUTE_SECRET``), never from the command line, where other users could read it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qroute.errors import ConfigError, TransportError

SECRET_ENV = "QROUTE_SECRET"


def secret_from_env() -> bytes:
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise ConfigError(f"set {SECRET_ENV} to the cluster's shared secret")
    return secret.encode()


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--corpus", required=True, help="corpus directory (a codebase)")
    parser.add_argument("--corpus-name", default="corpus")
    parser.add_argument("--instances", required=True, help="comma-separated instance ids")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--blocks-per-chunk", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=None, help="keep only the first corpus tokens")


def _serve(args: argparse.Namespace) -> int:
    from qroute.dataplane.peering import serve_owner
    from qroute.reference.prepared import prepare_corpus
    from qroute.transport import get_transport

    instances = args.instances.split(",")
    prepared = prepare_corpus(
        args.model_dir, args.corpus, instances=instances, name=args.corpus_name, replicas=args.replicas,
        blocks_per_chunk=args.blocks_per_chunk, max_tokens=args.max_tokens,
    )  # fmt: skip
    service = prepared.owner_service(args.instance, secret_from_env())
    transport = get_transport(args.transport)
    server = serve_owner(transport, service)
    address = server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"instance": args.instance, "address": address, "pid": os.getpid(),
                      "num_tokens": prepared.directory.num_tokens, "version": prepared.directory.version}),
          flush=True)  # fmt: skip
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
        transport.close()
        # the last line: what this owner did (``OwnerProcess.stop`` returns it)
        print(json.dumps({"instance": args.instance, "stats": service.stats.snapshot().as_dict()}), flush=True)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("owner", help="run one engine-free owner process (prints its address as JSON)")
    add_corpus_arguments(parser)
    parser.add_argument("--instance", required=True, help="this owner's instance id")
    parser.add_argument("--transport", choices=["tcp", "nixl"], default="tcp")
    parser.set_defaults(handler=_serve)


@dataclass
class OwnerProcess:
    """A started ``qroute owner`` child process."""

    instance: str
    address: str
    process: subprocess.Popen

    def stop(self) -> dict | None:
        """Terminate the owner; returns its final metrics line (``MetricsSnapshot.as_dict``) when it printed one."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is None or self.process.stdout.closed:
            return None
        try:
            lines = self.process.stdout.read().splitlines()  # the process has exited: EOF is there
            self.process.stdout.close()
            return json.loads(lines[-1]).get("stats") if lines else None
        except (OSError, ValueError):
            return None


def start_owner(
    *,
    instance: str,
    transport: str,
    model_dir: Path,
    corpus: Path,
    instances: list[str],
    secret: bytes,
    replicas: int = 1,
    blocks_per_chunk: int = 4,
    max_tokens: int | None = None,
    timeout_s: float = 120.0,
    extra_env: dict[str, str] | None = None,
) -> OwnerProcess:
    """Start an owner process and wait for its address line; raises if it dies or is silent."""
    cmd = [
        sys.executable, "-m", "qroute.ops.cli", "owner", "--instance", instance, "--transport", transport,
        "--model-dir", str(model_dir), "--corpus", str(corpus), "--instances", ",".join(instances),
        "--replicas", str(replicas), "--blocks-per-chunk", str(blocks_per_chunk),
    ]  # fmt: skip
    if max_tokens:
        cmd += ["--max-tokens", str(max_tokens)]
    env = {**os.environ, SECRET_ENV: secret.decode(), **(extra_env or {})}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout_s
    out: list[str] = []
    reader = threading.Thread(target=_read_line, args=(process, out), daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    line = out[0] if out else ""
    if not line:
        process.kill()
        process.wait()
        raise TransportError(f"owner {instance!r} did not start (exit code {process.returncode})")
    info = json.loads(line)
    return OwnerProcess(instance=instance, address=info["address"], process=process)


def _read_line(process: subprocess.Popen, out: list[str]) -> None:
    out.append(process.stdout.readline())
