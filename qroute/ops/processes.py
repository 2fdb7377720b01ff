"""Process groups of the instances a launcher starts: each ``vllm serve`` is the leader of its own group (its
EngineCore and Worker are in it), so one signal to the group reaches all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from qroute.ops.procstats import stat_fields

__all__ = ["leader_gone", "pid_alive", "reap", "spawn", "stop_pid"]


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    # A new session makes the server the leader of a process group that also holds its EngineCore
    # and Worker, so one killpg stops them all.
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_pid(pid: int, timeout_s: float = 30.0) -> None:
    """Stop the process group led by ``pid``: SIGTERM, then SIGKILL after ``timeout_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            reap(pid)
            return
        reap(pid)
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    reap(pid)


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child and has ended (else nothing)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def leader_gone(pid: int) -> bool:
    """Whether a group's leading process (an instance's API server) has ended, reaping it if it was our child
    (a zombie leader still counts as a member of its group for ``pid_alive``)."""
    reap(pid)
    fields = stat_fields(pid)
    return fields is None or fields[0] == "Z"
