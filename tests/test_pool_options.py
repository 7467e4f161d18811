"""A pool file the broker would refuse is refused when it is loaded, naming the problem,
before any process starts (not as "the broker exited with code 2")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenhive.clients.pool.options import ConfigError, check_pool, read_pool_file

POOL = """
[[workers]]
backend = "echo"
model = "a"

[models.a]
fallbacks = ["b"]

[models.b]
fallbacks = ["a"]
"""


@pytest.mark.timeout(10)
def test_a_fallback_cycle_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(POOL)
    with pytest.raises(ConfigError, match="a -> b -> a"):
        check_pool(read_pool_file(path))


@pytest.mark.timeout(10)
def test_the_same_file_without_the_cycle_loads(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(POOL.replace('fallbacks = ["a"]', "fallbacks = []"))
    check_pool(read_pool_file(path))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["pool.toml", "gateway.toml"])
def test_the_shipped_example_pool_files_load(name: str) -> None:
    """The README shows these files; they must stay loadable as the config grows."""
    config = read_pool_file(Path(__file__).parent.parent / "examples" / name)
    check_pool(config)
    assert config.workers
