#!/usr/bin/env bash
# All GPU checks in one run (for a lent CUDA machine, about 10 minutes): correctness of both
# Triton designs against the reference first, then the design and launch-parameter sweep, then
# the kernel benchmark with the winner (CUDA-graph replays, then eager launches for 1 and 16
# tokens), then, if time is left, an Nsight Compute summary of each design's kernels for one
# token at 90% sparsity; between them, approximate mode's benchmark in bf16. Results go to $OUT
# (default benchmarks/results/h200), 11 files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/h200}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_triton.py \
    tests/test_triton_predicted.py 2>&1 | tail -n 15
} 2>&1 | tee "$OUT/checks.txt"
timeout 170 python3 benchmarks/tune_triton.py --out "$OUT" 2>&1 | tee "$OUT/tune.txt" | grep -E "dense|best"
TUNE=()
if [ -f "$OUT/tune_triton.json" ]; then
  TUNE=(--tuning "$OUT/tune_triton.json")
else
  echo "the sweep wrote no table: benchmarking the default TUNING" | tee -a "$OUT/tune.txt"
fi
timeout 150 python3 benchmarks/bench_ffn.py --device cuda --repeats 30 --cuda-graph "${TUNE[@]}" --out "$OUT"
timeout 50 python3 benchmarks/bench_ffn.py --device cuda --repeats 30 --tokens 1 16 --modes shared "${TUNE[@]}" --out "$OUT"
# approximate mode (issue 15): the predicted ops' Triton kernels, bf16, 7B widths, one token
timeout 90 python3 benchmarks/bench_predicted.py --device cuda --dtype bfloat16 --repeats 30 \
  --out "$OUT" --tag predicted_cuda_bf16 2>&1 | tee "$OUT/predicted.txt"
if command -v ncu >/dev/null; then
  for design in blocks compact; do
    timeout 30 ncu --clock-control none --kernel-name regex:_kernel --launch-skip 40 --launch-count 8 \
      --section SpeedOfLight --section LaunchStats --section Occupancy \
      python3 benchmarks/bench_ffn.py --device cuda --repeats 5 --widths llama2-7b --tokens 1 \
      --modes shared --sparsity 0.9 "${TUNE[@]}" --design "$design" --out /tmp
  done > "$OUT/ncu.txt" 2>&1
fi
