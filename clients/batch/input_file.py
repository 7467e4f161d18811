"""An uploaded batch input file, checked as a whole before any line runs (OpenAI's
``validating`` step): UTF-8 JSONL, one request object per line, each with a unique
``custom_id``, ``method`` POST and the batch's ``url``. A file with any such problem fails the
batch with the list of problems (and their line numbers); nothing of it runs.

What is wrong *inside* a line's body (an unsupported field, a bad temperature) is the line's
own failure: it is found when the line runs and recorded as its error line, as OpenAI does.
"""

from __future__ import annotations

import json

import msgspec

from tokenhive.clients.batch.objects import BatchError, BatchErrors
from tokenhive.clients.batch.openai_format import URL_KIND

MAX_REPORTED = 100  # problems listed in BatchErrors; the rest are summarised


class InputLine(msgspec.Struct, frozen=True):
    idx: int  # 1-based line number in the file
    custom_id: str
    text: str  # the line as uploaded (decoded again when it runs)


def split_input(content: bytes, endpoint: str, *, max_lines: int
                ) -> tuple[list[InputLine], BatchErrors | None]:
    """The file's request lines, or the errors that fail its batch."""
    errors: list[BatchError] = []
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], _errors([BatchError(code="invalid_encoding",
                                       message=f"the file is not UTF-8: {exc}")])
    lines: list[InputLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        problem = _problem(raw, endpoint, seen)
        if problem is not None:
            code, message, param = problem
            errors.append(BatchError(code=code, message=message, param=param, line=number))
            continue
        cid = json.loads(raw)["custom_id"]
        seen.add(cid)
        lines.append(InputLine(idx=number, custom_id=cid, text=raw))
    if not lines and not errors:
        errors.append(BatchError(code="empty_file", message="the input file has no requests"))
    if len(lines) + len(errors) > max_lines:
        errors.insert(0, BatchError(
            code="too_many_requests",
            message=f"the input file has more than {max_lines} requests"))
    return lines, _errors(errors) if errors else None


def _problem(raw: str, endpoint: str, seen: set[str]) -> tuple[str, str, str | None] | None:
    try:
        line = json.loads(raw)
    except ValueError as exc:
        return "invalid_json_line", f"not valid JSON: {exc}", None
    if not isinstance(line, dict):
        return "invalid_request", "a request line must be a JSON object", None
    cid = line.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return "missing_required_parameter", "custom_id must be a non-empty string", "custom_id"
    if cid in seen:
        return "duplicate_custom_id", f"custom_id {cid!r} is used more than once", "custom_id"
    if line.get("method") != "POST":
        return "invalid_method", f"method must be POST, got {line.get('method')!r}", "method"
    if line.get("url") != endpoint:
        return ("mismatched_endpoint",
                f"url {line.get('url')!r} is not the batch's endpoint {endpoint!r}", "url")
    if not isinstance(line.get("body"), dict):
        return "invalid_request", "body must be a JSON object", "body"
    return None


def _errors(found: list[BatchError]) -> BatchErrors:
    shown = found[:MAX_REPORTED]
    if len(found) > MAX_REPORTED:
        shown.append(BatchError(code="too_many_errors",
                                message=f"{len(found) - MAX_REPORTED} more problems not listed"))
    return BatchErrors(data=shown)


def check_endpoint(endpoint: str) -> bool:
    return endpoint in URL_KIND
