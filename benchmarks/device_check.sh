#!/usr/bin/env bash
# The one prepared call for a lent GPU machine: what decides the next steps, most valuable first, in one run
# that ends within 8.5 minutes on a fresh H100/H200 (python 3.12, torch, triton, timm, transformers, pandas; no
# DALI, no internet, 16 cores).
#
#   bash benchmarks/device_check.sh             on the GPU machine (device tool: timeout_s 560); results in $OUT
#   bash benchmarks/device_check.sh --dry-run   every stage on the CPU at tiny shapes through the same code (CI)
#
# Stages (each independent: a failed or timed-out stage does not stop the next; each gets at most its cap and
# what is left of the budget; its log and rows are written the moment it ends):
#   0 env        GPU, driver, versions, nvcc                  5 e2e        python -m medst_fast.pretrain, ~30 steps
#   1 warmup     Triton compiles, parallel processes          6 compile    torch.compile smoke vs eager
#   2 cuda_tests pytest -m cuda (correctness)                7 gemm_sweep MoVE GEMM configs vs the table's pick
#   3 train_step full step, 40 + 160 studies, vs baselines    8 loader     256-px cached JPEGs: nvJPEG vs PIL
#   4 ops        local alignment, MoVE FFN at trainer precision
# Files in $OUT (at most 8 come back from the device tool, none in sub-folders):
#   summary.txt   one line per stage (status, wall time, rows) + the lines that matter from its log
#   bench.csv     every benchmark row (common schema: device, versions, git sha in every row)
#   env.txt       stage 0's output
#   logs.tar.gz   every stage's full log (rewritten after each stage), incl. the pretrain log
set -uo pipefail
DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: bash benchmarks/device_check.sh [--dry-run]   (unknown argument: $1)" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python}
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$(mktemp -d /tmp/medst_dryrun.XXXXXX)}
  export MEDST_BENCH_QUICK=1 CUDA_VISIBLE_DEVICES=""  # CPU, tiny shapes, even on a machine with a GPU
else
  OUT=${OUT:-/tmp/medst_out}
fi
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/medst_check_logs.XXXXXX)
# Seconds for everything: the device tool's 8.5-minute call, less ~15 s of slack. The dry run's caps are
# SLOW times longer (a CI runner's 2 busy cores import torch in seconds, not a GPU machine's fraction of one).
if [ "$DRY" = 1 ]; then SLOW=${MEDST_CHECK_SLOW:-4}; else SLOW=1; fi
BUDGET=${MEDST_CHECK_BUDGET:-$((495 * SLOW))}
SUMMARY="$OUT/summary.txt"
CSV="$OUT/bench.csv"
: > "$SUMMARY"
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }
left() {  # seconds left of the budget, capped at $1 (x SLOW; 0 when spent)
  local rest=$((BUDGET - SECONDS)) cap=$(($1 * SLOW))
  [ "$rest" -lt 0 ] && rest=0
  if [ "$rest" -lt "$cap" ]; then echo "$rest"; else echo "$cap"; fi
}
rows() { [ -f "$CSV" ] && echo $(($(wc -l < "$CSV") - 1)) || echo 0; }
pack_logs() {  # atomic: a half-written tarball never replaces the last good one
  tar -czf "$OUT/.logs.tar.gz.tmp" -C "$LOGS" . 2>/dev/null && mv -f "$OUT/.logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

# stage NAME CAP MIN_ROWS CMD... : runs CMD under a timeout, logs to $LOGS/NAME.log, appends its summary.
stage() {
  local name=$1 cap=$2 want_rows=$3; shift 3
  local t; t=$(left "$cap")
  local log="$LOGS/$name.log" before; before=$(rows)
  local t0=$SECONDS status rc
  if [ "$t" -lt 10 ]; then
    status="NOT RUN (budget spent)"; echo "$status" > "$log"; rc=1
  else
    timeout -k 10 "$t" "$@" > "$log" 2>&1; rc=$?
    if [ "$rc" = 0 ]; then status="ok"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMED OUT after ${t}s"
    else status="FAILED (exit $rc)"; fi
  fi
  local added=$(($(rows) - before))
  if [ "$rc" = 0 ] && [ ! -s "$log" ]; then status="FAILED (no output)"; rc=1; fi
  if [ "$rc" = 0 ] && [ "$added" -lt "$want_rows" ]; then status="FAILED (wrote $added rows, expected >= $want_rows)"; rc=1; fi
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  say "$(printf '%-11s %-40s %4ss  rows +%s' "$name" "$status" "$((SECONDS - t0))" "$added")"
  # the lines that matter: pytest's result line and skip reasons, the stages' own SKIP/result lines, errors
  grep -E "^(SKIP|SKIPPED|OOM|FAILED|ERROR)|[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s|^warm-up:|^compile |^pretrain exit|studies/s .*input|Error:" "$log" \
    | grep -v "^SKIPPED.*benchmarks run only" | tail -n 25 | sed 's/^/    /' | cut -c1-300 >> "$SUMMARY"
  pack_logs
}

echo "device_check $( [ "$DRY" = 1 ] && echo "--dry-run (CPU, tiny shapes: NOT performance numbers)" ) $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$SUMMARY"

# -- setup: the package itself, offline. A bare PYTHONPATH maps medst_fast.kernels too (medst_fast/__init__.py
#    binds the kernels/ folder), so a failed install falls back to it instead of stopping.
setup() {
  if (cd /tmp && "$PY" -c "import os, sys, medst_fast.kernels._utils as u; sys.exit(not os.path.realpath(u.__file__).startswith(os.path.realpath('$ROOT')))") 2>/dev/null; then
    echo "medst_fast from this checkout is already installed"
  elif MEDST_FAST_NO_EXT=1 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ; then
    echo "installed: pip install --no-deps --no-build-isolation --no-index -e ."
  else
    echo "SKIP (install failed): using PYTHONPATH=$ROOT instead"
  fi
}
export ROOT PY
export -f setup
stage setup 60 0 bash -c setup
if [ "$(tail -n 25 "$LOGS/setup.log" | grep -c 'PYTHONPATH=')" != 0 ]; then export PYTHONPATH="$ROOT:${PYTHONPATH:-}"; fi
# The C++/CUDA extension builds in the background during the warm-up (16 cores); the PyTorch fallbacks run
# where it did not build. The dry run leaves the extension as the CI's install made it.
EXT_PID=""
if [ "$DRY" = 0 ]; then
  setsid bash -c 'MAX_JOBS=8 timeout -k 5 150 "$0" setup.py build_ext --inplace > "$1" 2>&1; echo "build_ext exit $?" >> "$1"' "$PY" "$LOGS/build_ext.log" &
  EXT_PID=$!
else
  echo "SKIP (dry run): the extension build (the CI's install built it, or not)" > "$LOGS/build_ext.log"
fi

stage env 30 0 "$PY" benchmarks/device_check.py env
cp "$LOGS/env.log" "$OUT/env.txt"
stage warmup 75 0 "$PY" benchmarks/device_check.py warmup --procs "$(( $(nproc) / 2 > 8 ? 8 : ($(nproc) / 2 < 1 ? 1 : $(nproc) / 2) ))"
if [ -n "$EXT_PID" ]; then  # wait for the extension at most 30 s more, then go on without it
  for _ in $(seq 30); do kill -0 "$EXT_PID" 2>/dev/null || break; sleep 1; done
  kill -0 "$EXT_PID" 2>/dev/null && { kill -- -"$EXT_PID" 2>/dev/null || kill "$EXT_PID"; echo "build_ext: stopped (still running after the warm-up + 30 s)" >> "$LOGS/build_ext.log"; }
  say "build_ext   $(tail -n 1 "$LOGS/build_ext.log")"
fi
# CUDA correctness only: the kernels against their references (fwd + every grad), packed varlen vs dense
# encoder, nvJPEG vs PIL, the extension op, cross_local. Without CUDA every one is a named skip.
# Only the files that carry the marker are collected: importing all of tests/ costs a CPU minute for nothing.
mapfile -t CUDA_FILES < <(grep -l "mark\.cuda" tests/test_*.py)
stage cuda_tests 100 0 "$PY" -m pytest -m cuda "${CUDA_FILES[@]}" -q -rs -p no:cacheprovider
# -s: the benchmarks' own SKIP / OOM lines reach the log (pytest would capture them)
BENCH=("$PY" -m pytest -q -s -rs -p no:cacheprovider --benchmark --bench-csv "$CSV")
stage train_step 120 2 "${BENCH[@]}" benchmarks/bench_train_step.py
stage ops 50 4 "${BENCH[@]}" benchmarks/bench_ops.py -k "not gemm_configs"
stage e2e 75 0 "$PY" benchmarks/device_check.py e2e --out "$LOGS/e2e" --steps 30
rm -rf "$LOGS/e2e/cache" "$LOGS/e2e/run/checkpoints"  # keep the run's log and metrics, not its data
stage compile 60 0 "$PY" benchmarks/device_check.py compile
if [ "$DRY" = 1 ]; then  # the GEMM kernels under Triton's interpreter: the sweep's code on one tiny shape
  stage gemm_sweep 60 1 env TRITON_INTERPRET=1 "${BENCH[@]}" benchmarks/bench_ops.py -k gemm_configs
else
  stage gemm_sweep 45 1 "${BENCH[@]}" benchmarks/bench_ops.py -k gemm_configs
fi
stage loader 30 1 "${BENCH[@]}" benchmarks/bench_loader.py -k cache

say "device_check: $FAILED stage(s) not ok, ${SECONDS}s in all; outputs: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$LOGS"
[ "$FAILED" = 0 ]
