#!/usr/bin/env bash
# The device side of the GPU check (issue 25), one command for the `run` tool:
#   bash benchmarks/gpu_check.sh            (carry: ["bench_out/wheels"])
# Installs what the machine lacks from the carried wheels (no network there), then
# runs benchmarks/gpu_check.py on CUDA, writing the table under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-16}
{
  python -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  if [ -d bench_out/wheels ]; then
    # each alone and without deps: one missing wheel must not stop the others
    for w in bench_out/wheels/*.whl; do pip install --no-index --no-deps --quiet "$w" 2>/dev/null || echo "not installed: $w"; done
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  df -h /tmp . | tail -2
} > "$out/setup.log" 2>&1
python benchmarks/gpu_check.py --device cuda --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log" | tail -60
