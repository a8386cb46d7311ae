#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the device tool): correctness first, then every benchmark
# against its same-run baseline. Results land in $OUT (copied back by the device tool); commit them under
# benchmarks/results/ with the GPU name and versions that env_info() records in every CSV row.
#
#   run: bash benchmarks/device_check.sh        (timeout_s ~540; the machine has torch, triton, no internet)
set -uo pipefail
OUT=${OUT:-/tmp/medst_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# The extension in place (no pip: the machine is offline); the PyTorch fallbacks run if this fails.
timeout 240 python setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 || echo "extension build failed (see build_ext.log)"
python -m medst_fast.env > "$OUT/medst_env.txt" 2>&1
# GPU correctness: kernels vs references on CUDA, the CUDA extension op, packed vs dense encoder.
timeout 300 python -m pytest -q -x tests/test_ops_local_align.py tests/test_ops_move_ffn.py tests/test_ext_resize.py \
  tests/test_move_vit.py tests/test_losses.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu_tests.log"
# Benchmarks (each row carries its baseline from the same run).
timeout 600 python -m pytest -q benchmarks/bench_ops.py benchmarks/bench_train_step.py benchmarks/bench_loader.py \
  --benchmark -s --bench-csv "$OUT/bench.csv" > "$OUT/bench.log" 2>&1; echo "bench rc=$?" >> "$OUT/bench.log"
tail -5 "$OUT/gpu_tests.log" "$OUT/bench.log"
