"""The Files and Batches API objects, in OpenAI's exact shapes (what the official clients parse).

A batch moves ``validating -> in_progress -> completed``; a cancel moves it through
``cancelling`` to ``cancelled``; a file that fails validation makes it ``failed`` at once; one
still running when its 24 h window ends is ``expired``. (``finalizing`` happens inside one
transaction here: the output files are written and the batch ended together, so no one ever
sees it; its timestamp is set.)
"""

from __future__ import annotations

import msgspec

VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"

#: statuses a batch never leaves
TERMINAL = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})
#: statuses a cancel applies to
CANCELLABLE = frozenset({VALIDATING, IN_PROGRESS})

BATCH_PURPOSE = "batch"  # what clients upload
OUTPUT_PURPOSE = "batch_output"  # what finished batches produce
COMPLETION_WINDOW = "24h"  # the only window OpenAI offers
WINDOW_SECONDS = 24 * 3600


class FileObject(msgspec.Struct, kw_only=True):
    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(msgspec.Struct, kw_only=True):
    id: str
    object: str = "file"
    deleted: bool = True


class RequestCounts(msgspec.Struct, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(msgspec.Struct, kw_only=True):
    """One validation problem of the input file; ``line`` is 1-based."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[BatchError] = msgspec.field(default_factory=list)


class BatchObject(msgspec.Struct, kw_only=True):
    id: str
    object: str = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


class Page(msgspec.Struct, kw_only=True):
    """A list answer: newest first, ``after`` pages on from ``last_id``."""

    object: str = "list"
    data: list[FileObject] | list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def page_of(items: list[FileObject] | list[BatchObject], has_more: bool) -> Page:
    return Page(data=items, first_id=items[0].id if items else None,
                last_id=items[-1].id if items else None, has_more=has_more)
