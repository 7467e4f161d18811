"""Our portable llama.cpp build (scripts/llama_build.py) against a native (-march=native) one.

    CMAKE_ARGS=-DGGML_NATIVE=ON .venv/bin/pip wheel --no-deps --no-cache-dir -w /tmp/native \\
        llama-cpp-python==<the pinned version>
    .venv/bin/pip install --no-deps --target /tmp/native/site /tmp/native/*.whl
    .venv/bin/python -m bench.cpu_build --native-site /tmp/native/site

Each round runs both builds in fresh processes, alternating, on the embedded Gemma 3 270M:
prefill (a ~480-token prompt, 1 token out) and greedy decode (128 tokens). Prints medians of
tok/s and the portable/native ratios. A native build that dies (SIGILL on AMX-advertising VMs)
is reported as such: that is the case the portable build exists for.

Measured 2026-12-01 on the 2-core development VM (Intel Xeon, Sapphire Rapids class, amx_tile
advertised): the native build is killed by SIGSEGV while loading the model; the portable one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from typing import Any

CHILD = r"""
import json, sys, time
import llama_cpp
from tokenhive.workers.models.default import default_model_path
llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=1024, n_batch=512,
                      n_threads=int(sys.argv[1]), verbose=False)
prompt = "The history of the lighthouse keeper's cat, told in many small chapters. " * 40
n_prompt = len(llm.tokenize(prompt.encode()))
llm.create_completion("warm up", max_tokens=4, temperature=0)
llm.reset()
t0 = time.perf_counter(); llm.create_completion(prompt, max_tokens=1, temperature=0)
prefill = n_prompt / (time.perf_counter() - t0)
llm.reset()
t0 = time.perf_counter()
out = llm.create_completion("Once upon a time", max_tokens=128, temperature=0)
decode = out["usage"]["completion_tokens"] / (time.perf_counter() - t0)
print(json.dumps({"prefill": prefill, "decode": decode, "text": out["choices"][0]["text"][:60]}))
"""


def run_one(site: str | None, threads: int) -> dict[str, Any] | str:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode < 0:
        return f"killed by {signal.Signals(-proc.returncode).name}"
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native-site", required=True, help="a --target install of a native build")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"portable": [], "native": []}
    for r in range(args.rounds):
        for name, site in (("portable", None), ("native", args.native_site))[:: 1 if r % 2 else -1]:
            got = run_one(site, args.threads)
            if isinstance(got, str):
                print(f"{name}: {got}")
                if name == "native":
                    print("the native build cannot run on this host; the portable one does")
                    return 0
                return 1
            runs[name].append(got)
            print(f"round {r + 1} {name}: prefill {got['prefill']:.1f} tok/s, "
                  f"decode {got['decode']:.1f} tok/s", flush=True)
    for metric in ("prefill", "decode"):
        p = statistics.median(x[metric] for x in runs["portable"])
        n = statistics.median(x[metric] for x in runs["native"])
        print(f"{metric}: portable {p:.1f} tok/s, native {n:.1f} tok/s, "
              f"portable/native {p / n:.2f}")
    texts = [str(runs[name][0]["text"]) for name in ("portable", "native")]
    print("same text:", texts[0] == texts[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
