"""Keep a set of child processes (a broker, its workers) running, and stop them cleanly.

A child that exits is restarted after an exponential backoff (reset once a run lasted
``stable_after`` seconds), except for exit codes that a restart cannot fix (see
``NO_RESTART``, e.g. 3 = the model failed to load): that replica is reported and given up.

Children run in their own session (a terminal's Ctrl-C reaches only us, and we stop them in
order: workers drain first, then the broker) and get SIGTERM if we die without cleaning up
(Linux ``PR_SET_PDEATHSIG``), so no pool outlives its supervisor.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import msgspec

log = logging.getLogger("tokenhive.supervisor")

#: exit code -> why restarting is pointless (the worker command's documented exit codes)
NO_RESTART: dict[int, str] = {
    2: "configuration error",
    3: "model load failed",
    4: "rejected by the broker (protocol version)",
}


class ProcessSpec(msgspec.Struct, kw_only=True):
    name: str
    argv: list[str]
    env: dict[str, str] = msgspec.field(default_factory=dict)  # added to os.environ


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"  # exited, waiting to restart
    GAVE_UP = "gave_up"  # exited with a NO_RESTART code
    STOPPED = "stopped"


class Replica:
    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self.state = State.STARTING
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.last_exit: int | None = None
        self.reason = ""  # why we gave up
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # cuts a restart backoff short when stopping

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Supervisor:
    def __init__(
        self,
        *,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 10.0,
        on_change: Callable[[Replica], None] | None = None,
    ) -> None:
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.replicas: list[Replica] = []
        self._on_change = on_change
        self._stopping: set[Replica] = set()
        self.changed = asyncio.Event()  # set on every state change; a waiter clears it

    def start(self, spec: ProcessSpec) -> Replica:
        replica = Replica(spec)
        self.replicas.append(replica)
        replica.task = asyncio.get_running_loop().create_task(
            self._keep_alive(replica), name=f"supervise-{spec.name}"
        )
        return replica

    async def stop(self, replicas: list[Replica] | None = None, grace: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left."""
        targets = list(self.replicas if replicas is None else replicas)
        self._stopping.update(targets)
        for replica in targets:
            replica.wake.set()
            _signal(replica, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for replica in targets:
            if replica.task is None:
                continue
            try:
                left = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(asyncio.shield(replica.task), left)
            except TimeoutError:
                log.warning("child did not stop in time; killing", extra={"child": replica.name})
                _signal(replica, signal.SIGKILL)
                await replica.task

    async def _keep_alive(self, replica: Replica) -> None:
        failures = 0
        while replica not in self._stopping:
            started = time.monotonic()
            rc = await self._run_once(replica)
            if replica in self._stopping:
                break
            if rc in NO_RESTART:
                replica.reason = NO_RESTART[rc]
                log.error("child failed; not restarting it",
                          extra={"child": replica.name, "exit": rc, "reason": replica.reason})
                self._set(replica, State.GAVE_UP)
                return
            failures = 1 if time.monotonic() - started >= self.stable_after else failures + 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
            log.warning("child exited; restarting",
                        extra={"child": replica.name, "exit": rc, "in_s": round(delay, 2)})
            self._set(replica, State.BACKOFF)
            await self._sleep_unless_stopping(replica, delay)
        self._set(replica, State.STOPPED)

    async def _run_once(self, replica: Replica) -> int:
        env = {**os.environ, **replica.spec.env}
        replica.starts += 1
        try:
            replica.process = await asyncio.create_subprocess_exec(
                *replica.spec.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            log.error("could not start child", extra={"child": replica.name, "error": str(exc)})
            return 1
        log.info("child started", extra={"child": replica.name, "pid": replica.process.pid})
        if replica in self._stopping:  # stop() came while we were starting it
            _signal(replica, signal.SIGTERM)
        self._set(replica, State.RUNNING)
        rc = await replica.process.wait()
        replica.last_exit = rc
        return rc

    async def _sleep_unless_stopping(self, replica: Replica, delay: float) -> None:
        try:
            await asyncio.wait_for(replica.wake.wait(), delay)
        except TimeoutError:
            pass

    def _set(self, replica: Replica, state: State) -> None:
        replica.state = state
        self.changed.set()
        if self._on_change is not None:
            self._on_change(replica)


def _signal(replica: Replica, sig: signal.Signals) -> None:
    process = replica.process
    if process is not None and process.returncode is None:
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
