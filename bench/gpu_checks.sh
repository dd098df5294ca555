#!/usr/bin/env bash
# The GPU checks a session runs when the `device` tool lends it a machine: one prepared command,
# sized to fit one call (600 s: its steps' limits add up to 555 s) with device time left to rerun
# it. Written 2026-12-06 without a GPU: its quick mode is tested on the CPU, the GPU run itself
# has not happened yet. From the repository root there:
#
#     bash bench/gpu_checks.sh            # writes what comes back under $OUT
#
# On a bare lent machine (torch with CUDA, safetensors, tokenizers, transformers, pytest,
# hypothesis, tqdm are there; nothing else is needed) it runs, each step under its own time limit:
#   1. env          the GPU, driver, torch, SMs
#   2. build        a random 1B-parameter Llama engine in bfloat16 (build_scripts.demo_checkpoint
#                   "1b": the shape of Llama-3.2-1B-like models; random weights time the same)
#   3. cuda-tests   the CUDA variants of tests/engines (equivalence with transformers, KV tiers,
#                   peer copies), as run on an H100 on 2026-12-05
#   4. step-cost    bench.step_cost_profile on the GPU, varlen and padded paths: the fits go to
#                   the engine directory, where `adaptive` reads them in step 5
#   5. inprocess    bench.peer.inprocess, fcfs against adaptive, on each path (issue 16's real
#                   engine check on a GPU: ratios from the same run)
# Files in $OUT (at most 8 come back): log.txt, step_cost_profile.json, inprocess-varlen.json,
# inprocess-padded.json, pytest.xml. The log ends with one line per step: its exit status and
# seconds. A step that fails or runs out of time is reported and the next one runs.
#
# GPU_CHECKS_QUICK=1 runs the same steps in seconds on any device (DEVICE=cpu: the tiny demo
# model, a few requests), which is how tests/bench/test_gpu_checks.py keeps this script working.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
DEVICE=${DEVICE:-cuda:0}
PY=${PY:-python3}
QUICK=${GPU_CHECKS_QUICK:-0}
ENGINE=${GPU_CHECKS_ENGINE:-/tmp/gpu-checks-engine}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log its output and status
  local name=$1 limit=$2 start status
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit}s) $(date -u +%FT%TZ)" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  status=$?
  SUMMARY+=("$name: exit $status in $(( $(date +%s) - start )) s$([ "$status" = 124 ] && echo ' (time limit)')")
  echo "=== $name: exit $status" >>"$LOG"
}

if [ "$QUICK" = 1 ]; then
  BUILD=(--model demo --max-seq-len 2048 --kv-memory-gb 0.05 --dtype float32)
  PROFILE=(--max-batch 4 --max-seq-len 256 --reps 1)
  INPROC=(--requests 4 --output-len 8)
  TESTS=(-k "test_kv_tiers and cpu")
  PATHS=(varlen)
else
  BUILD=(--model demo --demo-size 1b --max-seq-len 2048 --kv-memory-gb 16 --host-kv-memory-gb 4 --dtype bfloat16)
  PROFILE=(--max-batch 32 --max-seq-len 2048 --reps 3)
  INPROC=(--requests 32 --repeats 2)
  TESTS=(-k cuda)
  PATHS=(varlen padded)
fi

step env 30 "$PY" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, p.multi_processor_count, 'SMs', round(p.total_memory / 2**30, 1), 'GiB')
else:
    print('no CUDA device; cores', torch.get_num_threads())
"
command -v nvidia-smi >/dev/null && step nvidia-smi 15 nvidia-smi
step build 120 "$PY" -m build_scripts.build_engine "${BUILD[@]}" --out "$ENGINE" --force
step cuda-tests 150 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$OUT/pytest.xml" tests/engines
step step-cost 120 "$PY" -m bench.step_cost_profile --engine-dir "$ENGINE" --device "$DEVICE" \
  --paths "${PATHS[@]}" "${PROFILE[@]}" --out "$OUT/step_cost_profile.json"
for path in "${PATHS[@]}"; do
  step "inprocess-$path" 60 "$PY" -m bench.peer.inprocess --engine-dir "$ENGINE" --device "$DEVICE" \
    --attention "$path" --policy fcfs adaptive "${INPROC[@]}" --out "$OUT/inprocess-$path.json"
done

{
  echo "=== summary"
  printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
