"""Applying the schema types' own rules (msgspec ``Meta`` constraints) to a struct built in
Python: msgspec checks them only when decoding, and a client or worker wants the same refusal,
naming the same field, before anything is sent."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from tokenhive.schemas.errors import InvalidRequest

S = TypeVar("S", bound=msgspec.Struct)


def validated(obj: S, name: str = "") -> S:
    """``obj`` (built in Python, so unchecked) if it satisfies its type's constraints; else
    ``InvalidRequest`` naming the field, under ``name`` if given (``sampling.top_p``)."""
    try:
        msgspec.convert(msgspec.to_builtins(obj), type(obj))
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid {field_message(exc, name)}") from None
    return obj


def field_message(exc: msgspec.ValidationError, root: str) -> str:
    """msgspec's message with its path rooted at ``root``: "Expected `float` >= 0.0 - at
    `$.temperature`" -> "sampling.temperature: Expected `float` >= 0.0"."""
    text = str(exc)
    what, sep, where = text.rpartition(" - at `$")
    if not sep:
        return f"{root}: {text}" if root else text
    path = f"{root}{where.rstrip('`')}"
    return f"{path.removeprefix('.')}: {what}"
