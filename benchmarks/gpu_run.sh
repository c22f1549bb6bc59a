#!/usr/bin/env bash
# One device call: install the carried wheels, then GPU tests and/or benchmarks.
# Usage (through the device tool, with carry [".whl"]):
#   bash benchmarks/gpu_run.sh quick   # GPU tests + engine benches without HF (~4 min)
#   bash benchmarks/gpu_run.sh tests   # GPU tests incl. the kernels at full size
#   bash benchmarks/gpu_run.sh bench   # latency + throughput with --compare hf, GPU busy
#   bash benchmarks/gpu_run.sh profile # batch-1 decode: kernel time per step, fused rotary on/off
#   bash benchmarks/gpu_run.sh decode  # decode-attention/sampler tests, kernel bench, batch-1 profile + latency
#   bash benchmarks/gpu_run.sh closing # latency + throughput --compare hf (256 prompts, ~7 min)
#   bash benchmarks/gpu_run.sh verify  # every GPU test, then latency + throughput (no HF)
#   bash benchmarks/gpu_run.sh mixed   # GPU tests for mixed-step graphs, then graphs on/off benches
#   bash benchmarks/gpu_run.sh pdl     # PDL chain test + kernel tests, then PDL on/off: profile, latency; GEMV sweep
#   bash benchmarks/gpu_run.sh models  # SSM/MoE GPU tests + kernels, then bench_ssm_context.py on the CPU
#   bash benchmarks/gpu_run.sh serve   # kvasir serve (Llama-3-8B shape) + bench serve at 3 rates
#   bash benchmarks/gpu_run.sh w8tune  # 8-bit GEMV tests, batch-1 decode bf16/fp8/int8, kvasir tune, decode again tuned
#   bash benchmarks/gpu_run.sh w8tune2 # kvasir tune of the FP8 GEMV shapes, profile + latency of FP8 decode tuned/default
#   bash benchmarks/gpu_run.sh tune3   # the table's missing shapes, decode bf16/fp8/int8 on it, Mamba-1/2 decode
#   bash benchmarks/gpu_run.sh last2   # SSM engines under CUDA graphs + Mamba decode; W4A16, GGUF, LoRA kernels compiled
# The wheels: see /work/.library/device/README.md (msgspec, gguf, pyzmq, fastapi, ...).
set -uo pipefail
MODE=${1:-quick}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
K=(python3 -m kvasir.entrypoints.cli)
M8=(--load-format dummy --model llama-3-8b)
case "$MODE" in
w8tune)  # issue 23 runs 3 and 10: the 8-bit batch-1 GEMV and the kernel autotuner
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py tests/kernels/test_tuning.py \
    tests/quantization/test_quant_gpu.py 2>&1 | grep -E "Error|assert|FAILED|passed|failed" | head -20 | tee "$OUT/tests.log"
  L=(bench latency "${M8[@]}" --max-model-len 4096 --input-len 128 --output-len 128 --num-iters 2)
  for q in bf16 fp8 int8; do
    Q=(); [ $q != bf16 ] && Q=(-q $q)
    KVASIR_KERNEL_CONFIGS=none timeout 100 "${K[@]}" "${L[@]}" "${Q[@]}" --output-json "$OUT/lat_$q.json" \
      2>&1 | tail -3
  done
  timeout 240 "${K[@]}" tune --model llama-3-8b --kernels gemv --out "$OUT/NVIDIA_H200.json" 2>&1 | tail -12
  for q in bf16 fp8; do
    Q=(); [ $q != bf16 ] && Q=(-q $q)
    KVASIR_KERNEL_CONFIGS="$OUT/NVIDIA_H200.json" timeout 100 "${K[@]}" "${L[@]}" "${Q[@]}" \
      --output-json "$OUT/lat_tuned_$q.json" 2>&1 | tail -3
  done
  ;;
w8tune2)  # the 8-bit GEMV shapes: tune (table grows from the shipped one), profile, latency
  T="$OUT/NVIDIA_H200.json"; cp kvasir/kernels/configs/NVIDIA_H200.json "$T"
  timeout 230 "${K[@]}" tune --model llama-3-8b --kernels gemv --weight-bytes 1 --out "$T" 2>&1 | tail -6
  KVASIR_KERNEL_CONFIGS="$T" timeout 90 python3 benchmarks/profile_decode.py -q fp8 --top 12 2>&1 | tail -15
  L=(bench latency "${M8[@]}" --max-model-len 4096 --input-len 128 --output-len 128 --num-iters 2)
  for t in none "$T"; do
    for q in fp8 int8; do
      KVASIR_KERNEL_CONFIGS="$t" timeout 80 "${K[@]}" "${L[@]}" -q $q 2>&1 | tail -1 | tee -a "$OUT/lat.jsonl"
    done
  done
  KVASIR_KERNEL_CONFIGS="$T" timeout 80 "${K[@]}" "${L[@]}" 2>&1 | tail -1 | tee -a "$OUT/lat.jsonl"
  ;;
tune3)  # the rest of the table, decode on it, and the state-space models' decode (issue 23 run 6)
  T="$OUT/NVIDIA_H200.json"; cp kvasir/kernels/configs/NVIDIA_H200.json "$T"
  timeout 150 "${K[@]}" tune --model llama-3-8b --kernels gemv --only-missing --out "$T" 2>&1 | tail -4
  L=(bench latency --load-format dummy --max-model-len 4096 --input-len 128 --output-len 128 --num-iters 2)
  for q in bf16 fp8 int8; do
    Q=(); [ $q != bf16 ] && Q=(-q $q)
    KVASIR_KERNEL_CONFIGS="$T" timeout 80 "${K[@]}" "${L[@]}" --model llama-3-8b "${Q[@]}" 2>&1 | tail -1 | tee -a "$OUT/lat.jsonl"
  done
  for m in mamba-2.8b mamba2-2.7b; do
    timeout 100 "${K[@]}" "${L[@]}" --model $m 2>&1 | tail -1 | tee -a "$OUT/lat.jsonl"
  done
  ;;
last2)  # short: SSM decode graphs (tests + Mamba-1/2 decode), the new kernels at full size
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_ssm_moe.py tests/kernels/test_mamba_kernels.py \
    tests/kernels/test_wna16.py tests/kernels/test_gguf_kernels.py tests/kernels/test_lora_kernels.py 2>&1 \
    | grep -E "Error|assert|FAILED|passed|failed" | head -20 | tee "$OUT/tests.log"
  L=(bench latency --load-format dummy --max-model-len 4096 --input-len 128 --output-len 128 --num-iters 2)
  for m in mamba-2.8b mamba2-2.7b; do
    timeout 60 "${K[@]}" "${L[@]}" --model $m 2>&1 | tail -1 | tee -a "$OUT/lat.jsonl"
  done
  ;;
models)  # SSM + MoE: kernels and engines on the GPU, then the CPU decode-vs-context bench
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_ssm_moe.py \
    tests/kernels/test_fused_moe.py tests/kernels/test_mamba_kernels.py 2>&1 | tail -25 | tee "$OUT/tests.log"
  lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/cpu.txt"
  timeout 260 python3 benchmarks/bench_ssm_context.py --contexts 1024 4096 16384 --device cpu \
    --out "$OUT" 2>&1 | grep -v Warn | tail -8
  ;;
quick)
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/tests.log"
  timeout 150 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 --max-num-batched-tokens 8192 \
    --prefill-len 8192 --num-iters 2 --output-json "$OUT/latency.json" 2>&1 | tail -25
  timeout 150 "${K[@]}" bench throughput "${M8[@]}" --max-model-len 4096 --max-num-batched-tokens 8192 \
    --num-prompts 256 --output-json "$OUT/throughput.json" 2>&1 | tail -12
  timeout 80 python3 benchmarks/gpu_busy.py 2>&1 | tail -3 | tee "$OUT/busy.json"
  ;;
tests)
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/kernels tests/test_models.py \
    2>&1 | tail -30 | tee "$OUT/tests.log"
  ;;
bench)
  timeout 200 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 --max-num-batched-tokens 8192 \
    --prefill-len 8192 --num-iters 3 --compare hf --output-json "$OUT/latency.json" 2>&1 | tail -26
  timeout 90 "${K[@]}" bench throughput "${M8[@]}" --max-model-len 4096 --max-num-batched-tokens 8192 \
    --num-prompts 256 --output-json "$OUT/throughput256.json" 2>&1 | tail -10
  timeout 200 "${K[@]}" bench throughput "${M8[@]}" --max-model-len 4096 --max-num-batched-tokens 8192 \
    --num-prompts "${HF_PROMPTS:-64}" --compare hf --output-json "$OUT/throughput_hf.json" 2>&1 | tail -10
  timeout 80 python3 benchmarks/gpu_busy.py 2>&1 | tail -1 | tee "$OUT/busy.json"
  ;;
serve)
  "${K[@]}" serve "${M8[@]}" --max-model-len 4096 --port 8011 --disable-uvicorn-access-log \
    > "$OUT/server.log" 2>&1 &
  SP=$!
  for _ in $(seq 1 120); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
  for rate in 4 16 inf; do
    timeout 70 "${K[@]}" bench serve --base-url http://localhost:8011 --random-token-ids \
      --num-prompts 100 --request-rate "$rate" --input-len 512 --output-len 128 --ignore-eos \
      --goodput ttft:1000 tpot:50 --result-file "$OUT/serve_$rate.json" 2>&1 | tail -4
  done
  kill -TERM $SP; wait $SP; echo "server exit $?"
  ;;
final)
  timeout 130 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -6 | tee "$OUT/tests.log"
  timeout 210 "${K[@]}" bench throughput "${M8[@]}" --max-model-len 4096 --max-num-batched-tokens 8192 \
    --num-prompts "${HF_PROMPTS:-64}" --compare hf --output-json "$OUT/throughput_hf.json" 2>&1 | tail -10
  bash "$0" serve
  ;;
profile)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_backend.py tests/kernels/test_kv_cache.py tests/kernels/test_gemv.py tests/test_bench_hf_batch.py 2>&1 | grep -E "Error|FAILED|passed|failed" | head -20
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k fused_gemv 2>&1 | grep -E "Error|assert|FAILED|passed|failed" | head -20
  timeout 240 python3 benchmarks/bench_gemv.py ${GEMV_SWEEP:-} 2>&1 | tee "$OUT/gemv.log" | tail -40
  for a in "" "--no-fused-gemv"; do
    timeout 150 python3 benchmarks/profile_decode.py $a 2>&1 | tail -22 | tee -a "$OUT/profile.log"
  done
  timeout 200 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 --max-num-batched-tokens 8192 \
    --num-iters 3 --output-json "$OUT/latency.json" 2>&1 | tail -22
  ;;
decode)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py tests/kernels/test_triton_backend.py tests/test_sampler.py 2>&1 | grep -E "Error|FAILED|passed|failed" | head -20
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "fused_gemv or graphs_match" 2>&1 | grep -E "Error|assert|FAILED|passed|failed" | head -20
  timeout 150 python3 benchmarks/bench_kernels.py --out "$OUT/kernels.json" 2>&1 | grep -E "^\| " | head -20
  timeout 150 python3 benchmarks/profile_decode.py 2>&1 | tail -16 | tee -a "$OUT/profile.log"
  timeout 200 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 --max-num-batched-tokens 8192 \
    --num-iters 3 --output-json "$OUT/latency.json" 2>&1 | tail -3
  ;;
closing)
  timeout 100 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 --max-num-batched-tokens 8192 \
    --num-iters 3 --output-json "$OUT/latency.json" 2>&1 | tail -3
  timeout 420 "${K[@]}" bench throughput "${M8[@]}" --max-model-len 4096 --max-num-batched-tokens 8192 \
    --num-prompts 256 --compare hf --output-json "$OUT/throughput_hf.json" 2>&1 | tail -12
  ;;
verify)
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/kernels tests/test_sampler.py \
    tests/test_torch_attention.py tests/test_bench_hf_batch.py 2>&1 | grep -E "Error|assert|FAILED|passed|failed" | head -30 | tee "$OUT/tests.log"
  timeout 100 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 --max-num-batched-tokens 8192 \
    --num-iters 3 --output-json "$OUT/latency.json" 2>&1 | tail -1
  timeout 120 "${K[@]}" bench throughput "${M8[@]}" --max-model-len 4096 --max-num-batched-tokens 8192 \
    --num-prompts 256 --output-json "$OUT/throughput.json" 2>&1 | tail -1
  ;;
mixed)
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/kernels/test_prefill_attention.py \
    tests/kernels/test_triton_backend.py tests/kernels/test_mixed_graph_layout.py 2>&1 \
    | grep -E "Error|assert|FAILED|passed|failed" | head -30 | tee "$OUT/tests.log"
  timeout 90 python3 benchmarks/bench_kernels.py --out "$OUT/kernels.json" 2>&1 | tail -14
  # Small step budget, steady arrivals: most steps are mixed ones of <= 256 tokens.
  Q=(--load-format dummy --model qwen3-0.6b --max-model-len 2048 --max-num-batched-tokens 256
     --max-num-seqs 64 --num-prompts 128 --output-len 100:300)
  for m in 0 512; do
    timeout 90 "${K[@]}" bench throughput "${Q[@]}" --cuda-graph-mixed-tokens $m \
      --output-json "$OUT/qwen_mixed$m.json" 2>&1 | grep -E "captured|^\{" | tail -2
  done
  for m in 0 512; do
    timeout 100 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 --max-num-batched-tokens 8192 \
      --num-iters 3 --cuda-graph-mixed-tokens $m --output-json "$OUT/latency_mixed$m.json" 2>&1 | tail -1
  done
  timeout 120 "${K[@]}" bench throughput "${M8[@]}" --max-model-len 4096 --max-num-batched-tokens 8192 \
    --num-prompts 256 --output-json "$OUT/throughput.json" 2>&1 | tail -1
  ;;
pdl)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_pdl.py tests/kernels/test_gemv.py \
    tests/kernels/test_decode_attention.py tests/kernels/test_kv_cache.py tests/kernels/test_norm_activation.py \
    2>&1 | grep -E "Error|assert|FAILED|passed|failed" | head -20 | tee "$OUT/tests.log"
  for a in "" "--no-pdl"; do
    timeout 100 python3 benchmarks/profile_decode.py $a 2>&1 | tee -a "$OUT/profile.log" | tail -1
  done
  for p in 1 0 1; do
    KVASIR_PDL=$p timeout 100 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 \
      --max-num-batched-tokens 8192 --num-iters 3 --output-json "$OUT/latency_pdl$p.json" 2>&1 | tail -1
  done
  [ -n "${GEMV_SWEEP:-}" ] && timeout 200 python3 benchmarks/bench_gemv.py --sweep 2>&1 | tee "$OUT/gemv.log" | tail -60
  ;;
pdl2)
  timeout 260 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_pdl.py tests/kernels/test_gemv.py \
    tests/test_gpu.py 2>&1 | grep -E "Error|assert|FAILED|passed|failed" | head -20 | tee "$OUT/tests.log"
  for p in 1 0 1; do
    KVASIR_PDL=$p timeout 90 "${K[@]}" bench latency "${M8[@]}" --max-model-len 8192 \
      --max-num-batched-tokens 8192 --num-iters 3 --output-json "$OUT/latency_pdl$p.json" 2>&1 | tail -1
  done
  timeout 100 python3 benchmarks/bench_gemv.py 2>&1 | tee "$OUT/gemv.log" | grep -vE "^\{" | tail -40
  timeout 100 "${K[@]}" bench throughput "${M8[@]}" --max-model-len 4096 --max-num-batched-tokens 8192 \
    --num-prompts 256 --output-json "$OUT/throughput.json" 2>&1 | tail -1
  ;;
last)
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k llama3_8b 2>&1 | grep -E "Error|assert|diverged|agreed|passed|failed" | head -20
  bash "$0" serve
  ;;
esac
