"""Chat formatting: the GGUF's own template rendered exactly, the named formats, the errors.

The official templates below are the ones published with each model family's tokenizer
(Gemma 3, Llama 3 Instruct, Llama 2 Chat). Each named formatter must produce what its
official template produces; the template path must agree with llama-cpp-python's own
jinja renderer; the tiny model's template must come out of a real GGUF file.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFWriter
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tests.support.tiny_gguf import CHATML_TEMPLATE
from tokenhive.schemas.errors import InvalidRequest, ModelLoadFailed
from tokenhive.schemas.messages import Message
from tokenhive.workers.gguf.chat_format import TemplateFormatter, as_dicts, make_chat_formatter
from tokenhive.workers.models.gguf_file import BOS_TEXT_KEY, EOS_TEXT_KEY, read_gguf_metadata

pytestmark = pytest.mark.timeout(60)

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# name -> (official template, BOS text, EOS text); BOS is what the tokenizer adds for named
# formats, so official == BOS + named.
OFFICIAL = {
    "gemma": (GEMMA3_TEMPLATE, "<bos>", "<eos>"),
    "llama-3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "llama-2": (LLAMA2_TEMPLATE, "<s>", "</s>"),
    "chatml": (CHATML_TEMPLATE, "", ""),
}


def msgs(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role=r, content=c) for r, c in pairs]


CONVERSATIONS = [
    msgs(("user", "Hello!")),
    msgs(("system", "You are terse."), ("user", "Hi")),
    msgs(("user", "  padded question \n"), ("assistant", " an answer "), ("user", "and?")),
    msgs(("system", " Be kind. "), ("user", "One"), ("assistant", "Two"), ("user", "Three")),
    msgs(("user", "héllo ✓ — unicode, \"quotes\" and {{ braces }}")),
]
NOT_ALTERNATING = msgs(("user", "a"), ("user", "b"))


def write_template_gguf(path: Path, template: str, tokens: list[str], bos: int, eos: int) -> Path:
    """A small real GGUF holding a tokenizer's metadata and a chat template."""
    w = GGUFWriter(str(path), "llama")
    w.add_token_list(tokens)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)
    w.add_chat_template(template)
    w.add_tensor("dummy", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gemma_template_md(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # Gemma's token order: 0 <pad>, 1 <eos>, 2 <bos>
    path = tmp_path_factory.mktemp("tpl") / "gemma-template.gguf"
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    return read_gguf_metadata(write_template_gguf(path, GEMMA3_TEMPLATE, tokens, bos=2, eos=1))


# -- the model's own template --------------------------------------------------------------


def test_gemma_template_from_gguf_is_applied_exactly(gemma_template_md: dict[str, str]) -> None:
    assert gemma_template_md[BOS_TEXT_KEY] == "<bos>"
    assert gemma_template_md[EOS_TEXT_KEY] == "<eos>"
    fmt = make_chat_formatter(gemma_template_md, None)
    assert fmt.name == "gguf-template"
    prompt = fmt(msgs(("system", "You are terse."), ("user", " Hello there! "),
                      ("assistant", "Hi."), ("user", "Bye")))
    assert prompt == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHello there!<end_of_turn>\n"
        "<start_of_turn>model\nHi.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert fmt.add_bos is False, "the template writes <bos>; the tokenizer must not add one"
    assert fmt.stop == ["<end_of_turn>", "<eos>"]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_template_rendering_agrees_with_llama_cpp_python(name: str) -> None:
    template, bos, eos = OFFICIAL[name]
    ours = TemplateFormatter(template, bos, eos, add_bos_default=True)
    theirs = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
    for conversation in CONVERSATIONS:
        assert ours(conversation) == theirs(messages=as_dicts(conversation)).prompt


def test_template_raise_exception_is_invalid_request(gemma_template_md: dict[str, str]) -> None:
    fmt = make_chat_formatter(gemma_template_md, None)
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        fmt(NOT_ALTERNATING)


def test_tiny_model_template_from_file_and_from_llama_metadata(tiny_gguf: Path) -> None:
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
               "<|im_start|>assistant\n"
    conversation = msgs(("system", "Be brief."), ("user", "Hi"))
    from_file = make_chat_formatter(read_gguf_metadata(tiny_gguf), None)
    assert from_file(conversation) == expected
    assert from_file.add_bos is True  # ChatML writes no BOS; the file says add one
    assert from_file.stop == ["<|im_end|>", "</s>"]

    llama = llama_cpp.Llama(str(tiny_gguf), vocab_only=True, verbose=False)
    try:
        assert {k: v for k, v in read_gguf_metadata(tiny_gguf).items()
                if not k.startswith("tokenhive.")} == llama.metadata
        bos_text = llama._model.token_get_text(llama.token_bos())
        eos_text = llama._model.token_get_text(llama.token_eos())
        from_llama = make_chat_formatter(
            llama.metadata, None, bos_token=bos_text, eos_token=eos_text
        )
        assert from_llama(conversation) == expected
        assert (from_llama.add_bos, from_llama.stop) == (from_file.add_bos, from_file.stop)
        tokens = llama.tokenize(expected.encode(), add_bos=from_file.add_bos, special=True)
        assert tokens[0] == llama.token_bos() and tokens.count(llama.token_bos()) == 1
        assert tokens.count(3) == 3 and tokens.count(4) == 2  # <|im_start|>, <|im_end|>
    finally:
        llama.close()


def test_explicit_chat_format_overrides_template(tiny_gguf: Path) -> None:
    fmt = make_chat_formatter(read_gguf_metadata(tiny_gguf), "plain")
    assert fmt.name == "plain"
    assert fmt(msgs(("user", "Hi"))) == "User: Hi\nAssistant:"


def test_template_runs_sandboxed() -> None:
    escape = TemplateFormatter(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}", "", "", add_bos_default=True
    )
    with pytest.raises(InvalidRequest):
        escape(msgs(("user", "x")))
    mutate = TemplateFormatter(
        "{% set _ = messages.append({'role': 'user'}) %}ok", "", "", add_bos_default=True
    )
    with pytest.raises(InvalidRequest):
        mutate(msgs(("user", "x")))


def test_template_helpers_match_hugging_face() -> None:
    fmt = TemplateFormatter(
        "{{ messages | tojson }}|{% for m in messages %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% break %}{% endfor %}|{{ strftime_now('%Y') | length }}",
        "", "", add_bos_default=True,
    )
    out = fmt(msgs(("user", "é<b>"), ("assistant", "second")))
    assert out == '[{"role": "user", "content": "é<b>"}, ' \
                  '{"role": "assistant", "content": "second"}]|é<b>|4'


# -- named formats -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_named_format_equals_official_template(name: str) -> None:
    template, bos, eos = OFFICIAL[name]
    official = TemplateFormatter(template, bos, eos, add_bos_default=True)
    named = make_chat_formatter({}, name)
    for conversation in [*CONVERSATIONS, NOT_ALTERNATING]:
        try:
            want = official(conversation)
        except InvalidRequest:
            with pytest.raises(InvalidRequest, match="alternate"):
                named(conversation)
            continue
        assert bos + named(conversation) == want


def test_named_formats_expected_text() -> None:
    conversation = msgs(("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"))
    expected = {
        "llama-2": "[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]",
        "llama-3": "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
                  "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
                  "<|im_start|>assistant\n",
        "gemma": "<start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1"
                 "<end_of_turn>\n<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\n",
        "plain": "S\n\nUser: U1\nAssistant: A1\nUser: U2\nAssistant:",
    }
    stops = {"llama-2": ["</s>"], "llama-3": ["<|eot_id|>"], "chatml": ["<|im_end|>"],
             "gemma": ["<end_of_turn>"], "plain": ["\nUser:"]}
    for name, text in expected.items():
        fmt = make_chat_formatter({}, name)
        assert (fmt.name, fmt(conversation), fmt.stop) == (name, text, stops[name])


def test_add_bos_follows_the_file_then_the_format() -> None:
    assert make_chat_formatter({}, "chatml").add_bos is False
    assert make_chat_formatter({}, "gemma").add_bos is True
    said_yes = {"tokenizer.ggml.add_bos_token": "true"}
    said_no = {"tokenizer.ggml.add_bos_token": "false"}
    assert make_chat_formatter(said_yes, "chatml").add_bos is True
    assert make_chat_formatter(said_no, "llama-3").add_bos is False


# -- errors --------------------------------------------------------------------------------


def test_no_template_and_no_format_refuses_chat_only() -> None:
    fmt = make_chat_formatter({"general.architecture": "llama"}, None)
    assert fmt.name == "none"
    with pytest.raises(InvalidRequest, match="no chat template and no chat_format"):
        fmt(msgs(("user", "hi")))


def test_unknown_format_and_broken_template_fail_the_load() -> None:
    with pytest.raises(ModelLoadFailed, match=r"unknown chat_format 'vicuna'.*chatml"):
        make_chat_formatter({}, "vicuna")
    with pytest.raises(ModelLoadFailed, match="does not compile"):
        make_chat_formatter({"tokenizer.chat_template": "{% for m in messages %}"}, None)


@pytest.mark.parametrize("name", [None, "gemma", "chatml", "plain"])
def test_bad_messages_are_invalid_requests(name: str | None) -> None:
    fmt = make_chat_formatter({"tokenizer.chat_template": CHATML_TEMPLATE}, name)
    with pytest.raises(InvalidRequest, match="at least one message"):
        fmt([])
    with pytest.raises(InvalidRequest, match="role is 'wizard'"):
        fmt(msgs(("wizard", "hi")))
