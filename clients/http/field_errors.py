"""A msgspec ValidationError as a BadField: OpenAI's ``param`` is the path of the field."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from tokenhive.clients.http.errors import BadField

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]*)`")


def bad_field_of(exc: msgspec.ValidationError) -> BadField:
    """msgspec's "Expected `int`, got `str` - at `$.messages[0].content`" as a BadField with
    ``param="messages[0].content"``; an unknown or missing field is named itself."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    what, path = match["what"], (match["path"] or "").removeprefix(".")
    code = "invalid_type" if ", got `" in what else "invalid_value"
    for pattern, field_code in ((_UNKNOWN, "unknown_parameter"),
                                (_MISSING, "missing_required_parameter")):
        if (named := pattern.match(what)) is not None:
            path = f"{path}.{named['field']}" if path else named["field"]
            code = field_code
    where = f"{path}: " if path else ""
    return BadField(path or None, f"{where}{what}", code=code)


def convert_field(value: object, into: Any, where: str) -> Any:
    """``value`` from decoded JSON as ``into``; a BadField under ``where`` if it is not."""
    try:
        return msgspec.convert(value, into)
    except msgspec.ValidationError as exc:
        bad = bad_field_of(exc)
        path = f"{where}{bad.param}" if (bad.param or "").startswith("[") else \
            f"{where}.{bad.param}" if bad.param else where
        raise BadField(path, f"{where}: {exc}", code=bad.http_code) from None


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
