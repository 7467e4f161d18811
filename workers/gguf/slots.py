"""The engine's bookkeeping: queued jobs, per-slot KV-cache contents, running sequences.

A *slot* is one llama.cpp sequence id. It remembers exactly which tokens its sequence has
in the KV cache (``cached``), also after its request ends, so the next request that starts
with the same tokens (an agent resending its long system prompt) skips re-processing them.

A *run* is one request being generated on a slot: its prompt still to feed, its sampler
chain, incremental detokenizer, stop matcher and counters. Plain Python, no llama calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenhive.schemas.messages import Sampling
from tokenhive.workers.gguf.detok import Detokenizer
from tokenhive.workers.gguf.grammar_gate import GrammarGate
from tokenhive.workers.gguf.sampling import SamplerChain
from tokenhive.workers.stops import StopMatcher


@dataclass
class Job:
    """A request as submitted to the engine; events go to ``queue`` on ``loop``."""

    key: int  # engine-unique id (request ids are the client's and may repeat)
    request_id: str
    prompt: str
    add_bos: bool
    sampling: Sampling
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[object]
    grammar: str | None = None  # GBNF the output must follow (workers/gguf/grammar.py)


@dataclass
class Admitted:
    """A job whose prompt is tokenized and checked against the context, waiting for a slot."""

    job: Job
    tokens: list[int]
    max_tokens: int
    seed: int
    gate: GrammarGate | None = None  # the job's compiled grammar, handed to its sampler


@dataclass
class Run:
    """One request being generated on a slot."""

    job: Job
    prompt: list[int]
    max_tokens: int
    sampler: SamplerChain
    detok: Detokenizer
    stop: StopMatcher
    next_prompt: int  # index of the next prompt token to decode (prefix reuse starts > 0)
    admitted_at: int  # admission order: earlier runs get the prefill budget first
    last_token: int = -1  # sampled but not yet decoded
    completion_tokens: int = 0
    unsent_tokens: int = 0  # generated tokens whose text is still held back
    batch_row: int = -1  # row of this step's batch whose logits to sample; -1: none

    @property
    def prefilling(self) -> bool:
        return self.next_prompt < len(self.prompt)


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in the KV cache, by position
    last_used: int = 0
    run: Run | None = None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pick_slot(free: list[Slot], prompt: list[int], reuse: bool) -> tuple[Slot, int]:
    """The free slot with the longest cached prefix of ``prompt`` (least recently used on a
    tie), and how many of its cached tokens to keep. At least the last prompt token is
    always re-decoded, because its logits are needed to sample the first output token."""
    best, best_keep = free[0], -1
    for slot in free:
        keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1) if reuse else 0
        if keep > best_keep or (keep == best_keep and slot.last_used < best.last_used):
            best, best_keep = slot, keep
    return best, max(best_keep, 0)


@dataclass
class StepPlan:
    """One step's batch rows, in sequence-id order, and what each sequence contributes."""

    tokens: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    logits: list[int] = field(default_factory=list)  # 1: compute this row's logits
    members: list[tuple[Slot, int]] = field(default_factory=list)  # (slot, tokens in batch)


def plan_step(slots: list[Slot], n_batch: int) -> StepPlan:
    """Every generating sequence gets its one token; prefilling sequences share what is left
    of ``n_batch``, earliest admitted first. Sets each run's ``batch_row`` (the row whose
    logits it samples from after the decode, -1 if its prompt is not finished yet)."""
    runs = [s.run for s in slots if s.run is not None]
    budget = n_batch - sum(1 for r in runs if not r.prefilling)
    chunk: dict[int, int] = {}
    for pre in sorted((r for r in runs if r.prefilling), key=lambda r: r.admitted_at):
        if budget <= 0:
            break
        chunk[pre.job.key] = n = min(budget, len(pre.prompt) - pre.next_prompt)
        budget -= n
    plan = StepPlan()
    for slot in slots:  # ascending sequence ids: llama.cpp splits the batch least that way
        r = slot.run
        if r is None:
            continue
        start = len(slot.cached)
        if not r.prefilling:
            new = [r.last_token]
        elif r.job.key in chunk:
            new = r.prompt[r.next_prompt : r.next_prompt + chunk[r.job.key]]
        else:
            r.batch_row = -1
            continue
        done_prompt = not r.prefilling or r.next_prompt + len(new) == len(r.prompt)
        plan.tokens += new
        plan.pos += range(start, start + len(new))
        plan.seq += [slot.seq_id] * len(new)
        plan.logits += [0] * (len(new) - 1) + [1 if done_prompt else 0]
        r.batch_row = len(plan.tokens) - 1 if done_prompt else -1
        plan.members.append((slot, len(new)))
    return plan


@dataclass
class EngineStats:
    """Counters, written by the engine thread and read anywhere (plain ints)."""

    steps: int = 0
    decoded_tokens: int = 0  # prompt + generated tokens through llama_decode
    generated_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens skipped thanks to the prefix cache
    prefix_hits: int = 0  # requests that reused at least one cached prompt token
    kv_cells: int = 0  # KV-cache cells the slots hold (running and kept for reuse)
    grammar_resamples: int = 0  # model picks a grammar refused (then resampled)
    grammar_full_passes: int = 0  # of those, resampled over the whole vocabulary
    decode_errors: int = 0
    consecutive_decode_errors: int = 0  # since the last request that finished normally
    last_error: str = ""
