"""Find the GGUF file a spec names: a local path, a URL, or a Hugging Face repo file.

``resolve_model`` returns a path that llama.cpp can load: the file exists, its header parses
and it is long enough for all its tensors (``gguf_file.inspect_gguf``). Everything that goes
wrong is a ``ModelLoadFailed`` saying what to fix.

Downloads land in one cache folder (``model_cache.cache_root``) and are reused: a second
resolve of the same URL makes no HTTP request. Workers resolving the same URL at once
serialize on a file lock, so one downloads and the others reuse its file. Errors name a URL
as ``scheme://host/path`` only: a signed URL's query is a credential.

A gguf spec named ``gemma3-270m`` with no source at all is the embedded default model
(``default_model.default_model_path``), so a pool file can list it without a path.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tokenhive.logs import redact_url, redact_urls
from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.workers.models.cache import (
    cache_root,
    file_lock,
    is_verified,
    mark_verified,
    publish,
    remove_quietly,
    sha256_file,
)
from tokenhive.workers.models.default import DEFAULT_MODEL_NAME, default_model_path
from tokenhive.workers.models.download import download
from tokenhive.workers.models.gguf_file import inspect_gguf

HUB_INSTALL_HINT = "pip install 'huggingface-hub>=0.24' (the tokenhive[hub] extra)"


def resolve_model(spec: GGUFSpec, *, progress: bool = True, attempts: int = 3) -> Path:
    """The checked local path of the model file; downloads it first if needed."""
    given = [name for name in ("path", "url", "hf_repo") if getattr(spec, name)]
    if not given and spec.model == DEFAULT_MODEL_NAME:
        return default_model_path(spec.cache_dir)  # the embedded default, by its name
    if not given:
        raise ModelLoadFailed(
            f"model {spec.model!r} has no source: set path, url, or hf_repo + hf_file "
            f"(only {DEFAULT_MODEL_NAME!r}, the embedded default, needs none)"
        )
    if len(given) > 1:
        raise ModelLoadFailed(
            f"model {spec.model!r} names {' and '.join(given)}; set exactly one source"
        )
    if spec.path:
        return _local(Path(spec.path).expanduser(), spec.sha256)
    if spec.url:
        return _from_url(spec.url, spec.sha256, cache_root(spec.cache_dir), progress, attempts)
    return _from_hub(spec, progress)


def _local(path: Path, sha256: str | None) -> Path:
    if not path.exists():
        raise ModelLoadFailed(f"model file not found: {path}")
    inspect_gguf(path)
    if sha256 is not None and (got := sha256_file(path)) != sha256.lower():
        raise ModelLoadFailed(f"sha256 mismatch for {path}: expected {sha256.lower()}, got {got}")
    return path


def cache_name(url: str) -> str:
    """``<12 hex of sha1(url)>-<file name>``: readable, and distinct per URL."""
    tail = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", tail).lstrip(".") or "model.gguf"
    return f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{tail}"


def _from_url(url: str, sha256: str | None, root: Path, progress: bool, attempts: int) -> Path:
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ModelLoadFailed(f"model url must be http(s), got {redact_url(url)!r}")
    dest = root / cache_name(url)
    with file_lock(dest):
        if is_verified(dest, sha256):
            inspect_gguf(dest)
            return dest
        remove_quietly(dest)  # present but failing its checksum: fetch it again
        part = download(url, dest, sha256=sha256, progress=progress, attempts=attempts)
        try:
            inspect_gguf(part)
        except ModelLoadFailed as e:
            remove_quietly(part)
            raise ModelLoadFailed(
                f"downloaded {redact_url(url)} is not a usable GGUF: {e}") from e
        publish(part, dest)
        if sha256 is not None:
            mark_verified(dest, sha256)
    return dest


def _from_hub(spec: GGUFSpec, progress: bool) -> Path:
    if not spec.hf_file:
        raise ModelLoadFailed(f"hf_repo {spec.hf_repo!r} needs hf_file: the .gguf file in the repo")
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        raise ModelLoadFailed(
            f"hf_repo {spec.hf_repo!r} needs the huggingface_hub package, which is not "
            f"installed: {HUB_INSTALL_HINT}, or download the file and set path"
        ) from None
    if not progress:
        disable_progress_bars()
    where = f"{spec.hf_repo}/{spec.hf_file}"
    try:
        found = huggingface_hub.hf_hub_download(
            str(spec.hf_repo), spec.hf_file, cache_dir=cache_root(spec.cache_dir) / "huggingface"
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ModelLoadFailed(
            f"{where} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline: HF_HUB_OFFLINE set, or no network): {redact_urls(str(e))}"
        ) from e
    except Exception as e:  # the hub library's own error tree: not found, auth, HTTP
        # The hub's messages may quote the signed CDN URL a file redirects to.
        raise ModelLoadFailed(
            f"cannot fetch {where} from Hugging Face: {redact_urls(str(e))}") from e
    path = Path(str(found))
    inspect_gguf(path)
    if spec.sha256 is not None and not is_verified(path, spec.sha256):
        raise ModelLoadFailed(f"sha256 mismatch for {where} ({path})")
    return path
