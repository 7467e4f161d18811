"""llama.cpp's own log lines, through our logging instead of straight to stderr.

llama.cpp reports model loading, KV-cache layout and tokenizer oddities through one log
callback. llama-cpp-python installs one that prints to stderr, filtered by a level table
from an older ggml numbering (WARN counted as ERROR), so lines such as ``llama_kv_cache_iswa:
using full-size SWA cache`` reached the user's terminal on every run. ``install`` replaces it:
each line becomes a record of the ``tokenhive.llama_cpp`` logger, at debug level (shown with
``--log-level debug``), except llama.cpp's errors, which are warnings.
"""

from __future__ import annotations

import ctypes
import logging

import llama_cpp

log = logging.getLogger("tokenhive.llama_cpp")

# enum ggml_log_level, as ggml.h numbers it in the llama.cpp that llama-cpp-python 0.3.36 ships
GGML_LOG_LEVEL_DEBUG = 1
GGML_LOG_LEVEL_INFO = 2
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5  # more text for the line before
NAMES = {GGML_LOG_LEVEL_DEBUG: "debug", GGML_LOG_LEVEL_INFO: "info",
         GGML_LOG_LEVEL_WARN: "warn", GGML_LOG_LEVEL_ERROR: "error"}

_callback: object | None = None  # llama.cpp keeps a raw pointer to it: it must never be freed
_verbose = False
_line: list[str] = []  # the pieces of the line being written (a line can come in several)
_line_level = GGML_LOG_LEVEL_DEBUG


def install(verbose: bool = False) -> None:
    """Route llama.cpp's log through ``tokenhive.llama_cpp`` from now on, in this process.
    ``verbose``: its lines are info records instead of debug ones. Call before loading."""
    global _callback, _verbose
    _verbose = verbose
    if _callback is None:
        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def _on_log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    global _line_level
    try:
        if level != GGML_LOG_LEVEL_CONT:
            _line_level = level
        _line.append(text.decode("utf-8", errors="replace") if text else "")
        if not _line[-1].endswith("\n"):
            return
        line = "".join(_line).rstrip("\n")
        _line.clear()
        if _line_level == GGML_LOG_LEVEL_ERROR:
            ours = logging.WARNING
        else:
            ours = logging.INFO if _verbose else logging.DEBUG
        if line and log.isEnabledFor(ours):
            log.log(ours, "%s", line, extra={"llama_level": NAMES.get(_line_level, "?")})
    except Exception:  # an exception must never unwind into llama.cpp's C code
        _line.clear()
