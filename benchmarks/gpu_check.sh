#!/usr/bin/env bash
# One GPU session: gpu-marked tests, P3B allocations for Table 7 (P3B-heads and P3B-inner, DeiT-S/B,
# 75/90% of all parameters), and the GPU batch-1024 Table 7 rows with torch eager and torch.compile.
# Usage (repo root, a CUDA machine with torch): OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
ALLOC=${ALLOC:-/tmp/p3b-alloc-out}
mkdir -p "$OUT" "$ALLOC"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -m p3bkit.cli doctor
  $PY -m pytest -m gpu -p no:cacheprovider -q tests/test_gpu.py 2>&1 | tail -15
  $PY benchmarks/p3b_allocations.py --device cuda --bf16 --structures heads inner -o "$ALLOC"
  $PY -c "import json,glob,os; json.dump({os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob('$ALLOC/*.json'))}, open('$OUT/allocations.json','w'))"
  $PY benchmarks/table7.py --device cuda --backends torch --structures heads inner --runs 30 --warmup 5 --allocations "$ALLOC" --machine gpu
  $PY benchmarks/table7.py --device cuda --backends torch --structures heads inner --runs 30 --warmup 5 --allocations "$ALLOC" --machine gpu --compile
  cp benchmarks/results/table7_gpu_cuda.json benchmarks/results/table7_gpu-compile_cuda.json "$OUT/"
} 2>&1 | tee "$OUT/gpu_log.txt"
