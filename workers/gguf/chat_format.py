"""Turn chat messages into the prompt text a GGUF model was trained on.

Choice, in order:

1. ``chat_format`` named explicitly (spec.chat_format): one of the built-in formatters in
   ``tokenhive.workers.gguf.named_chat_formats`` (llama-2, llama-3, chatml, gemma, plain). An
   explicit name overrides the file's template.
2. The model's own template (``tokenizer.chat_template`` in the GGUF metadata), rendered
   exactly as Hugging Face ``apply_chat_template`` and llama.cpp do: a sandboxed jinja2
   environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
   ``strftime_now``, the BOS/EOS token texts and ``add_generation_prompt=True``. We render
   it ourselves because llama-cpp-python, given no explicit handler, may guess a look-alike
   built-in format that differs from the template (extra tokens, other whitespace).
3. Neither: a formatter that answers every chat request with ``InvalidRequest`` - the
   model still serves plain completions, so this is not a load failure.

``metadata`` is a ``dict[str, str]``: either ``gguf_file.read_gguf_metadata(path)`` (which
adds the BOS/EOS token texts under derived keys) or llama-cpp-python's ``Llama.metadata``
(which has only token ids; pass ``bos_token=``/``eos_token=`` texts then, e.g. from
``llama._model.token_get_text(llama.token_bos())``).

Tools: a template that uses the ``tools`` variable gets the request's tools (OpenAI's
``{"type": "function", "function": {...}}`` dicts) and messages with ``tool_calls`` (arguments
as an object, as Hugging Face templates expect) and ``tool_call_id``; ``native_tools`` says
so. Formats without it get the tools described in a system turn instead (``tool_prompt``).

``add_bos`` tells the engine how to tokenize the result: True -> let the tokenizer prepend
BOS; False -> the text already begins with the BOS token's text. Either way tokenize with
``special=True`` so template markers become their special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenhive.schemas.errors import InvalidRequest, ModelLoadFailed
from tokenhive.schemas.messages import Message
from tokenhive.workers.gguf.named_chat_formats import NAMED_FORMATS, check_messages, metadata_flag
from tokenhive.workers.models.gguf_file import BOS_TEXT_KEY, EOS_TEXT_KEY

TEMPLATE_KEY = "tokenizer.chat_template"

# End-of-turn markers a template may use; those it contains become extra stop strings,
# so a model that prints the marker as text still stops there.
KNOWN_TURN_ENDS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|eom_id|>")


class ChatFormatter(Protocol):
    name: str
    stop: list[str]
    add_bos: bool
    native_tools: bool  # renders ``tools`` and tool turns itself

    def __call__(
        self, messages: list[Message], tools: list[dict[str, Any]] | None = None
    ) -> str: ...


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's ``{% generation %}`` block marks assistant text for training masks;
    rendering a prompt just renders its body (as transformers and llama-cpp-python do)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    # Hugging Face's override: jinja's own tojson HTML-escapes, which templates do not expect.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
        sort_keys=sort_keys,
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _arguments(text: str) -> Any:
    """A call's arguments as the object templates expect (the text if it is not JSON)."""
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text


def as_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


class TemplateFormatter:
    """The model's own jinja chat template."""

    def __init__(self, source: str, bos_token: str, eos_token: str, add_bos_default: bool):
        self.name = "gguf-template"
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ModelLoadFailed(f"the model's chat template does not compile: {e}") from e
        self.stop = [m for m in KNOWN_TURN_ENDS if m in source]
        if eos_token and eos_token not in self.stop:
            self.stop.append(eos_token)
        self.add_bos = add_bos_default and not self._renders_bos()
        self.native_tools = "tools" in source

    def _renders_bos(self) -> bool:
        """Does the template write BOS itself? (then the tokenizer must not add another)"""
        if not self.bos_token:
            return False
        try:
            probe = self.render([{"role": "user", "content": "hi"}])
        except InvalidRequest:  # a template that insists on e.g. a system turn
            return "bos_token" in self.source
        return probe.startswith(self.bos_token)

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        try:
            return self._template.render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=True,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequest(f"chat template rejected the messages: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise InvalidRequest(f"chat template failed on these messages: {e!r}") from e

    def __call__(
        self, messages: list[Message], tools: list[dict[str, Any]] | None = None
    ) -> str:
        check_messages(messages)
        return self.render(as_dicts(messages), tools or None)


class NoChatFormat:
    """A model with no template and no configured format: chat is refused, completion works."""

    name = "none"
    add_bos = True
    native_tools = False

    def __init__(self) -> None:
        self.stop: list[str] = []

    def __call__(
        self, messages: list[Message], tools: list[dict[str, Any]] | None = None
    ) -> str:
        raise InvalidRequest(
            "this model has no chat template and no chat_format is configured; set "
            f"chat_format to one of {sorted(NAMED_FORMATS)} or send a completion request"
        )


def make_chat_formatter(
    metadata: dict[str, str], chat_format: str | None, *,
    bos_token: str | None = None, eos_token: str | None = None,
) -> ChatFormatter:
    """The formatter for a model; raise ModelLoadFailed for an unknown name or bad template."""
    add_bos_default = metadata_flag(metadata, "tokenizer.ggml.add_bos_token")
    if chat_format is not None:
        try:
            factory = NAMED_FORMATS[chat_format]
        except KeyError:
            raise ModelLoadFailed(
                f"unknown chat_format {chat_format!r}; known: {sorted(NAMED_FORMATS)} "
                "(or leave it unset to use the model's own template)"
            ) from None
        return factory(add_bos_default)
    source = metadata.get(TEMPLATE_KEY)
    if source:
        bos = bos_token if bos_token is not None else metadata.get(BOS_TEXT_KEY, "")
        eos = eos_token if eos_token is not None else metadata.get(EOS_TEXT_KEY, "")
        return TemplateFormatter(source, bos, eos, add_bos_default is not False)
    return NoChatFormat()
