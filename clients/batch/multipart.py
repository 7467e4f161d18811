"""``multipart/form-data`` bodies (RFC 7578), as the OpenAI clients upload files.

The body is already in memory and capped by the server's body limit; parts are cut out with
``bytes.find`` on the boundary, so a large file costs one pass in C, not a line-by-line parse.
"""

from __future__ import annotations

import re
from email.message import Message

import msgspec

from tokenhive.schemas.errors import InvalidRequest

MAX_PARTS = 16  # a file upload has two or three; more is not an upload


class FormPart(msgspec.Struct, frozen=True):
    name: str
    filename: str | None
    data: bytes


def boundary_of(content_type: str) -> str:
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) \
            or not 0 < len(boundary) <= 200:
        raise InvalidRequest("the body must be multipart/form-data with a boundary")
    return boundary


def parse_form(content_type: str, body: bytes) -> dict[str, FormPart]:
    """The form's parts by field name (the first of a repeated name wins)."""
    delimiter = b"--" + boundary_of(content_type).encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise InvalidRequest("multipart body without its boundary")
    parts: dict[str, FormPart] = {}
    position = start + len(delimiter)
    for _ in range(MAX_PARTS + 1):
        if body.startswith(b"--", position):
            return parts  # the closing delimiter
        if not body.startswith(b"\r\n", position):
            raise InvalidRequest("malformed multipart body")
        end = body.find(b"\r\n" + delimiter, position)
        if end < 0:
            raise InvalidRequest("multipart body cut short (no closing boundary)")
        part = _part(body[position + 2:end])
        parts.setdefault(part.name, part)
        position = end + 2 + len(delimiter)
    raise InvalidRequest(f"more than {MAX_PARTS} parts in a multipart body")


_NAME = re.compile(r'(?:^|;)\s*(name|filename)="((?:[^"\\]|\\.)*)"', re.IGNORECASE)


def _part(raw: bytes) -> FormPart:
    head, sep, data = raw.partition(b"\r\n\r\n")
    if not sep:
        raise InvalidRequest("malformed multipart part (no blank line after its headers)")
    params: dict[str, str] = {}
    for line in head.decode("utf-8", errors="replace").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            for match in _NAME.finditer(value):
                params[match.group(1).lower()] = match.group(2).replace('\\"', '"')
    if "name" not in params:
        raise InvalidRequest("multipart part without a name")
    return FormPart(name=params["name"], filename=params.get("filename"), data=data)
