"""CPU seconds of this process and of its descendants, from Linux /proc.

A bench that runs work in several processes (client, broker, worker, upstream) charges each
path the CPU of every process it involves: ``snapshot()`` before and after, ``delta()`` between.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process; None when it is gone."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else None


def descendants(root: int | None = None) -> list[int]:
    """Every live process below ``root`` (default: this process), at any depth."""
    root = os.getpid() if root is None else root
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) is not None:
            parent[int(name)] = int(fields[1])
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier}
        found += sorted(frontier)
    return found


def snapshot(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each of ``pids`` still alive."""
    return {pid: t for pid in pids if (t := cpu_seconds(pid)) is not None}


def delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots of the same processes."""
    return sum(after.get(pid, 0.0) - t for pid, t in before.items() if pid in after)
