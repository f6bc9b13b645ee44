#!/usr/bin/env bash
# Table 7's GPU rows in one prepared run (≤ 8 minutes on one GPU): DeiT-S/B dense and P3B-heads
# 75/90% at batch 1024 on torch eager, torch.compile, ONNX Runtime CUDA and TensorRT fp32/fp16/INT8
# (each row says why when it cannot run). Installs nothing: run `make setup` first.
# Usage (repo root): OUT=/some/dir bash benchmarks/gpu_table7.sh            # a CUDA machine
#                    OUT=/tmp/x bash benchmarks/gpu_table7.sh --dry-run     # the same steps on the CPU
set -euo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  if [[ " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi
  timeout 480 $PY benchmarks/gpu_table7.py -o "$OUT/gpu_table7.json" --budget-s 400 "$@"
} 2>&1 | tee "$OUT/gpu_table7_log.txt"
