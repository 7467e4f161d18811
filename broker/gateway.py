"""Model groups, fallbacks and cooldowns: which backing model a request goes to, and where
it goes next when that model fails before its first chunk.

A request for a public name gets a plan: the backing models to try, in order. A group
(``[groups.NAME]``) expands to its members (``order``: as listed; ``weighted``: a weighted
draw without replacement), and every model is followed by its ``fallbacks``; duplicates are
dropped. The job goes to the first model of the plan that a worker has registered for (a
model in cooldown only when nothing else is left), and keeps the rest. It moves on:

- when a worker answers it with a retryable Error before any chunk was forwarded,
- on ``context_too_long``, to the model's ``context_fallbacks`` (those replace the plan),
- when it waited ``fallback_wait`` seconds queued while its model had no healthy worker,
- when its model's workers died under it ``max_attempts`` times.

Once a chunk has gone to the client there is no fallback (the client has part of an answer
from one model); the Error then goes to the client as it is. The hot path is untouched: a
chunk is still a dict lookup and a send; only terminals, which the broker already decodes,
are looked at here.

``admit`` runs first on arrival: the request's profile (unknown: invalid_request; a budget
spent: budget_exceeded), then its plan. Besides the shared state, a Gateway keeps only
caches: plans that never change, and when stalled queues were last scanned.
"""

from __future__ import annotations

import logging
import random

import msgspec

from tokenhive.broker.admission import Refusal
from tokenhive.broker.job import Job, JobState
from tokenhive.broker.profiles import apply_profile
from tokenhive.broker.state import BrokerState
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.messages import Error, Health, Request

log = logging.getLogger("tokenhive.broker")

#: Worker errors that count towards a model's cooldown: the model (or its upstream) failed,
#: not the request.
FAILURES = frozenset({
    ErrorCode.BACKEND_ERROR, ErrorCode.BACKEND_TIMEOUT, ErrorCode.BACKEND_UNAVAILABLE,
    ErrorCode.RATE_LIMITED, ErrorCode.WORKER_LOST, ErrorCode.INTERNAL,
})


class Gateway:
    def __init__(self, state: BrokerState, rng: random.Random | None = None) -> None:
        self.state = state
        self.rng = rng or random.Random()
        cfg = state.cfg
        self.routed = frozenset(cfg.groups) | frozenset(cfg.models)  # names with a plan
        # plans without a weighted draw in them are the same every time: computed once
        self._fixed: dict[str, tuple[str, ...]] = {}
        # stalled queues are scanned at a tenth of fallback_wait, not on every tick: a long
        # queue of a model without workers is not walked every few milliseconds
        self._scan_every = max(cfg.fallback_wait / 10, 0.05)
        self._last_scan = float("-inf")

    # -- plans ----------------------------------------------------------------------------

    def plan(self, name: str) -> list[str]:
        """The backing models for ``name``, in the order to try them."""
        fixed = self._fixed.get(name)
        if fixed is not None:
            return list(fixed)
        out: list[str] = []
        seen: set[str] = set()
        self._expand(name, out, seen)
        if not any(self.state.cfg.groups[g].strategy == "weighted"
                   for g in seen if g in self.state.cfg.groups):
            self._fixed[name] = tuple(out)
        return out

    def _expand(self, name: str, out: list[str], seen: set[str]) -> None:
        if name in seen:  # config validation refuses cycles; this only guards the recursion
            return
        seen.add(name)
        cfg = self.state.cfg
        group = cfg.groups.get(name)
        if group is not None:
            for member in self._ordered(group.models, group.weights, group.strategy):
                self._expand(member, out, seen)
            return
        if name not in out:
            out.append(name)
        route = cfg.models.get(name)
        if route is not None:
            for fallback in route.fallbacks:
                self._expand(fallback, out, seen)

    def _ordered(self, models: list[str], weights: list[float], strategy: str) -> list[str]:
        if strategy != "weighted":
            return models
        pool = list(zip(models, weights, strict=True))
        out: list[str] = []
        while pool:
            total = sum(w for _, w in pool)
            if total <= 0:
                out.extend(m for m, _ in pool)
                break
            pick = self.rng.uniform(0.0, total)
            index = 0
            for index, (_, weight) in enumerate(pool):  # noqa: B007
                pick -= weight
                if pick <= 0 and weight > 0:
                    break
            out.append(pool.pop(index)[0])
        return out

    def choose(self, plan: list[str], *, admitting: bool = False) -> int | None:
        """Index of the model to use next: the first a worker has registered for and that
        is not known to have failed for good, skipping models in cooldown while another is
        left; None when no model of the plan is known. ``admitting``: when every known
        model failed for good, the first of them (admission then answers model_failed
        with the reason, rather than unknown_model)."""
        state = self.state
        known = [i for i, model in enumerate(plan) if state.registry.known_model(model)]
        usable = [i for i in known if plan[i] not in state.failed_models]
        if not usable:
            return known[0] if admitting and known else None
        for i in usable:
            if not state.cooldowns.cooling(plan[i], state.now):
                return i
        return usable[0]

    # -- moving a job on ------------------------------------------------------------------

    def after_error(self, job: Job, error: Error) -> bool:
        """A worker's Error for ``job`` (already out of flight): count the failure, and move
        the job to its next model if it may. True when it was moved (nothing to answer)."""
        state = self.state
        if error.code in FAILURES and state.cooldowns.failed(job.model, state.now):
            self._cooling_started(job.model)
        if job.chunks or error.chunks_sent:
            return False  # the client has part of an answer: never switch models
        if error.code is ErrorCode.CONTEXT_TOO_LONG:
            route = state.cfg.models.get(job.model)
            if route is None or not route.context_fallbacks:
                return False
            bigger: list[str] = []
            for name in route.context_fallbacks:
                self._expand(name, bigger, set())
            job.plan = [m for m in bigger if m != job.model and m not in job.tried]
        elif not error.retryable:
            return False
        return self.fall_back(job, f"{error.code.value}: {error.message}")

    def worker_died(self, model: str) -> None:
        if self.state.cooldowns.failed(model, self.state.now):
            self._cooling_started(model)

    def fall_back(self, job: Job, why: str) -> bool:
        """Move ``job`` (queued, or just out of flight) to the next model of its plan."""
        if not job.plan:
            return False
        index = self.choose(job.plan)
        if index is None:
            return False
        state = self.state
        model = job.plan.pop(index)
        if job.state is JobState.QUEUED:
            state.queues[job.model].discard(job)
        log.info("fallback", extra={"request": job.id, "from": job.model, "to": model,
                                    "why": why})
        job.tried.append(job.model)
        job.request = msgspec.structs.replace(job.request, model=model)
        job.state = JobState.QUEUED
        job.worker = None
        job.worker_ident = b""
        job.attempts = 0
        job.chunks = 0
        job.first_at = 0.0
        job.enqueued_at = state.now
        state.queue(model).push(job, front=True)
        state.counts["fallbacks"] += 1
        state.dirty.add(model)
        return True

    def move_stalled(self) -> None:
        """Queued jobs with fallbacks left whose model has had no healthy worker for
        ``fallback_wait`` seconds move on (called by the timers)."""
        state = self.state
        if state.now - self._last_scan < self._scan_every:
            return
        self._last_scan = state.now
        wait = state.cfg.fallback_wait
        for model, queue in list(state.queues.items()):
            if not queue or any(w.health is Health.OK for w in state.registry.of_model(model)):
                continue
            for job in list(queue):
                if job.plan and state.now - job.enqueued_at >= wait:
                    self.fall_back(job, f"no healthy worker for {model!r} in {wait:g}s")

    def _cooling_started(self, model: str) -> None:
        self.state.counts["cooldowns"] += 1
        log.warning("model cooling down", extra={
            "model": model, "seconds": self.state.cfg.cooldown_s})

    # -- admission ------------------------------------------------------------------------

    def admit(self, request: Request) -> tuple[Request, list[str]] | Refusal:
        """Apply the request's profile and pick its first model: the request as it will be
        queued and the rest of its plan, or the refusal (unknown profile, over budget, no
        model of the plan known)."""
        state = self.state
        rid = request.id
        if request.profile is not None:
            profile = state.cfg.profiles.get(request.profile)
            if profile is None:
                known = ", ".join(sorted(state.cfg.profiles)) or "none"
                return Refusal("rejected_invalid", Error.make(
                    rid, ErrorCode.INVALID_REQUEST,
                    f"unknown profile {request.profile!r} (known profiles: {known})"))
            spent = state.spend.over_budget(request.profile, profile, state.now)
            if spent is not None:
                return Refusal("budget_exceeded", Error.make(
                    rid, ErrorCode.BUDGET_EXCEEDED, spent[0], retry_after=spent[1]))
            request = apply_profile(request, profile)
        if request.model not in self.routed:
            return request, []
        plan = self.plan(request.model)
        index = self.choose(plan, admitting=True)
        if index is None:
            known = ", ".join(sorted(state.registry.models_seen)) or "none"
            return Refusal("unknown_model", Error.make(
                rid, ErrorCode.UNKNOWN_MODEL,
                f"no worker serves any model of {request.model!r} ({', '.join(plan)}); "
                f"known models: {known}"))
        model = plan.pop(index)
        return msgspec.structs.replace(request, model=model), plan
