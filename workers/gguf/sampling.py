"""Request sampling parameters -> a llama.cpp sampler chain, one per sequence.

``check_sampling`` applies the ranges declared on ``Sampling`` (the schema owns them; a
request decoded off the wire already satisfies them) to a value built in Python, on any
thread before a request is queued, so a bad value is a clear ``InvalidRequest`` naming the
field that changes nothing. ``SamplerChain`` builds the native chain and must be created,
used and freed on the engine thread only.

Chain order follows llama.cpp / llama-cpp-python: penalties, then either greedy
(temperature 0 or unset) or top-k -> top-p -> min-p -> temperature -> seeded dist.
Unset truncation parameters take llama.cpp's usual defaults (top_k 40, top_p 0.95,
min_p 0.05), the same as llama-server and llama-cpp-python, so results are comparable.

A sequence with an output grammar (JSON schema, forced tool call) has a ``GrammarGate``:
the chain samples as usual and the grammar checks that one token, resampling over the
whole vocabulary only when the model's pick is refused (see ``grammar_gate``).
"""

from __future__ import annotations

import llama_cpp

from tokenhive.schemas.messages import Sampling
from tokenhive.schemas.validation import validated
from tokenhive.workers.gguf.grammar_gate import GrammarGate

DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
PENALTY_LAST_N = 64  # tokens of history the repeat/presence/frequency penalties look at


def is_greedy(s: Sampling) -> bool:
    return s.temperature is None or s.temperature == 0.0


def check_sampling(s: Sampling) -> None:
    """Raise InvalidRequest naming the first field outside its declared range."""
    validated(s, "sampling")


class SamplerChain:
    """A native llama.cpp sampler chain for one sequence (engine thread only)."""

    def __init__(
        self, s: Sampling, n_vocab: int, seed: int, grammar: GrammarGate | None = None
    ) -> None:
        self.grammar = grammar  # owned from here on: freed with the chain
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        add = self._add
        repeat = s.repeat_penalty if s.repeat_penalty is not None else 1.0
        freq = s.frequency_penalty or 0.0
        present = s.presence_penalty or 0.0
        self.has_penalties = repeat != 1.0 or freq != 0.0 or present != 0.0
        if self.has_penalties:
            add(llama_cpp.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, repeat, freq, present
            ))
        if is_greedy(s):
            add(llama_cpp.llama_sampler_init_greedy())
            return
        top_k = s.top_k if s.top_k is not None else DEFAULT_TOP_K
        top_p = s.top_p if s.top_p is not None else DEFAULT_TOP_P
        min_p = s.min_p if s.min_p is not None else DEFAULT_MIN_P
        if top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(min_p, 1))
        assert s.temperature is not None
        add(llama_cpp.llama_sampler_init_temp(s.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # the chain owns it now

    def accept(self, token: int) -> None:
        """Record a token in the history (penalties look at it) without sampling."""
        llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> int:
        """Sample from the logits of batch row ``batch_index``; the token is accepted."""
        gate = self.grammar
        if gate is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))
        if self.has_penalties:  # the penalty history must only ever see the chosen token
            token = gate.resample(self._chain, ctx, batch_index)
            llama_cpp.llama_sampler_accept(self._chain, token)
        else:  # no sampler in the chain keeps state on accept: sample, then check
            token = int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))
            if not gate.allows(token):
                token = gate.resample(self._chain, ctx, batch_index)
        gate.accept(token)
        return token

    def free(self) -> None:
        if self.grammar is not None:
            self.grammar.free()
            self.grammar = None
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
