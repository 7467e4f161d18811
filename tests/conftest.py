"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_gguf import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weights llama GGUF (written in well under a second)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
