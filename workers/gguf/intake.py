"""A submitted job checked and prepared on the engine thread, before it waits for a slot:
its prompt tokenized and measured against the per-slot context, its grammar compiled. Done
at submission, so an oversized prompt or a grammar llama.cpp refuses fails that request at
once, even while every slot is busy."""

from __future__ import annotations

from tokenhive.schemas.errors import ContextTooLong, InvalidRequest
from tokenhive.workers.gguf.grammar_gate import GrammarGate
from tokenhive.workers.gguf.native import LlamaNative
from tokenhive.workers.gguf.slots import Admitted, Job


def prepare(native: LlamaNative, job: Job, n_ctx: int, seed: int) -> Admitted:
    """The job ready to wait for a slot; raises the request's TokenHiveError."""
    tokens = native.tokenize(job.prompt, job.add_bos)
    if not tokens:
        raise InvalidRequest("the prompt is empty")
    n, room = len(tokens), n_ctx - len(tokens)
    max_tokens = job.sampling.max_tokens
    if max_tokens is None:
        if room < 1:
            raise ContextTooLong(
                f"prompt is {n} tokens, the context is {n_ctx} tokens per slot: "
                "no room left to generate"
            )
        max_tokens = room
    elif max_tokens > room:
        raise ContextTooLong(
            f"prompt {n} tokens + max_tokens {max_tokens} = {n + max_tokens} exceeds "
            f"the context of {n_ctx} tokens per slot"
        )
    gate = GrammarGate(native.vocab, native.n_vocab, job.grammar, native.end_tokens) \
        if job.grammar else None
    return Admitted(job, tokens, max_tokens, seed, gate)
