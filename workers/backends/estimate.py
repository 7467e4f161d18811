"""Token estimates and finish-reason names for backends that cannot count exactly.

Remote servers that send no usage and local binaries that print none still owe the client a
``Usage``; these heuristics fill it and the backends mark it ``estimated=True``.
"""

from __future__ import annotations

from tokenhive.schemas.messages import Message, Usage

CHARS_PER_TOKEN = 4.0  # the usual rule of thumb for English BPE vocabularies
MESSAGE_OVERHEAD = 4  # role markers and separators a chat template adds per turn


def estimate_tokens(text: str) -> int:
    """Roughly how many tokens ``text`` holds (at least 1 for non-empty text)."""
    if not text:
        return 0
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def estimate_prompt(messages: list[Message], prompt: str | None) -> int:
    if prompt is not None:
        return estimate_tokens(prompt)
    return sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD for m in messages)


def estimated_usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        estimated=True,
    )


_FINISH = {
    "stop": "stop",
    "eos": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "max_tokens": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # OpenAI's legacy name
    "tool_use": "tool_calls",  # Anthropic
}


def finish_reason(raw: str | None) -> str:
    """Upstream names mapped onto the wire's ``stop | length | tool_calls``; anything else
    (content_filter, ...) ended the turn normally from our point of view, so ``stop``."""
    return _FINISH.get(raw or "stop", "stop")
