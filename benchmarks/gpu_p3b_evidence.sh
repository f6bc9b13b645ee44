#!/usr/bin/env bash
# One time-boxed session on a lent GPU machine (16 CPU cores + one GPU) for issue-10 evidence:
#  - the digits accuracy study (5 seeds × 3 rates, one CPU process per (seed, rate), 1 thread each);
#  - P3B allocations for Table 7 (DeiT-S/B, both structures, 75/90% of all parameters) on the GPU;
#  - GPU batch-1024 Table 7 rows (torch eager, fp32) from those allocations, if time is left.
# Everything is packed into $OUT/results.tgz even when a step runs out of time.
# Usage (repo root): OUT=/some/dir bash benchmarks/gpu_p3b_evidence.sh
set -u
OUT=${OUT:-/tmp/p3b-evidence-out}
R=/tmp/p3b-evidence
mkdir -p "$OUT" $R/acc $R/alloc
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
T_ACC=${T_ACC:-470} T_ALLOC=${T_ALLOC:-330} T_GPU=${T_GPU:-120}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep -E "Model name|^CPU\(s\)";
  $PY -c "import torch, timm, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__)"; } > $R/machine.txt 2>&1
ALLOC_EPOCHS=${ALLOC_EPOCHS:-1 5 4}
[ "${SKIP_ACC:-0}" = 1 ] || for s in 0 1 2 3 4; do
  for r in 50 75 90; do
    OMP_NUM_THREADS=1 timeout $T_ACC $PY benchmarks/accuracy_digits.py --seeds $s --rates $r --threads 1 \
      --work $R/work_${s}_$r --part $R/acc/part_${s}_$r.json > $R/acc/log_${s}_$r.txt 2>&1 &
  done
done
timeout $T_ALLOC $PY benchmarks/p3b_allocations.py --device cuda --bf16 --epochs $ALLOC_EPOCHS \
  --update-every ${ALLOC_UPDATE:-5} -o $R/alloc > $R/alloc_log.txt 2>&1
timeout $T_GPU $PY benchmarks/table7.py --device cuda --backends torch --runs ${GPU_RUNS:-10} --warmup 3 \
  --allocations $R/alloc --machine gpu > $R/table7_gpu_log.txt 2>&1
cp benchmarks/results/table7_gpu_cuda.json $R/ 2>/dev/null
wait
tar czf "$OUT/results.tgz" -C $R machine.txt acc alloc alloc_log.txt table7_gpu_log.txt $(cd $R && ls table7_gpu_cuda.json 2>/dev/null)
tail -q -n 1 $R/acc/log_*_*.txt 2>/dev/null | tail -15; cat $R/alloc_log.txt | tail -12; tail -30 $R/table7_gpu_log.txt
