#!/usr/bin/env bash
# One GPU session: gpu-marked tests, real P3B allocations for Table 7, GPU batch-1024 throughput.
# Usage (repo root, a CUDA machine with torch): OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT" /tmp/p3b-alloc-out
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -m p3bkit.cli doctor
  $PY -m pytest -m gpu -p no:cacheprovider -q tests/test_gpu.py 2>&1 | tail -15
  $PY benchmarks/p3b_allocations.py --device cuda -o /tmp/p3b-alloc-out
  $PY -c "import json,glob,os; json.dump({os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob('/tmp/p3b-alloc-out/*.json'))}, open('$OUT/allocations.json','w'))"
  $PY benchmarks/table7.py --device cuda --backends torch --runs 30 --warmup 5 --allocations /tmp/p3b-alloc-out --machine gpu
  cp benchmarks/results/table7_gpu_cuda.json "$OUT/"
} 2>&1 | tee "$OUT/gpu_log.txt"
