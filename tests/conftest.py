"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from tests.support.postgres import Postgres, PostgresUnavailable, shared_postgres
from tests.support.tiny_gguf import write_tiny_llama

# Property tests: the same examples on every machine and run, no example database, no
# per-example deadline (a loaded 2-core box is not a bug); each test sets its own count.
settings.register_profile("tokenhive", derandomize=True, database=None, deadline=None)
settings.load_profile("tokenhive")



@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weights llama GGUF (written in well under a second)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Commands run in-process (``main(["serve", ...])``) keep their default data dir (the
    Batches job store) under the test run's tmp dir, never the user's ~/.local/share."""
    import os

    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))


@pytest.fixture
def postgres() -> Postgres:
    """The test run's PostgreSQL server (started once, as an unprivileged user); the test is
    skipped, saying why, where none can start."""
    try:
        return shared_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server for the shared job store tests: {exc}")
