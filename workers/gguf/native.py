"""The llama.cpp objects one engine owns: model, vocab, one multi-sequence context, a batch.

Everything here is called from the engine thread only (llama.cpp contexts are not
thread-safe). ctypes releases the GIL for the duration of each native call, so a long
``llama_decode`` does not stall the worker's event loop (heartbeats, sockets).

The context holds ``slots`` sequences in one *unified* KV cache of ``slots * n_ctx`` cells:
with a unified cache llama.cpp does not split a multi-sequence batch into per-sequence
micro-batches, which would cost several times the decode time at 16 sequences.

The batch is a ``llama_batch`` struct over numpy arrays we own (not ``llama_batch_init``),
so a whole step's tokens, positions, sequence ids and logit flags are written with a few
slice assignments instead of one ctypes call per field per token.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.workers.gguf import llama_log
from tokenhive.workers.gguf.cpu_check import HINT, check_cpu

log = logging.getLogger(__name__)

_backend_ready = False

DECODE_NO_KV_SLOT = 1  # llama_decode: no room in the KV cache for this batch


@dataclass(frozen=True)
class NativeParams:
    path: Path
    slots: int
    n_ctx: int  # per slot
    n_batch: int
    n_threads: int | None = None
    n_gpu_layers: int = 0
    verbose: bool = False
    flash_attn: bool | None = None  # None: llama.cpp decides (auto)
    repack: bool = True  # CPU weight repacking (faster matmuls; batch-size dependent kernels)
    unified_kv: bool = True


class StepBatch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, one sequence id per token."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id_rows = np.zeros((capacity, 1), dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        row_ptrs = [
            self.seq_id_rows[i].ctypes.data_as(ctypes.POINTER(llama_cpp.llama_seq_id))
            for i in range(capacity)
        ]
        self._seq_id_ptrs = (ctypes.POINTER(llama_cpp.llama_seq_id) * capacity)(*row_ptrs)
        self.struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(
                self._seq_id_ptrs, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))
            ),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def fill(self, tokens: list[int], pos: list[int], seq: list[int], logits: list[int]) -> None:
        n = len(tokens)
        assert n <= self.capacity, (n, self.capacity)
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq_id_rows[:n, 0] = seq
        self.logits[:n] = logits
        self.struct.n_tokens = n


class LlamaNative:
    """Loaded model + context. Raise ModelLoadFailed from the constructor on any failure."""

    def __init__(self, p: NativeParams) -> None:
        global _backend_ready
        check_cpu()
        llama_log.install(p.verbose)  # before the first call that logs (backend init)
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
        self.params = p
        self.model = None
        self.ctx = None
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = p.n_gpu_layers
        mparams.use_extra_bufts = p.repack
        self.model = llama_cpp.llama_model_load_from_file(str(p.path).encode(), mparams)
        if not self.model:
            raise ModelLoadFailed(f"llama.cpp could not load the model from {p.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.model))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        ends = (llama_cpp.llama_vocab_eos(self.vocab), llama_cpp.llama_vocab_eot(self.vocab))
        self.end_tokens = tuple(sorted({int(t) for t in ends if t >= 0}))  # EOS, end of turn
        self.model_bytes = int(llama_cpp.llama_model_size(self.model))

        threads = p.n_threads or os.cpu_count() or 1
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = p.n_ctx * p.slots
        cparams.n_batch = p.n_batch
        cparams.n_ubatch = p.n_batch
        cparams.n_seq_max = p.slots
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = p.unified_kv
        cparams.no_perf = True
        if p.flash_attn is not None:
            cparams.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if p.flash_attn
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise ModelLoadFailed(
                f"llama.cpp could not create a context of {p.n_ctx} x {p.slots} tokens for "
                f"{p.path} (out of memory?)"
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = StepBatch(p.n_batch)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._eog: dict[int, bool] = {}

    def self_test(self) -> None:
        """Decode one token, so a llama.cpp that cannot run on this CPU fails now, at startup,
        rather than on a user's first request. A build for missing CPU features dies here with
        SIGILL; the log line before says what was being done, and the supervisor names the
        signal."""
        log.info("self-test: decoding one token (a crash here means llama.cpp cannot run on "
                 f"this CPU; {HINT})")
        token = self.bos if self.bos >= 0 else 0
        self.batch.fill([token], [0], [0], [1])
        rc = self.decode()
        self.seq_rm(0, -1, -1)
        if rc != 0:
            raise ModelLoadFailed(f"llama.cpp failed its one-token self-test (llama_decode {rc})")

    # --- vocabulary -------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Tokenize with special-token parsing (template markers become their tokens)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, True)
        if n < 0:  # cannot happen for cap >= bytes + specials, but llama.cpp says how many
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, True)
        tokens = list(buf[:n])
        # A template that writes BOS itself plus a tokenizer that adds one = double BOS.
        if len(tokens) >= 2 and tokens[0] == tokens[1] == self.bos:
            del tokens[0]
        return tokens

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for; control tokens render as nothing."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, big, -n, 0, False)
            return big.raw[:n]
        return self._piece_buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        hit = self._eog.get(token)
        if hit is None:
            hit = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return hit

    # --- decoding and the KV cache -----------------------------------------------------------

    def decode(self) -> int:
        """Decode the filled batch; llama.cpp's return code (0 ok, 1 no KV room, else error)."""
        return int(llama_cpp.llama_decode(self.ctx, self.batch.struct))

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        """Forget positions [p0, p1) of a sequence (p0 = -1 with p1 = -1: all of it)."""
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def can_continue_at(self, seq: int, n_keep: int) -> bool:
        """Does the cache still hold what a continuation at position ``n_keep`` attends to?
        A sliding-window (SWA) cache may have dropped old positions; same rule as
        llama-server's."""
        pos_min = int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq))
        return pos_min <= max(0, n_keep - max(1, self.n_swa))

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
