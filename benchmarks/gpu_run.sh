#!/usr/bin/env bash
# One device call: install the carried wheels, run GPU tests and the benchmarks.
# Usage (device tool): bash benchmarks/gpu_run.sh [quick|full]
set -uo pipefail
MODE=${1:-quick}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
K=(python3 -m kvasir.entrypoints.cli)
if [ "$MODE" = quick ]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/tests.log"
  timeout 150 "${K[@]}" bench latency --load-format dummy --model llama-3-8b --max-model-len 8192 \
    --max-num-batched-tokens 8192 --prefill-len 8192 --num-iters 2 --output-json "$OUT/latency.json" 2>&1 | tail -25
  timeout 150 "${K[@]}" bench throughput --load-format dummy --model llama-3-8b --max-model-len 4096 \
    --max-num-batched-tokens 8192 --num-prompts 256 --output-json "$OUT/throughput.json" 2>&1 | tail -15
  timeout 80 python3 benchmarks/gpu_busy.py 2>&1 | tail -3 | tee "$OUT/busy.json"
else
  timeout 240 "${K[@]}" bench latency --load-format dummy --model llama-3-8b --max-model-len 8192 \
    --max-num-batched-tokens 8192 --prefill-len 8192 --num-iters 3 --compare hf --output-json "$OUT/latency.json" 2>&1 | tail -30
  timeout 330 "${K[@]}" bench throughput --load-format dummy --model llama-3-8b --max-model-len 4096 \
    --max-num-batched-tokens 8192 --num-prompts "${NUM_PROMPTS:-256}" --compare hf --output-json "$OUT/throughput.json" 2>&1 | tail -15
fi
