"""Continuous batching on llama.cpp: one thread, one context, ``slots`` sequences.

The engine thread owns every llama.cpp object. Other threads talk to it through a thread-safe
inbox (submit / cancel / close) and receive each request's events (``Delta``, ``Done`` or a
``TokenHiveError``) on its ``asyncio.Queue``, one ``call_soon_threadsafe`` per loop per step.

One *step* = one ``llama_decode`` of a batch holding, in sequence-id order:

* one token for every sequence that is generating (its last sampled token), and
* prompt chunks of newly admitted requests, earliest admitted first, filling what is left
  of ``n_batch`` — so a long prompt is processed over several steps while the running
  streams keep producing a token per step (continuous batching).

Then every sequence whose logits were computed samples one token with its own sampler
chain, detokenizes it incrementally, checks stop sequences / EOG / max_tokens, and a
finished sequence's slot is free for the next queued request in the very next step.

Prompt-prefix reuse: a slot keeps its KV cache after its request ends; a new request goes to
the free slot sharing the longest token prefix with its prompt; only the rest is decoded.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from tokenhive.schemas.errors import BackendError, TokenHiveError
from tokenhive.schemas.messages import Usage
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.gguf.detok import Detokenizer, PieceCache
from tokenhive.workers.gguf.grammar_gate import GrammarDeadEnd
from tokenhive.workers.gguf.intake import prepare
from tokenhive.workers.gguf.native import DECODE_NO_KV_SLOT, LlamaNative, NativeParams
from tokenhive.workers.gguf.outbox import Outbox
from tokenhive.workers.gguf.sampling import PENALTY_LAST_N, SamplerChain
from tokenhive.workers.gguf.slots import (
    Admitted,
    EngineStats,
    Job,
    Run,
    Slot,
    pick_slot,
    plan_step,
)
from tokenhive.workers.stops import StopMatcher

log = logging.getLogger(__name__)

T = TypeVar("T")


class GGUFEngine:
    """``start()`` loads the model on the engine thread (blocking); then ``submit`` jobs."""

    def __init__(self, params: NativeParams, *, seed: int = 0, prefix_cache: bool = True):
        # every generating sequence must fit in one step's batch
        params = dataclasses.replace(params, n_batch=max(params.n_batch, params.slots))
        self.params = params
        self.n_batch = params.n_batch
        self.n_ctx = params.n_ctx  # per slot
        self.prefix_cache = prefix_cache
        self.stats = EngineStats()
        self.native: LlamaNative | None = None
        self._seeds = random.Random(seed)  # seeds for requests that bring none
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._outbox = Outbox()
        self._slots = [Slot(seq_id=i) for i in range(params.slots)]
        self._waiting: deque[Admitted] = deque()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="gguf-engine", daemon=True)
        self._tick = 0  # admissions so far: orders prefill and slot recency
        self._pieces: PieceCache | None = None

    # --- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error

    def submit(self, job: Job) -> None:
        self._inbox.put(("submit", job))

    def cancel(self, key: int) -> None:
        self._inbox.put(("cancel", key))

    def call(self, fn: Callable[[GGUFEngine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the engine thread between two steps (inspection, tests)."""
        future: Future[T] = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def close(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(("close", None))
            self._thread.join()

    @property
    def alive(self) -> bool:
        """Loaded and taking work (False before start, after close, after a crash)."""
        return self._loaded.is_set() and self._thread.is_alive()

    @property
    def running(self) -> int:
        return sum(1 for s in self._slots if s.run is not None)

    # --- engine thread --------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            native = LlamaNative(self.params)
            try:
                native.self_test()
            except BaseException:
                native.close()
                raise
            self.native = native
            self._pieces = PieceCache(self.native.piece)
        except BaseException as e:  # reported to start()'s caller
            self._load_error = e
            self._loaded.set()
            return
        self._loaded.set()
        try:
            while self._drain_inbox(block=not (self._waiting or self.running)):
                self._admit()
                if self.running:
                    self._step()
                self._outbox.flush()
                self.stats.kv_cells = sum(len(slot.cached) for slot in self._slots)
        except BaseException as e:  # a bug here must not strand any stream
            log.exception("gguf engine crashed")
            self._fail_everything(f"the gguf engine crashed: {e!r}")
            raise
        finally:
            self._fail_everything("the gguf engine was shut down")
            self.native.close()
            self.native = None

    def _drain_inbox(self, block: bool) -> bool:
        """Handle all pending messages (waiting for one when idle); False on close."""
        try:
            msg = self._inbox.get(block=block)
            while True:
                kind, arg = msg
                if kind == "close":
                    return False
                if kind == "submit":
                    assert isinstance(arg, Job)
                    self._accept(arg)
                elif kind == "cancel":
                    assert isinstance(arg, int)
                    self._cancel(arg)
                elif kind == "call":
                    fn, future = arg  # type: ignore[misc]
                    try:
                        future.set_result(fn(self))
                    except Exception as e:
                        future.set_exception(e)
                msg = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _accept(self, job: Job) -> None:
        """Tokenize, check against the context, compile the grammar (``intake.prepare``)."""
        assert self.native is not None
        seed = job.sampling.seed
        if seed is None:
            seed = self._seeds.getrandbits(32)
        try:
            self._waiting.append(prepare(self.native, job, self.n_ctx, seed))
        except TokenHiveError as e:
            self._outbox.put(job, e)

    def _cancel(self, key: int) -> None:
        for i, adm in enumerate(self._waiting):
            if adm.job.key == key:
                del self._waiting[i]
                if adm.gate is not None:
                    adm.gate.free()
                return
        for slot in self._slots:
            if slot.run is not None and slot.run.job.key == key:
                self._release(slot)  # its cached tokens stay valid for prefix reuse
                return

    def _admit(self) -> None:
        assert self.native is not None and self._pieces is not None
        free = [s for s in self._slots if s.run is None]
        while self._waiting and free:
            adm = self._waiting.popleft()
            slot, keep = pick_slot(free, adm.tokens, self.prefix_cache)
            free.remove(slot)
            keep = self._trim_cache(slot, keep)
            self.stats.reused_prompt_tokens += keep
            if keep:
                self.stats.prefix_hits += 1
            self._tick += 1
            sampler = SamplerChain(adm.job.sampling, self.native.n_vocab, adm.seed, adm.gate)
            if sampler.has_penalties:
                for t in adm.tokens[-PENALTY_LAST_N:]:  # penalties also see the prompt
                    sampler.accept(t)
            slot.run = Run(
                job=adm.job, prompt=adm.tokens, max_tokens=adm.max_tokens, sampler=sampler,
                detok=Detokenizer(self._pieces), stop=StopMatcher(adm.job.stops),
                next_prompt=keep, admitted_at=self._tick,
            )
            slot.last_used = self._tick

    def _trim_cache(self, slot: Slot, keep: int) -> int:
        """Drop the slot's cached tokens beyond ``keep``; return how many really stay."""
        assert self.native is not None
        seq = slot.seq_id
        if keep < len(slot.cached) and not self.native.seq_rm(seq, keep, -1):
            keep = 0
        if keep > 0 and not self.native.can_continue_at(seq, keep):
            keep = 0
        if keep == 0 and slot.cached:
            self.native.seq_rm(seq, -1, -1)
        del slot.cached[keep:]
        return keep

    def _step(self) -> None:
        native = self.native
        assert native is not None and native.ctx is not None
        plan = plan_step(self._slots, self.n_batch)
        tokens, members = plan.tokens, plan.members
        native.batch.fill(tokens, plan.pos, plan.seq, plan.logits)
        rc = native.decode()
        if rc == DECODE_NO_KV_SLOT and self._evict_idle_caches():
            rc = native.decode()
        if rc != 0:
            self._decode_failed(rc, members)
            return
        self.stats.steps += 1
        self.stats.decoded_tokens += len(tokens)
        row = 0
        for slot, n in members:
            run = slot.run
            assert run is not None
            slot.cached += tokens[row : row + n]
            row += n
            if run.prefilling:
                run.next_prompt += n
            if run.batch_row >= 0:
                try:
                    token = run.sampler.sample(native.ctx, run.batch_row)
                except GrammarDeadEnd as e:  # this request only; the others carry on
                    self._outbox.put(run.job, e)
                    self._release(slot)
                    continue
                self._on_token(slot, run, token)

    def _on_token(self, slot: Slot, run: Run, token: int) -> None:
        assert self.native is not None
        if self.native.is_eog(token):
            self._finish(slot, "stop")
            return
        run.completion_tokens += 1
        run.unsent_tokens += 1
        self.stats.generated_tokens += 1
        text = run.stop.feed(run.detok.push(token))
        if text:
            self._outbox.put(run.job, Delta(text, run.unsent_tokens))
            run.unsent_tokens = 0
        if run.stop.stopped:
            self._finish(slot, "stop")
        elif run.completion_tokens >= run.max_tokens:
            self._finish(slot, "length")
        else:
            run.last_token = token

    def _finish(self, slot: Slot, reason: str) -> None:
        run = slot.run
        assert run is not None
        if not run.stop.stopped:  # emit what was held back: a split character, a stop prefix
            text = run.stop.feed(run.detok.flush())
            if run.stop.stopped:
                reason = "stop"
            else:
                text += run.stop.flush()
            if text:
                self._outbox.put(run.job, Delta(text, run.unsent_tokens))
        n_prompt = len(run.prompt)
        usage = Usage(n_prompt, run.completion_tokens, n_prompt + run.completion_tokens)
        self._outbox.put(run.job, Done(reason, usage))
        self.stats.consecutive_decode_errors = 0  # a request made it through: healthy again
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        """Free the slot; its KV cache stays (prefix reuse) unless that is switched off."""
        assert slot.run is not None and self.native is not None
        if (gate := slot.run.sampler.grammar) is not None:
            self.stats.grammar_resamples += gate.resamples
            self.stats.grammar_full_passes += gate.full_passes
        slot.run.sampler.free()
        slot.run = None
        if not self.prefix_cache:
            self.native.seq_rm(slot.seq_id, -1, -1)
            slot.cached.clear()

    def _evict_idle_caches(self) -> bool:
        """Free the KV cells idle slots keep for prefix reuse; True if any were freed."""
        assert self.native is not None
        freed = False
        for slot in self._slots:
            if slot.run is None and slot.cached:
                self.native.seq_rm(slot.seq_id, -1, -1)
                slot.cached.clear()
                freed = True
        return freed

    def _decode_failed(self, rc: int, members: list[tuple[Slot, int]]) -> None:
        """Fail the sequences of the failed batch (their cache state is unknown now)."""
        assert self.native is not None
        self.stats.decode_errors += 1
        self.stats.consecutive_decode_errors += 1
        self.stats.last_error = f"llama_decode returned {rc}"
        log.error("llama_decode returned %d for a batch of %d sequences", rc, len(members))
        for slot, _ in members:
            run = slot.run
            assert run is not None
            self._outbox.put(run.job, BackendError(f"llama_decode failed (code {rc})"))
            self._release(slot)
            self.native.seq_rm(slot.seq_id, -1, -1)
            slot.cached.clear()

    def _fail_everything(self, message: str) -> None:
        while self._waiting:
            adm = self._waiting.popleft()
            if adm.gate is not None:
                adm.gate.free()
            self._outbox.put(adm.job, BackendError(message))
        for slot in self._slots:
            if slot.run is not None:
                self._outbox.put(slot.run.job, BackendError(message))
                slot.run.sampler.free()
                slot.run = None
        self._outbox.flush()
