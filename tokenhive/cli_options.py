"""Command-line option parsing shared by `tokenhive up` and `python -m tokenhive.workers`.

It lives outside ``tokenhive.schemas`` because that package is pure data; this parses argv text.
"""

from __future__ import annotations

import json
import tomllib

from tokenhive.schemas.config import ConfigError


def parse_option_value(raw: str) -> object:
    """``5`` -> 5, ``0.5`` -> 0.5, ``true`` -> True, ``[0, 1]`` -> [0, 1], ``null`` -> None,
    ``"x"`` -> "x"; anything else is the string itself (``hello world``)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_option(item: str) -> tuple[str, object]:
    """``--option KEY=VALUE`` -> (key, typed value); ConfigError if it is not KEY=VALUE."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
    return key, parse_option_value(raw)


def parse_spec_json(text: str) -> dict[str, object]:
    """``--spec-json``: a whole worker spec as a JSON object (what `tokenhive up` passes)."""
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--spec-json is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError("--spec-json must be a JSON object")
    return spec
