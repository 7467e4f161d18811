"""The node agent's life: start the planned workers under the pool's Supervisor, report the
node to the broker, and drain everything on SIGTERM/SIGINT.

Reports go out every ``heartbeat_interval`` and at once when a worker changes state
(started, crashed and waiting to restart, given up). On the first signal the node reports
``stopping=True`` (and keeps reporting while it drains, so the broker does not take the
silence for a dead node), SIGTERMs every worker (each finishes its in-flight work within
``drain_timeout`` and says Goodbye), sends a last report without workers and exits 0. A
second signal hurries: it is passed on to the workers, which then give up what is left.
Exit 1 when every worker has given up for good (nothing left to serve), as ``tokenhive up``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from prometheus_client import generate_latest

from tokenhive import transport
from tokenhive.clients.node.gpus import Discovery
from tokenhive.clients.node.metrics import node_registry
from tokenhive.clients.node.plan import NodePlan, WorkerPlan
from tokenhive.clients.node.report_link import ReportLink
from tokenhive.clients.pool.pool import worker_argv, worker_stdin
from tokenhive.clients.pool.supervisor import ProcessSpec, Replica, State, Supervisor
from tokenhive.metrics_http import MetricsServer
from tokenhive.schemas.messages import GpuInfo, NodeReport
from tokenhive.schemas.node_config import NodeConfig

log = logging.getLogger("tokenhive.node")

EXIT_OK = 0
EXIT_ALL_FAILED = 1
# A worker drains for drain_timeout, then waits up to 2 s to say Goodbye (GOODBYE_TIMEOUT_S):
# only after both may the supervisor kill it.
STOP_MARGIN_S = 5.0
LAST_REPORT_WAIT_S = 2.0
UNSENT_WARN = 5  # reports in a row that found no connection before the node says so


class NodeAgent:
    def __init__(self, *, node: str, host: str, join: str, config: NodeConfig, plan: NodePlan,
                 discovery: Discovery, run_dir: Path, log_level: str = "info",
                 curve: transport.CurveKeys | None = None,
                 worker_flags: list[str] | None = None, backoff_base: float = 0.5) -> None:
        self.node = node
        self.host = host
        self.join = join
        self.config = config
        self.plan = plan
        self.discovery = discovery
        self.run_dir = run_dir
        self.log_level = log_level
        self.curve = curve
        self.worker_flags = worker_flags or []  # after worker_argv's: timing, keys, packing
        self.supervisor = Supervisor(backoff_base=backoff_base,
                                     backoff_max=config.restart_backoff_max,
                                     on_change=self._on_change)
        self.workers: list[tuple[WorkerPlan, Replica]] = []
        self.stopping = False
        self._changed = asyncio.Event()  # a worker changed state: report now
        self._stop = asyncio.Event()
        self._all_failed = asyncio.Event()
        self._signals = 0
        self.gpus: list[GpuInfo] = []  # as the last report sampled them (for /metrics)
        self._reporting = True  # the reporter's loop runs while this holds
        self._unsent = 0  # reports in a row that could not leave

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        link = ReportLink(self.join, self.node, self.curve)
        reporter: asyncio.Task[None] | None = None
        metrics: MetricsServer | None = None
        try:
            if self.config.metrics:  # before the workers: a bad address fails at once
                registry = node_registry(self)
                metrics = MetricsServer(lambda: generate_latest(registry))
                bound = await metrics.start(self.config.metrics)
                log.info("node metrics", extra={"url": f"http://{bound}/metrics"})
            self._start_workers()
            log.info("node started", extra={
                "node": self.node, "broker": self.join, "gpus_from": self.discovery.source,
                "gpus": [g.index for g in self.discovery.gpus],
                "workers": [w.worker_id for w in self.plan.workers]})
            reporter = loop.create_task(self._report_loop(link), name="node-reports")
            stop = loop.create_task(self._stop.wait())
            failed = loop.create_task(self._all_failed.wait())
            await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            failed.cancel()
            code = EXIT_ALL_FAILED if self._all_failed.is_set() else EXIT_OK
            if code == EXIT_ALL_FAILED:
                log.error("every worker failed for good; the node stops")
            else:
                log.info("stopping: draining workers", extra={
                    "node": self.node, "drain_timeout": self.config.drain_timeout})
            self.stopping = True
            self._changed.set()  # the reporter says "stopping" at once
            await self.supervisor.stop(
                [r for _, r in self.workers],
                grace=self.config.drain_timeout + STOP_MARGIN_S)
            self._reporting = False
            self._changed.set()  # the reporter wakes, sees it is done and returns
            await reporter
            await link.send_last(self._report(self.discovery.sample({})), LAST_REPORT_WAIT_S)
            log.info("node stopped", extra={"node": self.node, "code": code})
            return code
        finally:
            if reporter is not None and not reporter.done():
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
            await self.supervisor.stop(grace=1.0)  # after an error above: leave no child
            await link.close()
            if metrics is not None:
                await metrics.close()
            self.discovery.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _start_workers(self) -> None:
        argv = [*worker_argv(self.join, self.log_level), *self.worker_flags]
        for plan in self.plan.workers:
            replica = self.supervisor.start(ProcessSpec(
                name=plan.worker_id, argv=argv, env=plan.env, stdin=worker_stdin(plan.spec),
                ready_file=str(self.run_dir / f"{plan.worker_id}.ready"),
            ))
            self.workers.append((plan, replica))

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("signal received; draining (a second one hurries)",
                     extra={"signal": sig.name})
            self._stop.set()
            return
        log.warning("second signal: workers give up their in-flight work",
                    extra={"signal": sig.name})
        for _, replica in self.workers:
            process = replica.process
            if process is not None and process.returncode is None:
                try:
                    process.send_signal(signal.SIGTERM)  # a worker's second: it hurries
                except ProcessLookupError:
                    pass

    def _on_change(self, replica: Replica) -> None:
        self._changed.set()
        if self.workers and all(r.state is State.GAVE_UP for _, r in self.workers):
            self._all_failed.set()

    # -- reports -----------------------------------------------------------------------------

    async def _report_loop(self, link: ReportLink) -> None:
        interval = self.config.heartbeat_interval
        while self._reporting:
            self._changed.clear()
            pinned = self._pinned()
            if self.discovery.source == "nvml":  # NVML calls block for a few ms each
                gpus = await asyncio.to_thread(self.discovery.sample, pinned)
            else:
                gpus = self.discovery.sample(pinned)
            self.gpus = gpus
            self._note_delivery(link.send_or_drop(self._report(gpus)))
            try:  # (not wait_for: on 3.11 it may swallow a cancel that meets a set event)
                async with asyncio.timeout(interval):
                    await self._changed.wait()
            except TimeoutError:
                pass  # the periodic report

    def _note_delivery(self, sent: bool) -> None:
        """One warning when reports stop getting out (no connection: the broker is down,
        unreachable, or refuses our CURVE key), one line when they get out again."""
        if sent:
            if self._unsent >= UNSENT_WARN:
                log.info("node reports reach the broker again", extra={"broker": self.join})
            self._unsent = 0
            return
        self._unsent += 1
        if self._unsent == UNSENT_WARN:
            log.warning("no connection to the broker: node reports are not getting out (is "
                        "it running and reachable, and are the CURVE keys right?)",
                        extra={"broker": self.join})

    def _pinned(self) -> dict[int, list[str]]:
        """GPU index -> the ids of the workers on it that are running or coming back."""
        out: dict[int, list[str]] = {}
        for plan, replica in self.workers:
            if replica.state in (State.STARTING, State.RUNNING, State.BACKOFF):
                for index in plan.gpus:
                    out.setdefault(index, []).append(plan.worker_id)
        return out

    def _report(self, gpus: list[GpuInfo]) -> NodeReport:
        by_state: dict[State, list[str]] = {}
        for plan, replica in self.workers:
            by_state.setdefault(replica.state, []).append(plan.worker_id)
        return NodeReport(
            node=self.node, host=self.host, gpus=gpus,
            workers=by_state.get(State.STARTING, []) + by_state.get(State.RUNNING, []),
            failed=by_state.get(State.GAVE_UP, []), restarting=by_state.get(State.BACKOFF, []),
            stopping=self.stopping,
        )
