"""One sequence's grammar inside continuous batching (engine thread only).

A llama.cpp grammar sampler per sequence, used the way llama.cpp's own common sampler does
it, so a grammar costs little per token:

1. sample as usual (the sequence's chain: penalties, top-k, ..., greedy or seeded dist);
2. ask the grammar about that one token (``llama_sampler_apply`` on a 1-token array): most
   of the time the model's own choice is allowed, and checking one token is cheap;
3. only when it is not, sample again from what the grammar allows among the 1024 most
   likely tokens and the end-of-generation tokens (disallowed ones get logit -inf, then
   the chain runs on the rest): once the JSON is complete, only ending is allowed, which a
   model that wanted to add a closing code fence may not rank high;
4. when none of those fits (the grammar spells out a property name the model did not have
   in mind: only a few rare tokens fit), the same among the 16384 most likely;
5. only when none of those fits either, apply the grammar to the whole vocabulary.

Steps 3-4 are what keep a refusal cheap: a grammar checks every candidate token against its
parse stacks, about 0.7 us a token, so the whole 262k vocabulary of Gemma 3 costs ~180 ms
on a busy 2-core machine, a shortlist of 1024 well under 1 ms (plus ~1-3 ms to find it). It
is exact for greedy decoding (the best allowed token is on the shortlist whenever any is);
when sampling, allowed tokens beyond a shortlist are left out, all less likely than every
allowed token on it (top-k / top-p / min-p would mostly cut them anyway).

The chosen token is then accepted by the grammar (it advances its parse state). A token is
only ever accepted after the grammar allowed it: llama.cpp aborts the process on a token
its grammar cannot take. If the grammar allows nothing at all (cannot happen for a grammar
that parsed, but the process is at stake), ``GrammarDeadEnd`` fails this one request.

The other sequences of the batch are not involved: each step samples every sequence from
its own logits row, with or without a grammar.
"""

from __future__ import annotations

import ctypes
import math

import llama_cpp
import numpy as np

from tokenhive.schemas.errors import BackendError, InvalidRequest

# llama_token_data: {int32 id; float logit; float p} (12 bytes, no padding)
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
SHORTLISTS = (1024, 16384)  # most likely tokens a refused pick is resampled from, in turn


class GrammarDeadEnd(BackendError):
    """No token fits the grammar any more."""


class _TokenArray:
    """A ``llama_token_data_array`` over a numpy buffer we own."""

    def __init__(self, n: int) -> None:
        self.data = np.zeros(n, dtype=TOKEN_DATA)
        self.struct = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n, selected=-1,
            sorted=False,
        )
        self.ref = ctypes.byref(self.struct)

    def reset(self, size: int) -> None:
        self.struct.size = size
        self.struct.selected = -1
        self.struct.sorted = False


class GrammarGate:
    def __init__(
        self, vocab: llama_cpp.llama_vocab_p, n_vocab: int, grammar: str,
        always: tuple[int, ...] = (),
    ) -> None:
        self._sampler = llama_cpp.llama_sampler_init_grammar(
            vocab, grammar.encode("utf-8"), b"root"
        )
        if not self._sampler:
            raise InvalidRequest("the output grammar does not parse (llama.cpp refused it)")
        self._n_vocab = n_vocab
        self._one = _TokenArray(1)
        self._tops = [n for n in SHORTLISTS if n < n_vocab]
        self._always = np.array(always, dtype=np.int32)  # shortlisted whatever their logit
        self._short = _TokenArray(max(self._tops, default=0) + len(always))
        self._all: _TokenArray | None = None  # the whole vocabulary, made on first need
        self.resamples = 0  # times the model's own pick was refused (for stats and tests)
        self.full_passes = 0  # of those, times no shortlisted token fitted

    def allows(self, token: int) -> bool:
        one = self._one
        one.reset(1)
        one.data[0] = (token, 0.0, 0.0)
        llama_cpp.llama_sampler_apply(self._sampler, one.ref)
        return not math.isinf(float(one.data["logit"][0]))

    def resample(
        self, chain: llama_cpp.llama_sampler_p, ctx: llama_cpp.llama_context_p, row: int
    ) -> int:
        """Sample from ``row``'s logits with the grammar applied first, then ``chain``:
        from the shortlist if the grammar allows any of it, else from the vocabulary."""
        self.resamples += 1
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,)
        )
        short = self._short
        for top in self._tops:
            ids = np.union1d(np.argpartition(logits, -top)[-top:], self._always)
            n = len(ids)
            short.reset(n)
            short.data["id"][:n] = ids
            short.data["logit"][:n] = logits[ids]
            short.data["p"][:n] = 0.0
            llama_cpp.llama_sampler_apply(self._sampler, short.ref)
            if np.isfinite(short.data["logit"][:n]).any():
                return self._pick(chain, short)
        self.full_passes += 1
        arr = self._all
        if arr is None:
            arr = self._all = _TokenArray(self._n_vocab)
        arr.reset(self._n_vocab)
        arr.data["id"] = np.arange(self._n_vocab, dtype=np.int32)
        arr.data["logit"] = logits
        arr.data["p"] = 0.0
        llama_cpp.llama_sampler_apply(self._sampler, arr.ref)
        return self._pick(chain, arr)

    def _pick(self, chain: llama_cpp.llama_sampler_p, arr: _TokenArray) -> int:
        llama_cpp.llama_sampler_apply(chain, arr.ref)
        selected = arr.struct.selected
        if not 0 <= selected < arr.struct.size:
            raise GrammarDeadEnd("no token fits the output grammar")
        token = int(arr.data["id"][selected])
        if not self.allows(token):
            raise GrammarDeadEnd("no token fits the output grammar")
        return token

    def accept(self, token: int) -> None:
        """Advance the grammar over ``token`` (which it must allow: see the module doc)."""
        llama_cpp.llama_sampler_accept(self._sampler, token)

    def free(self) -> None:
        if self._sampler is not None:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
