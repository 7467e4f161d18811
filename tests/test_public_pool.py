"""``tokenhive.Pool``: a real broker and echo workers from Python, async and sync, stopped
and cleaned up however the block ends (normally, an exception, GC, SIGTERM, Ctrl-C)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_sidecar_lifecycle import descendants, wait_gone
from tokenhive import AsyncClient, Client, Pool, PoolConfig
from tokenhive.schemas.config import ConfigError


def run_dir_of(address: str) -> Path:
    assert address.startswith("ipc://")
    return Path(address.removeprefix("ipc://")).parent


@pytest.mark.timeout(60)
def test_async_pool_from_keywords_serves_then_is_gone() -> None:
    before = descendants(os.getpid())

    async def main() -> tuple[Path, set[int]]:
        async with Pool(backend="echo", model="echo", workers=2, slots=4) as pool:
            client = pool.client()
            assert isinstance(client, AsyncClient) and pool.models == ["echo"]
            answers = await asyncio.gather(*(client.chat(f"hello {i}") for i in range(8)))
            assert [a.text for a in answers] == [f"hello {i}" for i in range(8)]
            status = await client.status()
            assert sorted(w.model for w in status.workers) == ["echo", "echo"]
            run_dir = run_dir_of(pool.address)
            assert run_dir.is_dir() and run_dir.stat().st_mode & 0o077 == 0
            return run_dir, descendants(os.getpid()) - before

    run_dir, children = asyncio.run(main())
    assert len(children) >= 3  # broker + 2 workers
    assert not wait_gone(children, 10) and not run_dir.exists()


@pytest.mark.timeout(60)
def test_sync_pool_from_a_toml_file_and_an_exception_in_the_block(tmp_path: Path) -> None:
    toml = tmp_path / "pool.toml"
    toml.write_text('[[workers]]\nbackend = "echo"\nmodel = "m"\ntext = "scripted reply"\n')
    before = descendants(os.getpid())
    with pytest.raises(KeyError, match="boom"), Pool(toml) as pool:
        client = pool.client()
        assert isinstance(client, Client)
        assert client.chat("anything").text == "scripted reply"
        run_dir = run_dir_of(pool.address)
        children = descendants(os.getpid()) - before
        raise KeyError("boom")
    assert not wait_gone(children, 10) and not run_dir.exists()
    with pytest.raises(RuntimeError, match="not open"):
        pool.client()


@pytest.mark.timeout(60)
def test_a_pool_dropped_without_closing_is_stopped_by_gc() -> None:
    before = descendants(os.getpid())
    pool = Pool(backend="echo", model="echo")
    pool.__enter__()
    run_dir = run_dir_of(pool.address)
    children = descendants(os.getpid()) - before
    assert len(children) >= 2
    del pool
    gc.collect()
    assert not wait_gone(children, 10) and not run_dir.exists()


@pytest.mark.timeout(30)
def test_bad_configs_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="slots"):
        Pool(backend="echo", model="m", slots=0)
    with pytest.raises(ConfigError, match="cannot be combined"):
        Pool(PoolConfig(), backend="echo")
    with pytest.raises(ConfigError, match="no workers"):
        Pool(PoolConfig())
    with pytest.raises(ConfigError, match="colour"):
        Pool(backend="echo", model="m", colour="red")
    with pytest.raises(ConfigError, match="cannot read"):
        Pool(tmp_path / "missing.toml")


OWNER = textwrap.dedent("""
    import os, sys, time
    from tokenhive import Pool
    with Pool(backend="echo", model="echo", workers=2) as pool:
        print(pool.address, flush=True)
        time.sleep(120)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_process_stops_its_pool_and_removes_its_directory(
    sig: signal.Signals,
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        run_dir = run_dir_of(proc.stdout.readline().strip())
        children = descendants(proc.pid)
        assert len(children) >= 3 and run_dir.is_dir()
        proc.send_signal(sig)
        rc = proc.wait(30)
        assert rc == -sig  # ended by the signal, as the process would have been
        assert not wait_gone(children, 10) and not run_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
