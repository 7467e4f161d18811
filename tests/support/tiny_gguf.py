"""A tiny random-weights llama model written with the ``gguf`` package, for fast real tests.

The file is a genuine GGUF that llama.cpp loads and runs: 2 layers, 64-wide, grouped-query
attention, and a SentencePiece ("llama") vocabulary of a few hundred pieces plus the 256
byte tokens, so *any* text tokenizes (byte fallback). A ChatML template sits in the metadata.

Weights are random but seeded, so every run writes the same model. The output projection is
scaled up so logits are well separated: greedy decoding then does not hinge on the last bit
of a float, which keeps "batched == alone" comparisons meaningful on this model. The EOG
tokens' output rows are zeroed by default so that greedy generation runs until max_tokens.
``eos_always=True`` writes the opposite model: every token embedding carries a large
constant component that only the ``</s>`` output row reads, so ``</s>`` wins every step
(a real end-of-generation on demand, for testing that path).

Usage (e.g. in a session-scoped fixture)::

    path = write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
N_FF = 128
CONTEXT_LENGTH = 4096

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is that it for on with as was be at by this are from or an have not "
    "but all they one can there which their we more will if about when so what up out no "
    "time has two like some could them other than then now only its also into over new "
    "hello world cat dog sun moon tree river stone light water fire story once upon day"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()\n"


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, SentencePiece scores (higher merges first) and token types."""
    tokens: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    scores: list[float] = [0.0] * len(tokens)
    types: list[int] = [int(TokenType.UNKNOWN)] + [int(TokenType.CONTROL)] * 4
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(int(TokenType.BYTE))
    pieces = ["▁"] + list(_CHARS) + ["▁" + c for c in _CHARS if c.isalnum()]
    pieces += ["▁" + w for w in _WORDS] + _WORDS
    seen = set(tokens)
    for piece in pieces:
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        # Longer pieces score higher so the tokenizer prefers whole words over letters.
        scores.append(-100.0 + 10.0 * len(piece))
        types.append(int(TokenType.NORMAL))
    return tokens, scores, types


def write_tiny_llama(
    path: Path | str, *, seed: int = 1234, suppress_eog: bool = True, eos_always: bool = False
) -> Path:
    """Write the tiny model to ``path`` (well under a second) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = GGUFWriter(str(path), "llama")
    w.add_name("tokenhive-tiny-llama")
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(CHATML_TEMPLATE)

    embd = rand(n_vocab, N_EMBD, scale=1.0)
    # Large output scale -> logit gaps of several units, so greedy picks are stable.
    output = rand(n_vocab, N_EMBD, scale=1.5)
    if suppress_eog and not eos_always:
        output[2] = 0.0  # </s>
        output[4] = 0.0  # <|im_end|>
    if eos_always:
        embd[:, 0] = 8.0  # a constant direction in every hidden state ...
        output[:, 0] = 0.0
        output[2, 0] = 50.0  # ... that only </s> reads, with a large weight
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", output)
    attn = 1.0 / np.sqrt(N_EMBD)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(N_EMBD, N_EMBD, scale=attn))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(N_HEAD_KV * head_dim, N_EMBD, scale=attn))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(N_HEAD_KV * head_dim, N_EMBD, scale=attn))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(N_EMBD, N_EMBD, scale=attn))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(N_FF, N_EMBD, scale=attn))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(N_FF, N_EMBD, scale=attn))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(N_EMBD, N_FF, scale=1.0 / np.sqrt(N_FF)))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
