"""Model sourcing: local files, checked GGUF headers, URL downloads into the cache, the hub.

Downloads are served by ``RangeFileServer``, a real HTTP server on 127.0.0.1 that can also
cut a connection mid-body - the failure a real server will not produce on demand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.log_lines import LogLines
from tests.support.range_file_server import RangeFileServer
from tokenhive.logs import JsonFormatter, redact_url, redact_urls
from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.workers.models.cache import (
    CACHE_ENV,
    DEFAULT_LOCK_TIMEOUT,
    LOCK_TIMEOUT_ENV,
    CacheLocked,
    cache_root,
    file_lock,
    lock_timeout,
)
from tokenhive.workers.models.gguf_file import GGUFHeader, inspect_gguf
from tokenhive.workers.models.source import cache_name, resolve_model

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tiny_bytes(tiny_gguf: Path) -> bytes:
    return tiny_gguf.read_bytes()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def url_spec(url: str, cache: Path, sha256: str | None = None) -> GGUFSpec:
    return GGUFSpec(model="tiny", url=url, cache_dir=str(cache), sha256=sha256)


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


# -- local files ---------------------------------------------------------------------------


def test_missing_local_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelLoadFailed, match="not found") as e:
        resolve_model(GGUFSpec(model="m", path=str(missing)))
    assert str(missing) in e.value.message


def test_local_file_resolves_to_itself(tmp_path: Path, tiny_bytes: bytes) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_bytes)
    assert resolve_model(GGUFSpec(model="m", path=str(path))) == path
    good = hashlib.sha256(tiny_bytes).hexdigest()
    assert resolve_model(GGUFSpec(model="m", path=str(path), sha256=good)) == path
    with pytest.raises(ModelLoadFailed, match="sha256 mismatch"):
        resolve_model(GGUFSpec(model="m", path=str(path), sha256="0" * 64))


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.05, 100, 20, 3])
def test_truncated_gguf_is_rejected_before_llama_cpp(
    tmp_path: Path, tiny_bytes: bytes, keep: float
) -> None:
    """A file cut anywhere - in the tensor data, the tensor table, the metadata, the magic."""
    n = int(len(tiny_bytes) * keep) if keep < 1 else int(keep)
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_bytes[:n])
    with pytest.raises(ModelLoadFailed, match="truncated") as e:
        resolve_model(GGUFSpec(model="m", path=str(path)))
    assert str(path) in e.value.message


def test_last_tensor_byte_missing_is_caught(tmp_path: Path, tiny_bytes: bytes) -> None:
    header = inspect_gguf_bytes(tmp_path, tiny_bytes)
    path = tmp_path / "short.gguf"
    path.write_bytes(tiny_bytes[: header.data_end - 1])
    with pytest.raises(ModelLoadFailed, match=f"needs {header.data_end} bytes"):
        resolve_model(GGUFSpec(model="m", path=str(path)))
    path.write_bytes(tiny_bytes[: header.data_end])  # only the final padding missing: fine
    assert resolve_model(GGUFSpec(model="m", path=str(path))) == path


def inspect_gguf_bytes(tmp_path: Path, data: bytes) -> GGUFHeader:
    path = tmp_path / "whole.gguf"
    path.write_bytes(data)
    return inspect_gguf(path)


def test_not_a_gguf_and_directory_are_rejected(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelLoadFailed, match="not a GGUF file"):
        resolve_model(GGUFSpec(model="m", path=str(text)))
    with pytest.raises(ModelLoadFailed, match="directory"):
        resolve_model(GGUFSpec(model="m", path=str(tmp_path)))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadFailed, match="empty"):
        resolve_model(GGUFSpec(model="m", path=str(empty)))


def test_source_must_be_exactly_one(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match="no source"):
        resolve_model(GGUFSpec(model="m"))
    with pytest.raises(ModelLoadFailed, match="path and url"):
        resolve_model(GGUFSpec(model="m", path="/x.gguf", url="http://127.0.0.1:1/x.gguf"))
    with pytest.raises(ModelLoadFailed, match="http"):
        resolve_model(GGUFSpec(model="m", url="ftp://127.0.0.1/x.gguf", cache_dir=str(tmp_path)))


# -- the cache folder ----------------------------------------------------------------------


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_root() == tmp_path / "home/.cache/tokenhive/models"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "spec")) == tmp_path / "spec"
    assert (tmp_path / "spec").is_dir()


def test_cache_names_are_distinct_per_url_and_safe() -> None:
    a = cache_name("http://h/a/model.gguf")
    b = cache_name("http://h/b/model.gguf")
    assert a != b and a.endswith("-model.gguf")
    assert "/" not in cache_name("http://h/x/..%2F..%2Fetc%2Fpasswd")
    assert cache_name("http://h/").endswith("-model.gguf")


# -- URL downloads -------------------------------------------------------------------------


def test_download_lands_in_cache_and_is_reused(
    cache: Path, tiny_bytes: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    with RangeFileServer(tiny_bytes) as srv:
        first = resolve_model(url_spec(srv.url, cache), progress=True)
        assert first.parent == cache and first.read_bytes() == tiny_bytes
        assert srv.range_headers == [None]
        second = resolve_model(url_spec(srv.url, cache), progress=True)
        assert second == first
        assert srv.range_headers == [None], "the second resolve must not touch the network"
    assert cache_files(cache) == [first.name]
    assert "B" in capfd.readouterr().err  # the tqdm bar went to stderr


def test_cut_download_resumes_within_one_resolve(cache: Path, tiny_bytes: bytes) -> None:
    half = len(tiny_bytes) // 2
    with RangeFileServer(tiny_bytes, cut_first_after=half) as srv:
        path = resolve_model(url_spec(srv.url, cache), progress=False, attempts=3)
        assert srv.range_headers == [None, f"bytes={half}-"]
    assert path.read_bytes() == tiny_bytes
    assert cache_files(cache) == [path.name], "no .part may remain"


def test_cut_download_resumes_on_the_next_resolve(cache: Path, tiny_bytes: bytes) -> None:
    cut = len(tiny_bytes) // 3
    with RangeFileServer(tiny_bytes, cut_first_after=cut) as srv:
        spec = url_spec(srv.url, cache)
        with pytest.raises(ModelLoadFailed, match=f"kept {cut} bytes"):
            resolve_model(spec, progress=False, attempts=1)
        dest = cache / cache_name(srv.url)
        part = dest.with_name(dest.name + ".part")
        assert not dest.exists(), "a half file must never sit under the final name"
        assert part.read_bytes() == tiny_bytes[:cut]
        assert resolve_model(spec, progress=False, attempts=1) == dest
        assert srv.range_headers == [None, f"bytes={cut}-"]
    assert dest.read_bytes() == tiny_bytes and not part.exists()


def test_cut_without_range_support_discards_the_part(cache: Path, tiny_bytes: bytes) -> None:
    with RangeFileServer(tiny_bytes, cut_first_after=1000, ranges=False) as srv:
        spec = url_spec(srv.url, cache)
        with pytest.raises(ModelLoadFailed, match="after 1 attempts"):
            resolve_model(spec, progress=False, attempts=1)
        assert cache_files(cache) == [], "an unresumable part must be removed"
        path = resolve_model(spec, progress=False, attempts=1)  # starts over, from byte 0
        assert srv.range_headers == [None, None]
    assert path.read_bytes() == tiny_bytes


def test_checksum_mismatch_removes_the_download(cache: Path, tiny_bytes: bytes) -> None:
    with RangeFileServer(tiny_bytes) as srv:
        with pytest.raises(ModelLoadFailed, match=r"sha256 mismatch.*removed"):
            resolve_model(url_spec(srv.url, cache, sha256="ab" * 32), progress=False)
        assert cache_files(cache) == []
        good = hashlib.sha256(tiny_bytes).hexdigest()
        path = resolve_model(url_spec(srv.url, cache, sha256=good), progress=False)
        resolve_model(url_spec(srv.url, cache, sha256=good), progress=False)
        assert len(srv.range_headers) == 2, "a verified cached file is reused"
    assert path.read_bytes() == tiny_bytes


def test_cached_file_failing_its_checksum_is_fetched_again(cache: Path, tiny_bytes: bytes) -> None:
    good = hashlib.sha256(tiny_bytes).hexdigest()
    with RangeFileServer(tiny_bytes) as srv:
        path = resolve_model(url_spec(srv.url, cache, sha256=good), progress=False)
        path.write_bytes(tiny_bytes[:-1] + b"\x00")  # corrupted in place, same size
        (cache / f"{path.name}.sha256").unlink()
        assert resolve_model(url_spec(srv.url, cache, sha256=good), progress=False) == path
        assert len(srv.range_headers) == 2
    assert path.read_bytes() == tiny_bytes


def test_http_error_and_non_gguf_download(cache: Path, tiny_bytes: bytes) -> None:
    with RangeFileServer(tiny_bytes, status=404) as srv:
        with pytest.raises(ModelLoadFailed, match="HTTP 404"):
            resolve_model(url_spec(srv.url, cache), progress=False)
    with RangeFileServer(b"<html>not found</html>" * 50) as srv:
        with pytest.raises(ModelLoadFailed, match="not a usable GGUF"):
            resolve_model(url_spec(srv.url, cache), progress=False)
    assert cache_files(cache) == []


def test_unreachable_url_fails_clearly(cache: Path, tiny_bytes: bytes) -> None:
    with RangeFileServer(tiny_bytes) as srv:
        url = srv.url  # the port is closed once the server is gone
    with pytest.raises(ModelLoadFailed, match="failed after 2 attempts"):
        resolve_model(url_spec(url, cache), progress=False, attempts=2)


def test_redact_url_keeps_scheme_host_port_and_path_only() -> None:
    assert redact_url("https://u:p@h.example:8443/a/b.gguf?X-Amz-Signature=x&sig=y#frag") == \
        "https://h.example:8443/a/b.gguf"
    assert redact_url("http://[::1]:9/m.gguf?token=t") == "http://[::1]:9/m.gguf"
    assert redact_url("HTTPS://H.example/m.gguf") == "https://h.example/m.gguf"
    assert redact_url("http://h:notaport/x?token=t") == "<unparsable url>"
    assert redact_urls("got https://a.example/x?sig=1, and 'http://u:pw@b/y?t=2'.") == \
        "got https://a.example/x, and 'http://b/y'."


SIGNED_QUERY = "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefcafe&sig=s1gn&token=t0ken"
SIGNED_PARTS = ("AKIAEXAMPLE", "deadbeefcafe", "s1gn", "t0ken", "X-Amz", "pa55word", "?")


@pytest.fixture
def download_logs() -> Iterator[list[LogLines]]:
    """Every record of the download and HTTP loggers, as JSON lines and as plain text."""
    handlers = [LogLines(JsonFormatter()), LogLines(logging.Formatter("%(name)s %(message)s"))]
    loggers = [logging.getLogger(n) for n in ("tokenhive.workers.models", "httpx", "httpcore")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        for h in handlers:
            lg.addHandler(h)
    try:
        yield handlers
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            for h in handlers:
                lg.removeHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate


def test_signed_url_never_reaches_logs_or_errors(
    cache: Path, tiny_bytes: bytes, download_logs: list[LogLines]
) -> None:
    half = len(tiny_bytes) // 2
    with RangeFileServer(tiny_bytes, cut_first_after=half) as srv:
        plain = srv.url  # http://127.0.0.1:PORT/model.gguf
        signed = plain.replace("://", "://user:pa55word@") + SIGNED_QUERY
        spec = url_spec(signed, cache)
        with pytest.raises(ModelLoadFailed, match="kept") as cut:
            resolve_model(spec, progress=False, attempts=1)  # a cut: a warning and an error
        assert resolve_model(spec, progress=False, attempts=1).read_bytes() == tiny_bytes
        assert srv.range_headers == [None, f"bytes={half}-"]  # the full URL was used
    with RangeFileServer(tiny_bytes, status=404) as srv:
        with pytest.raises(ModelLoadFailed, match="HTTP 404") as not_found:
            resolve_model(url_spec(srv.url + SIGNED_QUERY, cache), progress=False)
    with pytest.raises(ModelLoadFailed, match="http") as bad_scheme:
        resolve_model(url_spec("ftp://user:pa55word@h/m.gguf" + SIGNED_QUERY, cache))
    errors = [cut.value.message, not_found.value.message, bad_scheme.value.message]
    assert f"download of {plain} failed after 1 attempts" in errors[0]
    assert f"download of {srv.url} failed: HTTP 404" in errors[1]
    assert "'ftp://h/m.gguf'" in errors[2]
    lines = [line for h in download_logs for line in h.lines]
    assert any(f"download {plain} attempt 1/1: connection lost" in line for line in lines)
    assert any(line.startswith("httpx HTTP Request: GET") for line in lines), lines
    for part in SIGNED_PARTS:
        for text in (*errors, *lines):
            assert part not in text, (part, text)


RESOLVE_SCRIPT = """
import json, sys
from tokenhive.schemas.config import GGUFSpec
from tokenhive.workers.models.source import resolve_model
spec = GGUFSpec(model="tiny", url=sys.argv[1], cache_dir=sys.argv[2], sha256=sys.argv[3])
print(json.dumps(str(resolve_model(spec, progress=False))))
"""


@pytest.mark.timeout(90)
def test_concurrent_workers_download_once(cache: Path, tiny_bytes: bytes) -> None:
    """Three worker processes resolving one URL at once: one download, one intact file."""
    sha = hashlib.sha256(tiny_bytes).hexdigest()
    with RangeFileServer(tiny_bytes) as srv:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RESOLVE_SCRIPT, srv.url, str(cache), sha],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for _ in range(3)
        ]
        results = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
        assert srv.range_headers == [None], "exactly one process may download"
    paths = {json.loads(out) for out, _ in results}
    assert len(paths) == 1
    assert Path(paths.pop()).read_bytes() == tiny_bytes


# -- the cache lock ------------------------------------------------------------------------

HOLD_SCRIPT = """
import sys
from pathlib import Path
from tokenhive.workers.models.cache import file_lock, part_path
dest = Path(sys.argv[1])
with file_lock(dest):
    print("locked", flush=True)
    for line in sys.stdin:  # "grow": the download makes progress; EOF: release
        with part_path(dest).open("ab") as part:
            part.write(b"x")
        print("grown", flush=True)
"""


@pytest.fixture
def holder(cache: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another process holding the cache lock of ``cache/model.gguf`` until its stdin ends."""
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / "model.gguf"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(dest)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc, dest
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_lock_held_without_progress_fails_clearly(
    holder: tuple[subprocess.Popen[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, dest = holder
    lock = dest.with_name("model.gguf.lock")
    started = time.monotonic()
    with pytest.raises(CacheLocked) as info, file_lock(dest, timeout=0.5):
        pass
    assert 0.5 <= time.monotonic() - started < 10
    error = info.value
    assert isinstance(error, ModelLoadFailed) and not error.retryable
    assert (error.dest, error.lock, error.timeout) == (dest, lock, 0.5)
    assert str(dest) in error.message and str(lock) in error.message
    assert LOCK_TIMEOUT_ENV in error.message and "stop it" in error.message
    if sys.platform == "linux":
        assert f"pid {proc.pid} (" in error.message and "file_lock" in error.message
    # Through resolve_model, with the timeout from the environment: no download is tried.
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.3")
    with RangeFileServer(b"unused") as srv:
        url = srv.url
        spec = url_spec(url, dest.parent)
        busy = dest.parent / cache_name(url)
        other = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(busy)], text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert other.stdin is not None and other.stdout is not None
        try:
            assert other.stdout.readline() == "locked\n"
            with pytest.raises(CacheLocked, match=f"{busy.name} is locked"):
                resolve_model(spec, progress=False)
        finally:
            other.stdin.close()
            other.wait(timeout=30)
        assert srv.range_headers == []


def test_a_lock_is_waited_for_while_the_holder_makes_progress(
    holder: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, dest = holder
    assert proc.stdin is not None and proc.stdout is not None
    outcome: list[object] = []

    def wait_for_lock() -> None:
        try:
            with file_lock(dest, timeout=1.0):
                outcome.append("acquired")
        except Exception as e:
            outcome.append(e)

    waiter = threading.Thread(target=wait_for_lock)
    waiter.start()
    started = time.monotonic()
    while time.monotonic() - started < 3.0:  # three timeouts long, with steady progress
        proc.stdin.write("grow\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "grown\n"
    assert not outcome, outcome  # still waiting, not timed out
    proc.stdin.close()  # the holder finishes and releases
    waiter.join(timeout=20)
    assert outcome == ["acquired"]


def test_lock_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    assert lock_timeout() == DEFAULT_LOCK_TIMEOUT
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "2.5")
    assert lock_timeout() == 2.5
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "inf")
    assert lock_timeout() == float("inf")
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, bad)
        with pytest.raises(ModelLoadFailed, match=LOCK_TIMEOUT_ENV):
            lock_timeout()


# -- Hugging Face --------------------------------------------------------------------------


def test_hub_without_huggingface_hub_installed(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sys.modules[name] = None makes `import name` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    spec = GGUFSpec(model="m", hf_repo="org/repo", hf_file="m.gguf", cache_dir=str(cache))
    with pytest.raises(ModelLoadFailed, match="huggingface_hub package, which is not installed"):
        resolve_model(spec)


def test_hub_needs_a_file_name(cache: Path) -> None:
    with pytest.raises(ModelLoadFailed, match="needs hf_file"):
        resolve_model(GGUFSpec(model="m", hf_repo="org/repo", cache_dir=str(cache)))


HUB_SCRIPT = """
import sys
from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.workers.models.source import resolve_model
spec = GGUFSpec(model="m", hf_repo=sys.argv[1], hf_file=sys.argv[2], cache_dir=sys.argv[3])
try:
    print("OK", resolve_model(spec, progress=False))
except ModelLoadFailed as e:
    print("FAILED", e.message)
"""


def run_hub_offline(repo: str, file: str, cache: Path) -> str:
    """Resolve in a fresh process with the hub offline (the flag is read at import)."""
    pytest.importorskip("huggingface_hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, repo, file, str(cache)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_hub_offline_and_not_cached_fails_clearly(cache: Path) -> None:
    out = run_hub_offline("org/repo", "model.gguf", cache)
    assert out.startswith("FAILED"), out
    assert "not in the local Hugging Face cache" in out and "offline" in out, out


def test_hub_offline_serves_from_its_cache(cache: Path, tiny_bytes: bytes) -> None:
    """A file already in the hub cache layout resolves with no network at all."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "huggingface" / "models--org--repo"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "tiny.gguf").write_bytes(tiny_bytes)
    out = run_hub_offline("org/repo", "tiny.gguf", cache)
    assert out == f"OK {snapshot / 'tiny.gguf'}", out


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # httpx honours *_PROXY variables; loopback test servers must be reached directly.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield
