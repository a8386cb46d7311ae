#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the device tool): correctness first, then every benchmark against
# its same-run baseline. Results land in $OUT (copied back by the device tool): env.txt, build_ext.log,
# gpu_tests.log, bench.log (ends with the summary table), bench_configs.log (the MoVE FFN GEMM config sweep),
# bench.csv (the common schema, with the GPU name, versions and git sha in every row). Commit them under
# benchmarks/results/ when they are worth keeping.
#
#   run: bash benchmarks/device_check.sh        (timeout_s 560; the machine has torch, triton, no internet)
# The whole script ends within 9 minutes: every stage gets at most what is left of a 530 s budget.
set -uo pipefail
OUT=${OUT:-/tmp/medst_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
BUDGET=530
left() {  # seconds left of the budget, capped at $1
  local rest=$((BUDGET - SECONDS))
  if [ "$rest" -lt "$1" ]; then echo $((rest > 5 ? rest : 5)); else echo "$1"; fi
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# The extension in place (no pip: the machine is offline); the PyTorch fallbacks run if this fails.
timeout "$(left 120)" python setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 || echo "extension build failed (see build_ext.log)"
python -m medst_fast.env > "$OUT/medst_env.txt" 2>&1
# GPU correctness: kernels vs references on CUDA, the CUDA extension op, the CUDA loader paths (DALI mixed,
# nvJPEG) against the PIL loader, one transform on every path, packed vs dense encoder.
timeout "$(left 170)" python -m pytest -q -x tests/test_ops_local_align.py tests/test_ops_move_ffn.py \
  tests/test_ext_resize.py tests/test_transform_consistency.py tests/test_loaders.py tests/test_move_vit.py \
  tests/test_losses.py \
  tests/test_cross_local.py::test_cuda_sdpa_path_matches_the_reference_at_vit_b_shapes > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu_tests.log"
# Benchmarks, most important first (rows reach bench.csv as they come, so a timeout keeps the finished ones);
# each row carries its baseline from the same run; prepare with 100 full-size images.
MEDST_BENCH_IMAGES=${MEDST_BENCH_IMAGES:-100} timeout "$(left 220)" python -m pytest -q --benchmark \
  benchmarks/bench_train_step.py benchmarks/bench_ops.py benchmarks/bench_loader.py benchmarks/bench_prepare.py \
  -k "not gemm_configs" --bench-csv "$OUT/bench.csv" > "$OUT/bench.log" 2>&1; echo "bench rc=$?" >> "$OUT/bench.log"
# The MoVE FFN GEMMs at every config of their candidate sets, 40 and 160 studies (rows into the same bench.csv,
# ratio > 1 = that config beats move_ffn's table): estimated ~80 s (24 Triton compiles + 60 timings).
timeout "$(left 110)" python -m pytest -q --benchmark benchmarks/bench_ops.py -k gemm_configs \
  --bench-csv "$OUT/bench.csv" > "$OUT/bench_configs.log" 2>&1; echo "bench configs rc=$?" >> "$OUT/bench_configs.log"
tail -5 "$OUT/gpu_tests.log"
tail -30 "$OUT/bench.log"
tail -55 "$OUT/bench_configs.log"
echo "device_check: ${SECONDS}s"
