"""Can this machine run the llama.cpp this environment was built with? Checked before loading.

``make install`` builds llama.cpp for the host that runs it (``scripts/llama_build.py``) and
records, next to the virtual environment, the CPU features that build needs. A venv copied to
another machine, or a shared home directory on a mixed cluster, can put that build on a CPU
without them; llama.cpp would then die with SIGILL at its first matrix multiply, and all a user
would see is a worker restarting. We compare the record with /proc/cpuinfo first and say so in
words instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenhive.schemas.errors import ModelLoadFailed

RECORD_NAME = "tokenhive-llama-build.json"  # written by scripts/llama_build.py
HINT = "see README, Troubleshooting"


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The host's CPU feature flags, or None where /proc/cpuinfo does not say (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def missing_features(
    record: Path | None = None, cpuinfo: Path = Path("/proc/cpuinfo")
) -> list[str]:
    """Features the recorded build needs that this CPU lacks ([] when unknown or all present)."""
    path = record or Path(sys.prefix) / RECORD_NAME
    try:
        required = json.loads(path.read_text()).get("requires", [])
    except (OSError, ValueError, AttributeError):
        return []  # llama.cpp installed some other way: nothing recorded to compare
    have = host_cpu_flags(cpuinfo)
    if have is None:
        return []
    return sorted(f for f in required if f not in have)


def check_cpu(record: Path | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> None:
    """ModelLoadFailed, in plain words, when llama.cpp was built for a CPU this one is not."""
    missing = missing_features(record, cpuinfo)
    if missing:
        raise ModelLoadFailed(
            "llama.cpp in this environment was built for CPU features this machine does not "
            f"have ({', '.join(missing)}); rebuild it here with `make clean install` ({HINT})"
        )
