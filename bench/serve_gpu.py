"""``bench.serve --gpu``: which GPUs there are, and whether this llama.cpp can use them.

One gguf worker per visible GPU (``CUDA_VISIBLE_DEVICES`` pinned per replica through the
spec's ``gpus``), every layer offloaded (``n_gpu_layers=-1``). Without a GPU, or with a
CPU-only llama-cpp-python, ``gpu_setup`` raises GPUError with what is missing, and the bench
stops with that message instead of quietly measuring the CPU.
"""

from __future__ import annotations

import os
import subprocess


class GPUError(RuntimeError):
    """No usable GPU for --gpu."""


def visible_gpus() -> list[int]:
    """Device ids a worker may be pinned to: ``CUDA_VISIBLE_DEVICES`` when set, else every
    GPU ``nvidia-smi -L`` lists."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    count = sum(1 for line in listed.splitlines() if line.startswith("GPU "))
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    ids = [x.strip() for x in env.split(",") if x.strip()]
    if not all(x.isdigit() for x in ids):
        raise GPUError(f"CUDA_VISIBLE_DEVICES={env!r}: give numeric ids for --gpu")
    return [int(x) for x in ids][:count]


def gpu_setup() -> tuple[int, int, list[int]]:
    """(n_gpu_layers, worker replicas, their GPU ids)."""
    gpus = visible_gpus()
    if not gpus:
        raise GPUError("no NVIDIA GPU visible (nvidia-smi -L lists none, or it is not "
                       "installed); run without --gpu to benchmark the CPU")
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        raise GPUError(f"{len(gpus)} GPU(s) visible, but this llama-cpp-python was built "
                       "without GPU offload: rebuild it with CUDA (CMAKE_ARGS=-DGGML_CUDA=on)")
    return -1, len(gpus), gpus


def llama_server_devices(binary: str) -> list[str]:
    """The GPU devices this llama-server build can offload to (``--list-devices``); empty
    for a CPU-only build, which must not stand in for a GPU baseline."""
    try:
        listed = subprocess.run([binary, "--list-devices"], capture_output=True, text=True,
                                timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    lines = (listed.stdout + listed.stderr).splitlines()
    if "Available devices:" not in [line.strip() for line in lines]:
        return []
    start = [line.strip() for line in lines].index("Available devices:") + 1
    return [line.strip() for line in lines[start:] if line.strip() and line.strip() != "(none)"]
