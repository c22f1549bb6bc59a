#!/usr/bin/env bash
# A/B of two kvasir builds on the CPU in one call: batch-1 decode (`kvasir bench latency`)
# and the default offline throughput workload (`kvasir bench throughput`), alternating
# A, B, A, B so that drift of the machine hits both alike. Each run's one-line JSON
# summary is printed after a "== <build> <bench>" header.
#
#   [BENCHES="LAT THR"] bash benchmarks/ab_cpu.sh <git-rev-A> [<git-rev-B>=working tree] [rounds=2]
#
# Build A is checked out into a temporary worktree and run with the same venv
# (PYTHONPATH points at it); build B is this tree.
set -euo pipefail
cd "$(dirname "$0")/.."
REV_A=${1:?usage: ab_cpu.sh <git-rev-A> [rev-B] [rounds]}
REV_B=${2:-}
ROUNDS=${3:-2}
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d)
trap 'git worktree remove --force "$TMP/a" >/dev/null 2>&1 || true; git worktree remove --force "$TMP/b" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
git worktree add -f --detach "$TMP/a" "$REV_A" >/dev/null 2>&1
B_DIR=$PWD
if [ -n "$REV_B" ]; then git worktree add -f --detach "$TMP/b" "$REV_B" >/dev/null 2>&1; B_DIR=$TMP/b; fi
LAT=(bench latency --input-len 128 --output-len 128 --batch-size 1 --num-iters 3)
THR=(bench throughput --num-prompts 32 --input-len 16:256 --output-len 16:256
     --max-model-len 1024 --kv-cache-gb 1)
run() {  # build-dir label args...
  local dir=$1 label=$2; shift 2
  echo "== $label $1"
  (cd "$TMP" && PYTHONPATH="$dir" "$OLDPWD/$PY" -m kvasir.entrypoints.cli "$@" 2>/dev/null | tail -1)
}
for _ in $(seq "$ROUNDS"); do
  for args in ${BENCHES:-LAT THR}; do
    declare -n a=$args
    run "$TMP/a" "A=$REV_A" "${a[@]}"
    run "$B_DIR" "B=${REV_B:-worktree}" "${a[@]}"
  done
done
