"""Backends, one module each, imported lazily so a worker loads only what it uses."""

from __future__ import annotations

import importlib

from tokenhive.schemas.config import AnyWorkerSpec
from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.workers.backend import Backend

# spec tag -> "module:Class" under tokenhive.workers.backends
REGISTRY: dict[str, str] = {
    "echo": "echo:EchoBackend",
    "gguf": "gguf:GGUFBackend",
    "openai": "openai:OpenAIBackend",
    "anthropic": "anthropic:AnthropicBackend",
    "azure": "azure:AzureBackend",
    "binary": "binary:BinaryBackend",
}


def backend_kind(spec: AnyWorkerSpec) -> str:
    tag = type(spec).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


#: a backend's optional third-party module -> the extra that installs it
EXTRAS: dict[str, str] = {"llama_cpp": "gguf"}


def make_backend(spec: AnyWorkerSpec) -> Backend:
    """Build (not start) the backend a spec names."""
    module_name, class_name = REGISTRY[backend_kind(spec)].split(":")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        raise ModelLoadFailed(
            f"the {backend_kind(spec)} backend needs {exc.name}, which is not installed: "
            f"install tokenhive[{extra}] (`make install` builds it for this CPU)"
        ) from None
    cls = getattr(module, class_name)
    backend: Backend = cls(spec)
    return backend
