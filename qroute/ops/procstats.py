"""What a process group holds, from ``/proc``: resident memory, threads, open file descriptors and sockets. A
``vllm serve`` instance started by ``qroute up`` is one process group (API server, engine core, their helpers), so
these are the instance's totals."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["group_peak_rss_mib", "group_pids", "group_usage", "stat_fields"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after "pid (comm) ": state, ppid, pgrp, ...; None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def group_usage(pgid: int) -> dict[str, float]:
    """``processes``, ``rss_mib``, ``threads``, ``fds`` and ``sockets`` summed over the group's processes."""
    usage = {"processes": 0, "rss_mib": 0.0, "threads": 0, "fds": 0, "sockets": 0}
    for pid in group_pids(pgid):
        try:
            statm = Path(f"/proc/{pid}/statm").read_text().split()
            threads = len(os.listdir(f"/proc/{pid}/task"))
            links = _fd_links(pid)
        except OSError:  # it ended while being read
            continue
        usage["processes"] += 1
        usage["rss_mib"] += int(statm[1]) * _PAGE / 2**20
        usage["threads"] += threads
        usage["fds"] += len(links)
        usage["sockets"] += sum(link.startswith("socket:") for link in links)
    return usage


def _fd_links(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed since the listing
            continue
    return links


def group_peak_rss_mib(pgid: int) -> float:
    """The sum of the group's processes' peak RSS (``VmHWM``), in MiB."""
    total_kb = 0
    for pid in group_pids(pgid):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total_kb += sum(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    return total_kb / 1024
