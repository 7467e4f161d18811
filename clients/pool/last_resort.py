"""Stopping a pool when its owner cannot: garbage collection, interpreter exit, SIGTERM.

A ``Pool`` left without ``close()`` (dropped, or the process told to terminate) would leave
its broker and workers to the kernel's parent-death signal and its runtime directory
(sockets, ready files) in /tmp. ``LastResort`` does, synchronously and without the event
loop: SIGTERM to every child still running, a short wait, SIGKILL for the rest, then the
directory removed.

SIGTERM: while a pool is open, and only if the process had no SIGTERM handler of its own
(the default disposition would end it without any cleanup), a handler stops every open pool
and then ends the process by SIGTERM as before (exit status 143). A program with its own
handler keeps it, and stops its pools its own way (leaving their ``with`` blocks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from tokenhive.clients.pool.pool import PoolProcesses

GRACE = 3.0  # seconds children get between SIGTERM and SIGKILL

_open: set[LastResort] = set()
_lock = threading.Lock()
_installed = False  # our SIGTERM handler is in place


class LastResort:
    """The state needed to stop one pool with no event loop; ``run`` is idempotent."""

    def __init__(self, processes: PoolProcesses, run_dir: Path) -> None:
        self.processes = processes
        self.run_dir = run_dir
        self.done = False

    def pids(self) -> list[int]:
        replicas = self.processes.supervisor.replicas
        return [r.process.pid for r in replicas
                if r.process is not None and r.process.returncode is None]

    def run(self) -> None:
        if self.done:
            return
        self.done = True
        self.processes.supervisor.abandon()
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        while (pids := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.02)  # waiting for other processes to exit: nothing to await here
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def register(resort: LastResort) -> None:
    global _installed
    with _lock:
        _open.add(resort)
        if _installed or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _installed = True


def unregister(resort: LastResort) -> None:
    global _installed
    with _lock:
        _open.discard(resort)
        if (_installed and not _open
                and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is _on_sigterm):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _installed = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    with _lock:
        pools = list(_open)
        _open.clear()
    for resort in pools:
        resort.run()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # end as SIGTERM would have


def _running(pid: int) -> bool:
    """False once ``pid`` has exited (a zombie counts as exited: asyncio reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
