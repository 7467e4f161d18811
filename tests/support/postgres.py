"""A real PostgreSQL server for tests, started from Debian's binaries in a temporary directory.

PostgreSQL refuses to run as root, so when the tests run as root the server is initialised
and run as ``nobody`` (``setpriv``) in a directory handed to that user. It listens only on a
unix socket in that directory (no TCP port), with ``trust`` authentication, fsync off.
``start_postgres`` raises ``PostgresUnavailable`` with the reason when it cannot start (no
binaries, no psycopg, no unprivileged user); fixtures turn that into a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

PORT = 5432  # only names the socket file (.s.PGSQL.5432) in our private directory


class PostgresUnavailable(Exception):
    pass


class Postgres:
    def __init__(self, root: Path, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.proc = proc

    @property
    def socket_dir(self) -> str:
        return str(self.root)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: PostgreSQL's "smart" shutdown
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable("PostgreSQL is not installed (no initdb; Debian: apt-get install "
                              "postgresql)")


def _as_user() -> tuple[list[str], int | None, int | None]:
    """The command prefix that drops root, and the uid/gid to hand the directory to."""
    if os.geteuid() != 0:
        return [], None, None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise PostgresUnavailable("running as root without setpriv to drop to nobody")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no user nobody") from None
    prefix = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
              "--clear-groups"]
    return prefix, nobody.pw_uid, nobody.pw_gid


def start_postgres(timeout: float = 60.0) -> Postgres:
    try:
        import psycopg
    except ImportError:
        raise PostgresUnavailable("psycopg is not installed") from None
    bin_dir = _bin_dir()
    prefix, uid, gid = _as_user()
    root = Path(tempfile.mkdtemp(prefix="th-pg-", dir="/tmp"))
    data = root / "data"
    data.mkdir()
    if uid is not None and gid is not None:
        for path in (root, data):
            os.chown(path, uid, gid)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(root), "LC_ALL": "C"}
    init = subprocess.run(
        [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "--no-sync", "-E", "UTF8"],
        capture_output=True, env=env, timeout=timeout, check=False)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"initdb failed: {init.stderr.decode(errors='replace')[-500:]}")
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [*prefix, str(bin_dir / "postgres"), "-D", str(data), "-k", str(root), "-p", str(PORT),
         "-c", "listen_addresses=", "-c", "fsync=off", "-c", "synchronous_commit=off",
         "-c", "full_page_writes=off", "-c", "max_connections=50"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    log.close()
    server = Postgres(root, proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            text = (root / "server.log").read_text(errors="replace")[-1000:]
            server.stop()
            raise PostgresUnavailable(f"postgres exited with {proc.returncode}: {text}")
        with contextlib.suppress(psycopg.OperationalError):
            with psycopg.connect(server.url(), connect_timeout=2):
                return server
        if time.monotonic() > deadline:
            server.stop()
            raise PostgresUnavailable(f"postgres did not accept connections in {timeout}s")
        time.sleep(0.05)  # polling interval while the server starts


_shared: Postgres | PostgresUnavailable | None = None


def shared_postgres() -> Postgres:
    """One server for the whole test run (each test takes its own database from it),
    started on first use and stopped when the run ends; raises PostgresUnavailable (the
    same reason every time) where it cannot start."""
    global _shared
    if isinstance(_shared, Postgres) and _shared.proc.poll() is not None:
        _shared = None  # it died: start another
    if _shared is None:
        try:
            _shared = start_postgres()
            atexit.register(_shared.stop)
        except PostgresUnavailable as exc:
            _shared = exc
    if isinstance(_shared, PostgresUnavailable):
        raise _shared
    return _shared


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
