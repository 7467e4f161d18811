"""The worker runtime: one backend, one DEALER to the broker, up to ``slots`` requests at once.

Life of a worker (exit codes in command.py):

1. Connect and send Ready with ``health=loading`` (the broker routes only to ``ok``), then
   start the backend. Loaded: Ready again with the backend's real facts and ``health=ok``, and
   a Heartbeat. Load failed: Goodbye(code=model_load_failed), exit 3.
2. Serve: each Dispatch runs as an asyncio task (``job.py``) that streams chunks and ends with
   exactly one terminal message. A Dispatch beyond the free slots, while loading or while
   draining gets an ``overloaded`` (retryable) terminal at once, never silence. CancelWork
   and the request's own deadline stop a job between tokens with that reason as the code.
3. Heartbeats every ``heartbeat_interval`` carry free slots, in-flight count and the health
   verdict (``health.py``); one also goes out at once when the verdict changes.
4. SIGTERM/SIGINT drains: heartbeats turn ``free_slots=0, health=unhealthy, detail=draining``
   so the broker routes nothing more (a Dispatch already on its way gets ``overloaded``), the
   in-flight work finishes (up to ``drain_timeout``; what is left then ends with a
   ``worker_lost`` terminal), then Goodbye and exit 0. A second signal stops waiting.

Broker loss (nothing from the broker for ``heartbeat_liveness`` intervals; connection.py
reconnects on a fresh socket): the broker applies the same rule to us, so it has already
answered or re-queued our in-flight requests. We therefore cancel in-flight work; its
``worker_lost`` terminals go out on the new socket right after Ready (a broker that does not
know the keys drops them), so even then every Dispatch gets exactly one terminal.

Reregister (the broker does not know us, e.g. it restarted before we noticed): send Ready
again. In-flight work keeps running (their terminals reach a broker that counts them as late);
cancelling it could hit work the new broker has just dispatched if two Reregisters cross one
Ready. Rejected: logged; a ``protocol_version`` rejection ends the worker with exit code 4.

The runtime never blocks the event loop; backends that compute in threads do so inside their
``stream`` (see backend.py). A late heartbeat tick is logged as a blocked loop, so a backend
that does block is easy to spot.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import signal
import time
from pathlib import Path

from tokenhive import transport
from tokenhive.schemas.config import (
    AnthropicSpec,
    AnyWorkerSpec,
    AzureSpec,
    OpenAISpec,
    WorkerConfig,
)
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.messages import (
    CancelWork,
    Dispatch,
    Error,
    Goodbye,
    Health,
    Heartbeat,
    Ready,
    Rejected,
)
from tokenhive.workers.backend import Backend, BackendInfo, BackendStats, HealthReport
from tokenhive.workers.backends import backend_kind, make_backend
from tokenhive.workers.connection import BrokerConnection
from tokenhive.workers.health import HealthTracker, Verdict, rss_mb
from tokenhive.workers.job import Job, Terminal
from tokenhive.workers.token_rate import TokenRate

log = logging.getLogger("tokenhive.worker")

GOODBYE_TIMEOUT_S = 2.0  # how long a leaving worker waits for a connection to say Goodbye


class ExitCode(enum.IntEnum):
    OK = 0
    CRASHED = 1
    USAGE = 2
    MODEL_LOAD_FAILED = 3
    PROTOCOL_REJECTED = 4


def default_worker_id(model: str) -> str:
    return f"{model}-{os.getpid()}"


class WorkerRuntime:
    def __init__(self, config: WorkerConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.spec = config.spec
        self.worker_id = self.spec.id or default_worker_id(self.spec.model)
        self.node = config.node or os.environ.get("TOKENHIVE_NODE", "")
        self.kind = backend_kind(self.spec)
        # Built in _load when None, so that a backend failing to build is a load failure.
        self.backend: Backend | None = backend
        curve = (transport.load_curve_keys(config.curve_secret_key, config.curve_server_key)
                 if config.curve_secret_key else None)
        self.conn = BrokerConnection(
            config.broker, self, interval=config.heartbeat_interval,
            liveness=config.heartbeat_liveness, reconnect_max=config.reconnect_max, curve=curve,
        )
        self.link = self.conn.link
        if config.pack_chunks or self.spec.pack_chunks:  # chunks per loop turn, per client
            self.link.enable_packing()
        self.health = HealthTracker(self.spec.degraded_after_errors)
        self.jobs: dict[bytes, Job] = {}
        self.info = BackendInfo(backend=self.kind)
        self.loaded = False
        self.draining = False
        self.exit_code = ExitCode.OK
        self._farewell = Goodbye(self.worker_id, reason="stopped")
        self._last_health: Verdict | None = None
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._tps = TokenRate()

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        connection = asyncio.create_task(self.conn.run(), name="broker-connection")
        connection.add_done_callback(self._on_connection_end)
        try:
            if await self._load():
                await self._stop.wait()
                if self.exit_code == ExitCode.OK:
                    await self._drain()
            await self._abandon_jobs(ErrorCode.WORKER_LOST)
        finally:
            connection.cancel()
            await asyncio.gather(connection, return_exceptions=True)
            if self.exit_code != ExitCode.PROTOCOL_REJECTED:  # it could not read a Goodbye
                if not await self.conn.say_goodbye(self._farewell, GOODBYE_TIMEOUT_S):
                    log.warning("no broker to say goodbye to", extra={"worker": self.worker_id})
            await self._close_backend()
            self.link.terminate()
        log.info("worker exiting", extra={"worker": self.worker_id, "code": int(self.exit_code)})
        return int(self.exit_code)

    async def _load(self) -> bool:
        log.info("loading backend", extra={"worker": self.worker_id, "backend": self.kind})
        started = time.monotonic()
        start = asyncio.create_task(self._start_backend())
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not start.done() or start.cancelled():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            log.info("stopped while loading", extra={"worker": self.worker_id})
            return False
        exc = start.exception()
        if exc is not None:
            log.error("model load failed", exc_info=exc, extra={"worker": self.worker_id})
            self.exit_code = ExitCode.MODEL_LOAD_FAILED
            self._farewell = Goodbye(
                self.worker_id, reason=f"{type(exc).__name__}: {exc}",
                code=ErrorCode.MODEL_LOAD_FAILED,
            )
            return False
        assert self.backend is not None
        self.info = self.backend.info()
        self.loaded = True
        log.info("backend loaded", extra={
            "worker": self.worker_id, "load_s": round(time.monotonic() - started, 3),
            "context_length": self.info.context_length, "device": self.info.device,
        })
        self.conn.announce()  # if not registered yet, registration will announce it
        ready_file = os.environ.get("TOKENHIVE_READY_FILE")
        if ready_file:  # tells a supervisor this run got past loading and the self-test
            Path(ready_file).touch()  # noqa: ASYNC240 (a tmpfs inode, once per process)
        return True

    async def _start_backend(self) -> None:
        if self.backend is None:
            self.backend = make_backend(self.spec)
        await self.backend.start()

    async def _drain(self) -> None:
        self.draining = True
        self._farewell = Goodbye(self.worker_id, reason="drained")
        log.info("draining", extra={"worker": self.worker_id, "in_flight": len(self.jobs)})
        self.conn.send_heartbeat()
        tasks = [job.task for job in self.jobs.values() if job.task is not None]
        if tasks:
            all_done = asyncio.ensure_future(asyncio.wait(tasks))
            hurry = asyncio.create_task(self._hurry.wait())
            await asyncio.wait(
                {all_done, hurry}, timeout=self.config.drain_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            all_done.cancel()
            hurry.cancel()
        if self.jobs:
            log.warning("drain incomplete; giving up in-flight work",
                        extra={"worker": self.worker_id, "in_flight": len(self.jobs)})

    async def _close_backend(self) -> None:
        if self.backend is None:
            return
        try:
            await self.backend.close()
        except Exception:
            log.exception("backend close failed", extra={"worker": self.worker_id})

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("second signal: not waiting for in-flight work",
                        extra={"worker": self.worker_id})
            self._hurry.set()
            return
        log.info("signal received", extra={"worker": self.worker_id, "signal": sig.name})
        self._stop.set()

    def _on_connection_end(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("broker connection failed", exc_info=task.exception())
            self.exit_code = ExitCode.CRASHED
            self._stop.set()

    # -- what the connection asks of us (connection.ConnectionOwner) ------------------------

    def handle(self, msg: Dispatch | CancelWork | Rejected) -> None:
        if isinstance(msg, Dispatch):
            self._on_dispatch(msg)
        elif isinstance(msg, CancelWork):
            job = self.jobs.get(msg.key)
            if job is not None:  # else it has already ended and sent its terminal
                job.cancel(msg.reason)
        else:
            log.error("broker rejected us", extra={
                "worker": self.worker_id, "code": msg.code.value, "reason": msg.message})
            if msg.code == ErrorCode.PROTOCOL_VERSION:
                self.exit_code = ExitCode.PROTOCOL_REJECTED
                self._stop.set()

    async def broker_lost(self) -> None:
        await self._abandon_jobs(ErrorCode.WORKER_LOST)

    def ready(self) -> Ready:
        verdict = self._verdict()
        info = self.info
        return Ready(
            worker=self.worker_id, model=self.spec.model, backend=self.kind,
            slots=self.spec.slots, context_length=info.context_length, device=info.device,
            kinds=list(info.kinds), pid=os.getpid(), memory_mb=info.memory_mb or rss_mb(),
            health=verdict.health, detail=verdict.detail,
            upstream_model=upstream_name(self.spec), node=self.node,
        )

    def heartbeat(self) -> Heartbeat:
        verdict = self._last_health = self._verdict()
        free = self.spec.slots - len(self.jobs) if self.loaded and not self.draining else 0
        stats = self._stats()
        return Heartbeat(
            worker=self.worker_id, free_slots=max(free, 0), in_flight=len(self.jobs),
            health=verdict.health, detail=verdict.detail, memory_mb=rss_mb(),
            retry_after=verdict.retry_after,
            decode_tps=round(self._tps.update(stats.generated_tokens, time.monotonic()), 2),
            kv_used=min(1.0, max(0.0, stats.kv_used)), prefix_hits=max(0, stats.prefix_hits),
        )

    def _stats(self) -> BackendStats:
        backend = self.backend
        if not self.loaded or backend is None:
            return BackendStats()
        try:
            return backend.stats()
        except Exception:  # figures are a nicety: a failing hook must not stop heartbeats
            log.exception("backend stats failed", extra={"worker": self.worker_id})
            return BackendStats()

    def _verdict(self) -> Verdict:
        try:
            backend = self.backend
            report = backend.health() if self.loaded and backend is not None else HealthReport()
        except Exception as exc:
            report = HealthReport(Health.UNHEALTHY, f"health check failed: {exc}")
        return self.health.verdict(report, loaded=self.loaded, draining=self.draining)

    # -- requests --------------------------------------------------------------------------

    def _on_dispatch(self, dispatch: Dispatch) -> None:
        request = dispatch.request
        refusal: Error | None = None
        if dispatch.key in self.jobs:
            log.error("duplicate dispatch key", extra={"worker": self.worker_id, "id": request.id})
            refusal = Error.make(request.id, ErrorCode.INTERNAL, "duplicate dispatch key")
        elif not self.loaded or self.draining or len(self.jobs) >= self.spec.slots:
            why = "loading" if not self.loaded else "draining" if self.draining else (
                f"all {self.spec.slots} slots busy")
            refusal = Error.make(request.id, ErrorCode.OVERLOADED, f"worker {why}")
        elif request.deadline is not None and request.deadline <= time.time():
            refusal = Error.make(request.id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed")
        if refusal is not None:
            refusal.worker = self.worker_id
            self.conn.send_terminal(dispatch.key, refusal)
            return
        assert self.backend is not None  # loaded
        job = Job(dispatch, self.backend, self.link, self.worker_id, self.info.kinds,
                  self.spec.coalesce_ms / 1000.0)
        self.jobs[dispatch.key] = job
        job.task = asyncio.create_task(job.run())
        # The terminal is sent from the task's done-callback, not from inside the task: a
        # task cancelled before it first runs never executes its body, and must still answer.
        job.task.add_done_callback(functools.partial(self._job_done, job))
        if request.deadline is not None:
            job.timer = asyncio.get_running_loop().call_later(
                request.deadline - time.time(), job.cancel, ErrorCode.DEADLINE_EXCEEDED)

    def _job_done(self, job: Job, task: asyncio.Task[Terminal]) -> None:
        if task.cancelled():
            outcome: Terminal = job.stopped()
        elif task.exception() is not None:  # Job.run catches everything; this is a bug
            log.error("job crashed", exc_info=task.exception(), extra={"worker": self.worker_id})
            outcome = Error.make(job.request.id, ErrorCode.INTERNAL, repr(task.exception()),
                                 chunks_sent=job.chunks.sent, worker=self.worker_id)
        else:
            outcome = task.result()
        if job.timer is not None:
            job.timer.cancel()
        del self.jobs[job.key]
        self.health.record(outcome)
        self.conn.send_terminal(job.key, outcome)
        if isinstance(outcome, Error):
            log.info("request failed", extra={
                "worker": self.worker_id, "id": outcome.id, "code": outcome.code.value,
                "chunks_sent": outcome.chunks_sent, "error": outcome.message})
        if self._last_health is None or self._verdict().health != self._last_health.health:
            self.conn.send_heartbeat()  # tell the broker about a health change now

    async def _abandon_jobs(self, reason: ErrorCode) -> None:
        tasks = [job.task for job in self.jobs.values() if job.task is not None]
        for job in list(self.jobs.values()):
            job.cancel(reason)
        await asyncio.gather(*tasks, return_exceptions=True)


def upstream_name(spec: AnyWorkerSpec) -> str:
    """The model name a remote backend sends upstream (what the broker's price table is
    keyed by); "" for local backends."""
    if isinstance(spec, AzureSpec):
        return spec.deployment
    if isinstance(spec, (OpenAISpec, AnthropicSpec)):
        return spec.upstream_model or spec.model
    return ""
