#!/usr/bin/env bash
# All GPU checks in one run (for a lent CUDA machine): correctness of the Triton kernels against
# the reference first, then the launch-parameter sweep, then the kernel benchmark (CUDA-graph
# replays and eager launches). Results go to $OUT (default benchmarks/results/gpu), 7 files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/h200}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15
} 2>&1 | tee "$OUT/checks.txt"
timeout 150 python3 benchmarks/tune_triton.py --out "$OUT" 2>&1 | tee "$OUT/tune.txt" | grep best
timeout 200 python3 benchmarks/bench_ffn.py --device cuda --repeats 30 --cuda-graph --tuning "$OUT/tune_triton.json" --out "$OUT"
timeout 90 python3 benchmarks/bench_ffn.py --device cuda --repeats 30 --tokens 1 16 --modes shared --tuning "$OUT/tune_triton.json" --out "$OUT"
