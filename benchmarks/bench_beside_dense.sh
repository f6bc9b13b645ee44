#!/usr/bin/env bash
# One Table 7 allocation timed the way a user times it: `p3bkit export` (OpenVINO, fixed batch 1) of the
# dense DeiT and of the allocation (random weights), then `p3bkit bench` of the two alone, interleaved in
# one process, fp32, CPU batch 1. Writes benchmarks/results/beside_dense_<key>_<label>.json.
#   bash benchmarks/bench_beside_dense.sh deit_s speed_75 [runs] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
key=${1:?model key, e.g. deit_s}; label=${2:?allocation label, e.g. speed_75}; runs=${3:-300}; threads=${4:-2}
py=${PYTHON:-.venv/bin/python}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$py" - "$key" "$label" "$work" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from common import allocation_model  # noqa: E402

key, label, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
allocation_model(key, "dense", work / "dense")
allocation_model(key, label, work / "pruned")
PY
for m in dense pruned; do
  "$py" -m p3bkit.cli export "$work/$m" --format openvino --static-batch 1 --no-verify -o "$work/${m}_ov" >/dev/null
done
"$py" -m p3bkit.cli bench "$work/dense_ov/model.xml" "$work/pruned_ov/model.xml" --runs "$runs" --threads "$threads" \
  --json "benchmarks/results/beside_dense_${key}_${label}.json"
