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

from .gguf_detok import Detokenizer, StopMatcher
from .gguf_sampling import SamplerChain


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


@dataclass
class Admitted:
    """A job whose prompt is tokenized and checked against the context, waiting for a slot."""

    job: Job
    tokens: list[int]
    max_tokens: int
    seed: int


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
