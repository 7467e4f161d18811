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
import contextlib
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


#: signals that mean the program itself broke (not a stop request), and what they mean
CRASH_SIGNALS: dict[int, str] = {
    signal.SIGILL: "illegal instruction",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating-point exception",
    signal.SIGABRT: "aborted",
}
SIGILL_HINT = (
    "llama.cpp was built for CPU features this machine cannot run: see README, Troubleshooting"
)
# A -march=native build on an AMX-advertising VM was seen dying with SIGSEGV at model load, too.
CRASH_HINT = (
    "if it runs llama.cpp, it may have been built for CPU features this machine cannot run: "
    "see README, Troubleshooting"
)


def crash_hint(rc: int) -> str:
    return SIGILL_HINT if rc == -signal.SIGILL else CRASH_HINT


def describe_exit(rc: int | None) -> str:
    """An exit status in words: ``exit code 3``, ``SIGILL (illegal instruction)``."""
    if rc is None:
        return "still running"
    if rc >= 0:
        return f"exit code {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"
    meaning = CRASH_SIGNALS.get(-rc)
    return f"{name} ({meaning})" if meaning else name


class ProcessSpec(msgspec.Struct, kw_only=True):
    name: str
    argv: list[str]
    env: dict[str, str] = msgspec.field(default_factory=dict)  # added to os.environ
    # Written to the child's stdin, then closed: how a worker gets its spec, which may hold
    # headers and env values that must not be readable in /proc/*/cmdline.
    stdin: bytes | None = None
    # A path the child creates once it is ready (TOKENHIVE_READY_FILE); a child that keeps
    # crashing without ever creating it is given up after ``crash_limit`` runs in a row.
    ready_file: str | None = None


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
        self.crashes_before_ready = 0  # crashes in a row of runs that never became ready
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
        crash_limit: int = 3,
        on_change: Callable[[Replica], None] | None = None,
    ) -> None:
        self.crash_limit = crash_limit
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

    def abandon(self) -> None:
        """Restart nothing from now on: for a last-resort stop that signals the children
        itself, from outside the event loop (``last_resort``)."""
        self._stopping.update(self.replicas)

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
            if self._crashed_too_often(replica, rc):
                log.error("child keeps crashing before it is ready; not restarting it",
                          extra={"child": replica.name, "exit": rc, "reason": replica.reason})
                self._set(replica, State.GAVE_UP)
                return
            failures = 1 if time.monotonic() - started >= self.stable_after else failures + 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
            extra: dict[str, object] = {"child": replica.name, "exit": rc,
                                        "status": describe_exit(rc), "in_s": round(delay, 2)}
            if -rc in CRASH_SIGNALS:
                extra["crashes_in_a_row"] = replica.crashes_before_ready
                log.error("%s crashed: %s; %s; restarting", replica.name, describe_exit(rc),
                          crash_hint(rc), extra=extra)
            else:
                log.warning("child exited; restarting", extra=extra)
            self._set(replica, State.BACKOFF)
            await self._sleep_unless_stopping(replica, delay)
        self._set(replica, State.STOPPED)

    def _crashed_too_often(self, replica: Replica, rc: int) -> bool:
        """Count crashes (a signal like SIGILL, not a stop) of runs that never got ready."""
        ready_file = replica.spec.ready_file
        if ready_file is None:
            return False
        if os.path.exists(ready_file) or -rc not in CRASH_SIGNALS:
            replica.crashes_before_ready = 0
            return False
        replica.crashes_before_ready += 1
        if replica.crashes_before_ready < self.crash_limit:
            return False
        replica.reason = (
            f"worker crashed: {describe_exit(rc)} before it was ready, "
            f"{replica.crashes_before_ready} times in a row; {crash_hint(rc)}"
        )
        return True

    async def _run_once(self, replica: Replica) -> int:
        env = {**os.environ, **replica.spec.env}
        spec = replica.spec
        if spec.ready_file is not None:
            env["TOKENHIVE_READY_FILE"] = spec.ready_file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spec.ready_file)
        replica.starts += 1
        try:
            replica.process = await asyncio.create_subprocess_exec(
                *spec.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent,
                stdin=asyncio.subprocess.PIPE if spec.stdin is not None else None,
            )
        except OSError as exc:
            log.error("could not start child", extra={"child": replica.name, "error": str(exc)})
            return 1
        if spec.stdin is not None and replica.process.stdin is not None:
            # A child that dies before reading it is reported by its exit status, not here.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                replica.process.stdin.write(spec.stdin)
                await replica.process.stdin.drain()
            replica.process.stdin.close()
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
