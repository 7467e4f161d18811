"""JobService: runs the job store's batch lines on the live pool, through the batch engine.

One loop per server process: move validated batches to ``in_progress``, claim as many
pending lines as the engine has free slots (with a lease, renewed while they run), hand them
to the engine, record each result in the store (only while the lease is still ours), cancel
the in-flight lines of batches being cancelled, and finish the batches that have nothing
left. Several services (processes, hosts) can share one PostgreSQL store: leases keep them
off each other's lines. On stop, lines in flight are cancelled and their leases released, so
another service (or this one, restarted) runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.batch.engine import BatchEngine
from tokenhive.clients.batch.openai_format import parse_item
from tokenhive.clients.batch.store import ClaimedLine, JobStore
from tokenhive.clients.retry import RetryPolicy
from tokenhive.schemas.errors import InvalidRequest

log = logging.getLogger("tokenhive.batch.jobs")

ModelChooser = Callable[[str | None], str | None]

#: batch lines retry what may pass (overload, a lost worker, a silent broker) more patiently
#: than an interactive caller would
BATCH_RETRY = RetryPolicy(max_attempts=6, backoff_base=0.5, backoff_max=30.0)


def model_chooser(local_models: Sequence[str]) -> ModelChooser:
    """A local pool answers every line with its model unless the line names another model
    it serves (so a file written for another provider runs as is); against a running broker
    the line's ``body.model`` is used as is."""
    models = list(local_models)

    def choose(body_model: str | None) -> str | None:
        if models:
            return body_model if body_model in models else models[0]
        return body_model

    return choose


class JobService:
    def __init__(self, store: JobStore, client: AsyncClient, *, concurrency: int = 16,
                 lease_s: float = 30.0, poll_s: float = 1.0,
                 model_for: ModelChooser | None = None, retry: RetryPolicy | None = BATCH_RETRY,
                 owner: str | None = None) -> None:
        self.store = store
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s
        self.poll_s = poll_s
        self._model_for = model_for or model_chooser(())
        self._engine = BatchEngine(client, self, concurrency=concurrency, retry=retry)
        self._wake = asyncio.Event()
        self._housekeeping_at = 0.0

    @property
    def in_flight(self) -> int:
        return self._engine.in_flight

    @property
    def succeeded(self) -> int:
        """Lines this service ran to a success (and recorded) since it started."""
        return self._engine.succeeded

    def wake(self) -> None:
        """Look at the store now (a batch was created or cancelled through this server)."""
        self._housekeeping_at = 0.0
        self._wake.set()

    async def record(self, key: Hashable, line: dict[str, Any], ok: bool) -> None:
        """The engine's sink: the line's result into the store, if the lease is still ours."""
        assert isinstance(key, tuple)
        output = json.dumps(line, ensure_ascii=False)
        try:
            if not await self.store.record(self.owner, key, output, ok):
                log.warning("batch line %s:%s was taken over before its result was recorded",
                            key[0], key[1])
        except Exception:  # the store failed: give the line back so it runs again
            log.exception("recording batch line %s:%s failed", key[0], key[1])
            with contextlib.suppress(Exception):
                await self.store.release(self.owner, [key])
        self._wake.set()  # a slot is free

    async def run(self) -> None:
        """Until cancelled. Errors of the store are logged and retried after a pause."""
        renewing = asyncio.create_task(self._renew_leases(), name="batch-lease-renewal")
        try:
            while True:
                self._wake.clear()  # before the step: a wake-up during it is not lost
                try:
                    busy = await self.step()
                except Exception:
                    log.exception("batch job step failed; retrying")
                    busy = False
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_s)
        finally:
            renewing.cancel()
            await self._engine.aclose()
            with contextlib.suppress(Exception):
                await self.store.release(self.owner)

    async def step(self) -> bool:
        """One round; True when it found work to start (so look again at once)."""
        now = time.monotonic()
        if now >= self._housekeeping_at:
            self._housekeeping_at = now + self.poll_s
            await self.store.start_validated()
            await self._stop_lines_of_stopped_batches()
        free = self._engine.free_slots
        claimed = await self.store.claim(self.owner, free, self.lease_s) if free > 0 else []
        for line in claimed:
            await self._start(line)
        if len(claimed) < free:  # nothing more pending here: some batch may be finished
            await self.store.finalize_ready()
        return bool(claimed) and len(claimed) == free

    async def _start(self, line: ClaimedLine) -> None:
        try:
            item = parse_item(json.loads(line.text), self._model_for, None)
        except InvalidRequest as exc:
            await self._engine.record_invalid(line.key, line.custom_id, exc)
            return
        await self._engine.submit(line.key, item)

    async def _stop_lines_of_stopped_batches(self) -> None:
        """Lines in flight of batches cancelled or expired meanwhile: cancel them, give
        their leases back."""
        running = {key[0] for key in self._engine.keys_in_flight() if isinstance(key, tuple)}
        stopped = await self.store.stopped_batches(running)
        keys = self._engine.cancel(lambda key: isinstance(key, tuple) and key[0] in stopped)
        if keys:
            await self.store.release(self.owner, [k for k in keys if isinstance(k, tuple)])

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)  # renewal period: a third of the lease
            try:
                await self.store.renew(self.owner, self.lease_s)
            except Exception:
                log.exception("renewing batch line leases failed")
