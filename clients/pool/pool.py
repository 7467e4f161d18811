"""A broker and its workers, started from a PoolConfig as supervised subprocesses.

Order matters both ways: the broker starts first and announces its bound endpoints in its
ready file (``--ready-file``); the workers start against them. On stop, workers go first
(they drain in-flight work and say Goodbye), then the broker.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import msgspec

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.pool.supervisor import ProcessSpec, Replica, State, Supervisor
from tokenhive.schemas.config import AnyWorkerSpec, BrokerConfig, PoolConfig
from tokenhive.schemas.errors import BrokerUnavailable, ModelLoadFailed, TokenHiveError
from tokenhive.transport import CurveKeys, load_curve_keys

READY_HEALTH = ("ok", "degraded")


class PoolStartError(TokenHiveError):
    """The pool did not come up (broker never bound, workers never registered)."""


class Endpoints(msgspec.Struct):
    clients: str
    workers: str
    metrics: str = ""  # HOST:PORT of the broker's /metrics ("" when off)


def broker_argv(ready_file: Path, log_level: str) -> list[str]:
    """The broker command line; its config (``broker_stdin``) goes to stdin as JSON."""
    return [sys.executable, "-m", "tokenhive.broker", "--config-json", "-",
            "--ready-file", str(ready_file), "--log-level", log_level]


def broker_stdin(config: BrokerConfig) -> bytes:
    return msgspec.json.encode(config)


def worker_argv(broker: str, log_level: str, curve_key_file: str = "") -> list[str]:
    """The worker command line; the spec itself goes to stdin (``worker_stdin``), because
    argv is readable by every user in /proc/*/cmdline and a spec may carry headers and env.
    ``curve_key_file``: the broker's own ``*.key_secret``, when its worker side is keyed
    (its own key is always allowed; the file holds the server's public key too)."""
    argv = [
        sys.executable, "-m", "tokenhive.workers", "--broker", broker,
        "--spec-json", "-", "--log-level", log_level,
    ]
    if curve_key_file:
        argv += ["--curve-secret-key", curve_key_file, "--curve-server-key", curve_key_file]
    return argv


def own_curve(broker: BrokerConfig, side: str) -> CurveKeys | None:
    """For the processes a pool runs itself, on a keyed ``side`` ("clients" or "workers"):
    the broker's own key pair, both as our key and as the server key. None when unkeyed."""
    allow = broker.curve_allow_clients if side == "clients" else broker.curve_allow_workers
    if not broker.curve_secret_key or not (allow or broker.curve_allow):
        return None
    return load_curve_keys(broker.curve_secret_key, broker.curve_secret_key)


def worker_stdin(spec: AnyWorkerSpec) -> bytes:
    return msgspec.json.encode(spec)


def replica_specs(spec: AnyWorkerSpec) -> list[tuple[AnyWorkerSpec, dict[str, str]]]:
    """One (spec, env) per replica: distinct ids, and CUDA_VISIBLE_DEVICES=gpus[i] (cycling
    when there are more replicas than gpus)."""
    out: list[tuple[AnyWorkerSpec, dict[str, str]]] = []
    for i in range(spec.count):
        env = dict(spec.env)
        if spec.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(spec.gpus[i % len(spec.gpus)])
        worker_id = f"{spec.id}-{i}" if spec.id and spec.count > 1 else spec.id
        out.append((msgspec.structs.replace(spec, id=worker_id, count=1), env))
    return out


class PoolProcesses:
    def __init__(
        self, config: PoolConfig, *, run_dir: Path, log_level: str = "info",
        backoff_base: float = 0.5,
    ) -> None:
        self.config = config
        self.log_level = log_level
        self.run_dir = run_dir
        self.ready_file = run_dir / "broker.ready.json"
        self.supervisor = Supervisor(
            backoff_base=backoff_base, backoff_max=config.restart_backoff_max,
            on_change=self._on_replica_change,
        )
        self._reports: set[asyncio.Task[None]] = set()
        self.broker: Replica | None = None
        self.workers: list[tuple[AnyWorkerSpec, Replica]] = []
        self.endpoints: Endpoints | None = None
        # keyed sides: what our own readiness client and workers connect with
        self.client_curve = own_curve(config.broker, "clients")
        self._worker_key = (config.broker.curve_secret_key
                            if own_curve(config.broker, "workers") is not None else "")
        # `tokenhive up` is one host: its workers report it as their node
        self.node = socket.gethostname()

    async def start(self, ready_timeout: float = 30.0) -> Endpoints:
        """Start the broker, wait until it is bound, then start every worker replica."""
        self.ready_file.unlink(missing_ok=True)
        self.broker = self.supervisor.start(ProcessSpec(
            name="broker", argv=broker_argv(self.ready_file, self.log_level),
            stdin=broker_stdin(self.config.broker),
        ))
        self.endpoints = await self._wait_ready_file(ready_timeout)
        for spec_index, spec in enumerate(self.config.workers):
            for i, (replica_spec, env) in enumerate(replica_specs(spec)):
                name = f"worker[{spec_index}.{i}]:{spec.model}"
                replica = self.supervisor.start(ProcessSpec(
                    name=name,
                    argv=worker_argv(self.endpoints.workers, self.log_level, self._worker_key),
                    env={"TOKENHIVE_NODE": self.node, **env}, stdin=worker_stdin(replica_spec),
                    ready_file=str(self.run_dir / f"worker-{spec_index}.{i}.ready"),
                ))
                self.workers.append((spec, replica))
        return self.endpoints

    async def wait_workers(self, client: AsyncClient, ready_timeout: float = 120.0) -> None:
        """Until every replica that has not given up is registered and healthy at the broker.
        Raises ModelLoadFailed when every replica gave up, PoolStartError on timeout."""
        deadline = time.monotonic() + ready_timeout
        while True:
            alive = [(s, r) for s, r in self.workers if r.state is not State.GAVE_UP]
            if not alive:
                reasons = sorted({f"{r.name}: {r.reason}" for _, r in self.workers})
                raise ModelLoadFailed("every worker failed to start: " + "; ".join(reasons))
            try:
                status = await client.status(timeout=2.0)
            except BrokerUnavailable:
                status = None
            if status is not None:
                ready: dict[str, int] = {}
                for w in status.workers:
                    if w.health in READY_HEALTH:
                        ready[w.model] = ready.get(w.model, 0) + 1
                wanted: dict[str, int] = {}
                for spec, _ in alive:
                    wanted[spec.model] = wanted.get(spec.model, 0) + 1
                if all(ready.get(m, 0) >= n for m, n in wanted.items()):
                    return
            if time.monotonic() >= deadline:
                raise PoolStartError(f"workers not ready after {ready_timeout}s (see their logs)")
            await self._changed_or(0.2)

    def _on_replica_change(self, replica: Replica) -> None:
        """When every replica of a model has given up, tell the broker, so requests for it
        fail at once with the reason instead of waiting for a worker that is not coming."""
        if replica.state is not State.GAVE_UP or self.endpoints is None:
            return
        model = next((s.model for s, r in self.workers if r is replica), None)
        if model is None:
            return
        if all(r.state is State.GAVE_UP for s, r in self.workers if s.model == model):
            reason = f"every worker of model {model!r} failed: {replica.reason}"
            task = asyncio.get_running_loop().create_task(
                self._report_failed(self.endpoints.clients, model, reason))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    async def _report_failed(self, address: str, model: str, reason: str) -> None:
        try:
            async with AsyncClient(address, curve=self.client_curve) as client:
                await client.mark_model_failed(model, reason, timeout=5.0)
        except TokenHiveError:  # the broker is gone too: nothing left to tell
            pass

    async def stop(self, drain: float = 30.0) -> None:
        """Workers first (they drain, up to ``drain`` seconds), then the broker."""
        await self.supervisor.stop([r for _, r in self.workers], grace=drain)
        if self.broker is not None:
            await self.supervisor.stop([self.broker], grace=10.0)

    async def _wait_ready_file(self, limit: float) -> Endpoints:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                try:
                    return msgspec.convert(json.loads(self.ready_file.read_text()), Endpoints)
                except (ValueError, msgspec.ValidationError):
                    pass  # caught mid-write; the next poll reads it whole
            broker = self.broker
            if broker is not None and broker.last_exit is not None:
                raise PoolStartError(
                    f"the broker exited with code {broker.last_exit} before it was ready "
                    "(its log above says why)"
                )
            await self._changed_or(0.05)
        raise PoolStartError(f"the broker did not become ready in {limit}s")

    async def _changed_or(self, seconds: float) -> None:
        """Wait for a supervisor state change, at most ``seconds`` (files are polled)."""
        changed = self.supervisor.changed
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), seconds)
        except TimeoutError:
            pass
