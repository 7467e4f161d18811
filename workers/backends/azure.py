"""Azure OpenAI: the OpenAI adapter with Azure's routes.

A deployment, not a model field, picks the model: requests go to
``{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...`` with the key
in an ``api-key`` header. Body, stream and errors are OpenAI's (Azure's 429s carry
``retry-after-ms``, which the shared translator reads). Azure's first stream chunk holds
only ``prompt_filter_results`` and an empty ``choices``; the OpenAI reader passes over it.
"""

from __future__ import annotations

from urllib.parse import quote

from tokenhive.schemas.config import AzureSpec
from tokenhive.schemas.messages import Kind
from tokenhive.workers.backends.openai import OpenAIBackend, Routes


def azure_routes(spec: AzureSpec) -> Routes:
    deployment = quote(spec.deployment, safe="")
    return Routes(
        base_url=f"{spec.endpoint.rstrip('/')}/openai/deployments/{deployment}",
        paths={Kind.CHAT: "/chat/completions", Kind.COMPLETION: "/completions",
               Kind.EMBEDDING: "/embeddings"},
        params={"api-version": spec.api_version},
        model=None,
        auth_header="api-key",
        auth_prefix="",
        kinds=[Kind(k) for k in spec.kinds],
        include_usage=spec.include_usage,
        sampling_extras="none",
        max_tokens_field=spec.max_tokens_field,
    )


class AzureBackend(OpenAIBackend):
    backend_name = "azure"
    key_required = True

    def __init__(self, spec: AzureSpec) -> None:
        self._setup(spec, azure_routes(spec))
