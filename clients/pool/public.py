"""``Pool``: a broker and its workers, started from Python for the length of a block.

    from tokenhive import Pool

    async with Pool(backend="echo", model="echo", workers=2, slots=8) as pool:
        client = pool.client()                      # an AsyncClient on this pool
        print((await client.chat("hi")).text)

    with Pool("pool.toml") as pool:                 # the same from synchronous code
        client = pool.client()                      # a Client
        print(client.chat("hi").text)

It starts the processes the CLI's local pool starts (``local.local_pool``: broker and
workers as supervised subprocesses on private ipc sockets in a 0700 temporary directory),
waits until every worker serves, and on leaving the block stops them (workers drain first)
and removes the directory, however the block is left: an exception, Ctrl-C, and, through
``last_resort``, garbage collection, interpreter exit or a SIGTERM of the process.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.loop_thread import LoopThread
from tokenhive.clients.pool.last_resort import LastResort, register, unregister
from tokenhive.clients.pool.local import LocalPool, local_pool
from tokenhive.clients.pool.options import check_pool, default_spec_dict, read_pool_file
from tokenhive.clients.sync_client import Client
from tokenhive.schemas.config import AnyWorkerSpec, ConfigError, PoolConfig


def pool_config(config: PoolConfig | str | os.PathLike[str] | None,
                spec: dict[str, Any]) -> PoolConfig:
    """A PoolConfig from a PoolConfig, a TOML path, or the fields of one worker spec
    (``workers=N`` is its ``count``; no ``backend``: a ``path`` means gguf, nothing at all
    the default model). ConfigError names what is wrong."""
    if config is not None:
        if spec:
            raise ConfigError(f"Pool: a config and keyword arguments ({', '.join(spec)}) "
                              "cannot be combined")
        if isinstance(config, PoolConfig):
            if not config.workers:
                raise ConfigError("Pool: the config has no workers")
            check_pool(config)
            return config
        return read_pool_file(Path(config))
    raw = dict(spec)
    if "workers" in raw:
        raw["count"] = raw.pop("workers")
    if "backend" not in raw:
        if "path" in raw:
            raw["backend"] = "gguf"
        else:
            raw = {**default_spec_dict(), **raw}
    raw.setdefault("model", Path(str(raw["path"])).stem if raw.get("path") else raw["backend"])
    try:
        worker: AnyWorkerSpec = msgspec.convert(raw, type=AnyWorkerSpec)  # type: ignore[arg-type]
    except msgspec.ValidationError as exc:
        raise ConfigError(f"Pool: worker spec: {exc}") from None
    config = PoolConfig(workers=[worker])
    check_pool(config)
    return config


class Pool:
    """A local pool (see the module doc). ``config``: a PoolConfig or a pool TOML path; or
    keyword arguments for one worker spec (``backend``, ``model``, ``workers``, ``slots``,
    ``path``, ``gpus``, and any other field of the backend's spec). ``log_level`` is the
    processes' (their logs go to this process's stderr); ``ready_timeout`` bounds the wait
    for every worker to serve."""

    def __init__(self, config: PoolConfig | str | os.PathLike[str] | None = None, *,
                 log_level: str = "warning", ready_timeout: float = 180.0,
                 **spec: Any) -> None:
        self.config = pool_config(config, spec)
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self._stack: contextlib.AsyncExitStack | None = None
        self._local: LocalPool | None = None
        self._thread: LoopThread | None = None  # the sync form's event loop
        self._clients: list[AsyncClient | Client] = []
        self._resort: LastResort | None = None
        self._finalizer: weakref.finalize | None = None

    # -- what it serves -------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The broker's client address (an ipc:// path in the pool's private directory)."""
        return self._started().address

    @property
    def models(self) -> list[str]:
        """The model names it serves, in config order."""
        return list(dict.fromkeys(spec.model for spec in self.config.workers))

    def client(self, **options: Any) -> Any:
        """A client on this pool: an AsyncClient inside ``async with``, a Client inside
        ``with``; its default model is the pool's first. Closed with the pool."""
        local = self._started()
        options.setdefault("model", local.models[0])
        client: AsyncClient | Client
        client = Client(local.address, **options) if self._thread else AsyncClient(
            local.address, **options)
        self._clients.append(client)
        return client

    # -- async form -----------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        if self._thread is not None or self._stack is not None:
            raise RuntimeError("this Pool is already open")
        await self._astart()
        self._arm()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the pool (workers drain first) and remove its directory. Idempotent."""
        clients, self._clients = self._clients, []
        for client in clients:
            if isinstance(client, AsyncClient):
                await client.aclose()
            else:
                client.close()
        stack, self._stack = self._stack, None
        if stack is not None:
            try:
                await stack.aclose()
            finally:
                self._forget()

    async def _astart(self) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            local = await stack.enter_async_context(local_pool(
                self.config, log_level=self.log_level, ready_timeout=self.ready_timeout))
        except BaseException:
            await stack.aclose()
            raise
        self._stack, self._local = stack, local

    def _arm(self) -> None:
        """The last-resort stop, from the thread that opened the pool (a SIGTERM handler
        can only be installed from the main thread)."""
        local = self._started()
        self._resort = LastResort(local.processes, local.run_dir)
        register(self._resort)
        self._finalizer = weakref.finalize(self, self._resort.run)

    # -- sync form ------------------------------------------------------------------------

    def __enter__(self) -> Pool:
        if self._thread is not None or self._stack is not None:
            raise RuntimeError("this Pool is already open")
        self._thread = LoopThread(name="tokenhive-pool")
        try:
            self._thread.run(self._astart())
        except BaseException:  # a failed start, or Ctrl-C while waiting for it
            self.close()
            raise
        self._arm()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """The sync form's ``aclose``."""
        thread = self._thread
        if thread is None:
            return
        try:
            thread.run(self.aclose())
        finally:
            if self._resort is not None:  # stopped half-way (Ctrl-C again): finish by force
                self._resort.run()
                self._forget()
            thread.close()
            self._thread = None

    # -- internals ------------------------------------------------------------------------

    def _started(self) -> LocalPool:
        if self._local is None or self._stack is None:
            raise RuntimeError("the Pool is not open: use `with Pool(...)` or "
                               "`async with Pool(...)`")
        return self._local

    def _forget(self) -> None:
        if self._resort is not None:
            unregister(self._resort)
            self._resort.done = True
            self._resort = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._local = None
