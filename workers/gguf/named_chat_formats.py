"""Built-in chat formats for models whose GGUF carries no template (spec.chat_format).

Each one reproduces its family's official template (whitespace and trimming included), minus
the leading BOS, which the tokenizer adds (``add_bos``). Gemma's is the one the default model
needs: the Gemma 3 GGUF shipped for it has no ``tokenizer.chat_template``. The tests check
each format against the official jinja template rendered through ``TemplateFormatter``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import Message

ROLES = frozenset({"system", "user", "assistant", "tool"})


def check_messages(messages: Sequence[Message]) -> None:
    """Reject what no format can render, before any format sees it."""
    if not messages:
        raise InvalidRequest("a chat request needs at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role is {m.role!r}; expected one of {sorted(ROLES)}"
            )


def metadata_flag(metadata: dict[str, str], key: str) -> bool | None:
    """A GGUF boolean as text ("true"/"false", "1"/"0"); None when absent or unreadable."""
    value = metadata.get(key, "").strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    return None


class NamedFormatter:
    native_tools = False  # tools reach these formats as a system turn (tool_prompt.py)

    def __init__(
        self, name: str, render: Callable[[Sequence[Message]], str], stop: list[str],
        add_bos: bool,
    ) -> None:
        self.name = name
        self._render = render
        self.stop = stop
        self.add_bos = add_bos

    def __call__(
        self, messages: list[Message], tools: list[dict[str, Any]] | None = None
    ) -> str:
        check_messages(messages)
        return self._render(messages)


def _split_system(messages: Sequence[Message]) -> tuple[str | None, Sequence[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return None, messages


def _check_alternation(rest: Sequence[Message]) -> None:
    """The rule Llama 2's and Gemma's official templates enforce with raise_exception."""
    for i, m in enumerate(rest):
        if (m.role == "user") != (i % 2 == 0):
            raise InvalidRequest(
                "chat template rejected the messages: Conversation roles must alternate "
                "user/assistant/user/assistant/..."
            )


def render_llama2(messages: Sequence[Message]) -> str:
    """``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] ...``"""
    system, rest = _split_system(messages)
    _check_alternation(rest)
    out: list[str] = []
    for i, m in enumerate(rest):
        content = m.content
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m.role == "user":
            out.append(("<s>" if i else "") + f"[INST] {content.strip()} [/INST]")
        elif m.role == "assistant":
            out.append(f" {content.strip()} </s>")
    return "".join(out)


def render_llama3(messages: Sequence[Message]) -> str:
    turns = (
        f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content.strip()}<|eot_id|>"
        for m in messages
    )
    return "".join(turns) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def render_chatml(messages: Sequence[Message]) -> str:
    turns = (f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return "".join(turns) + "<|im_start|>assistant\n"


def render_gemma(messages: Sequence[Message]) -> str:
    """Gemma 3's template: system text prefixed to the first turn, assistant -> model."""
    system, rest = _split_system(messages)
    _check_alternation(rest)
    prefix = "" if system is None else system + "\n\n"
    out: list[str] = []
    for i, m in enumerate(rest):
        role = "model" if m.role == "assistant" else m.role
        first = prefix if i == 0 else ""
        out.append(f"<start_of_turn>{role}\n{first}{m.content.strip()}<end_of_turn>\n")
    return "".join(out) + "<start_of_turn>model\n"


def render_plain(messages: Sequence[Message]) -> str:
    """For base models: ``User: ...`` / ``Assistant: ...`` lines, system text on top."""
    out: list[str] = []
    for m in messages:
        if m.role == "system":
            out.append(f"{m.content}\n\n")
        elif m.role == "assistant":
            out.append(f"Assistant: {m.content}\n")
        else:
            out.append(f"User: {m.content}\n")
    return "".join(out) + "Assistant:"


# name -> (render, stop strings, add_bos when the file does not say)
_FORMATS: dict[str, tuple[Callable[[Sequence[Message]], str], list[str], bool]] = {
    "llama-2": (render_llama2, ["</s>"], True),
    "llama-3": (render_llama3, ["<|eot_id|>"], True),
    "chatml": (render_chatml, ["<|im_end|>"], False),
    "gemma": (render_gemma, ["<end_of_turn>"], True),
    "plain": (render_plain, ["\nUser:"], True),
}


def _factory(name: str) -> Callable[[bool | None], NamedFormatter]:
    render, stop, add_bos = _FORMATS[name]

    def make(add_bos_from_file: bool | None) -> NamedFormatter:
        return NamedFormatter(
            name, render, list(stop), add_bos if add_bos_from_file is None else add_bos_from_file
        )

    return make


#: chat_format name -> factory taking the file's add_bos flag (None: the format's default)
NAMED_FORMATS: dict[str, Callable[[bool | None], NamedFormatter]] = {
    name: _factory(name) for name in _FORMATS
}
