"""Stream a model file over HTTP into the cache: resumable, checked, atomic.

Bytes go to ``<dest>.part``. A cut connection keeps the part when the server takes ranges
(it answered 206, or said ``Accept-Ranges: bytes``), and the next attempt asks for
``Range: bytes=<have>-``; a server that ignores the range (200) restarts the file. When the
last attempt fails the part stays only if it can be resumed, so a later resolve continues
where this one stopped; a part that cannot be resumed is removed. A checksum mismatch
removes the part. Only a complete, checked file is renamed to ``dest``.

Logs and errors name the URL as ``scheme://host/path`` only (``tokenhive.logs.redact_url``):
a signed URL carries its credential in the query (``X-Amz-Signature=``, ``sig=``, ``token=``)
or as ``user:password@``, and log lines and error messages travel far (stderr collectors,
clients). The full URL goes only to the HTTP request itself; httpx's own request log line is
cut the same way by the HTTP stack's log guard, which ``download`` installs.

Callers hold ``model_cache.file_lock(dest)``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import httpx
from tqdm import tqdm

from tokenhive.logs import redact_url, redact_urls
from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.workers.backends.http.secrets import install_log_guard
from tokenhive.workers.models.cache import part_path, remove_quietly, sha256_file

log = logging.getLogger(__name__)

# Failures after which trying again may help: the link, not the request, went wrong.
_TRANSIENT = (httpx.TransportError,)  # connect/read errors, timeouts, cut streams


class _Cut(Exception):
    """An attempt ended early; ``resumable`` says whether the part is worth keeping."""

    def __init__(self, message: str, resumable: bool) -> None:
        super().__init__(message)
        self.resumable = resumable


def _content_range_start(response: httpx.Response) -> int | None:
    value = response.headers.get("content-range", "")  # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _attempt(client: httpx.Client, url: str, part: Path, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    # identity: byte offsets must be the file's own, not those of a compressed stream
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 416 and have:
            # Range past the end: our part is stale or wrong; start over next attempt.
            remove_quietly(part)
            raise _Cut(f"server refused range {have}- (416); restarting", resumable=True)
        if response.status_code not in (200, 206):
            raise ModelLoadFailed(
                f"download of {redact_url(url)} failed: HTTP {response.status_code}")
        resumable = response.headers.get("accept-ranges", "").lower() == "bytes"
        if response.status_code == 206:
            if _content_range_start(response) != have:  # not the bytes we asked for
                remove_quietly(part)
                raise _Cut(f"server answered range {have}- with another range", resumable=True)
            resumable, mode = True, "ab"
        else:  # 200: the whole file from byte 0
            have, mode = 0, "wb"
        length = response.headers.get("content-length")
        total = have + int(length) if length is not None else None
        bar = tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), file=sys.stderr, disable=not progress,
            leave=False,
        )
        try:
            with part.open(mode) as out:
                # iter_raw without a size yields bytes as they arrive: nothing received is
                # lost in a buffer when the connection drops.
                for block in response.iter_raw():
                    out.write(block)
                    bar.update(len(block))
                    have += len(block)
        except _TRANSIENT as e:
            raise _Cut(f"connection lost after {have} bytes: {redact_urls(repr(e))}",
                       resumable) from e
        finally:
            bar.close()
        if total is not None and have != total:
            raise _Cut(f"got {have} of {total} bytes", resumable)


def download(
    url: str, dest: Path, *, sha256: str | None = None, progress: bool = True,
    attempts: int = 3, timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` into ``dest.part`` (resuming it) and check its sha256.

    Returns the complete part; the caller validates it and publishes it as ``dest``.
    Raises ModelLoadFailed when every attempt failed or the checksum does not match.
    """
    part = part_path(dest)
    shown = redact_url(url)  # what logs and errors may say about the URL
    install_log_guard()
    last = ""
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        for attempt in range(1, attempts + 1):
            try:
                _attempt(client, url, part, progress)
                break
            except _Cut as e:
                last = str(e)
                log.warning("download %s attempt %d/%d: %s", shown, attempt, attempts, e)
                if not e.resumable:
                    remove_quietly(part)
            except _TRANSIENT as e:  # could not connect or no response at all
                last = redact_urls(repr(e))
                log.warning("download %s attempt %d/%d: %s", shown, attempt, attempts, last)
            except ModelLoadFailed:
                remove_quietly(part)
                raise
            except httpx.HTTPError as e:  # not the link: redirect loops, bad headers
                raise ModelLoadFailed(f"download of {shown} failed: {redact_urls(repr(e))}") from e
            except OSError as e:  # our side: disk full, permissions. The part stays resumable.
                raise ModelLoadFailed(f"cannot write {part} while downloading {shown}: {e}") from e
        else:
            have = part.stat().st_size if part.exists() else 0
            kept = f"; kept {have} bytes in {part} to resume" if have else ""
            raise ModelLoadFailed(
                f"download of {shown} failed after {attempts} attempts: {last}{kept}"
            )
    if sha256 is not None:
        got = sha256_file(part, hashlib.sha256())
        if got != sha256.lower():
            remove_quietly(part)
            raise ModelLoadFailed(
                f"sha256 mismatch for {shown}: expected {sha256.lower()}, got {got}; "
                "the downloaded file was removed"
            )
    return part
