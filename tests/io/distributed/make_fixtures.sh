#!/usr/bin/env bash
# Regenerates tests/io/distributed/fixtures/ with the real libraries (DeepSpeed 0.19.8,
# torch's FSDP2 and DCP), 2 processes on CPU (gloo). Needs `pip install deepspeed==0.19.8`;
# the first DeepSpeed run compiles its small CPU comm op (about a minute).
#   bash tests/io/distributed/make_fixtures.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/fixtures"
rm -rf "$out" && mkdir -p "$out"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
run() { torchrun --nproc_per_node=2 --master_port="${PORT:-29517}" "$@"; }
run "$here/make_deepspeed.py" --stage 1 --out "$out/zero1"
run "$here/make_deepspeed.py" --stage 2 --elastic --out "$out/zero2_elastic"
run "$here/make_deepspeed.py" --stage 3 --sub-group-size 100 --out "$out/zero3"
# one run per expert, in every layout: a/deepspeed is a ZeRO-2 dir, a/trainer, a/dcp, a/paper
run "$here/make_deepspeed.py" --stage 2 --out "$out/same_run/a/deepspeed" --same-run "$out/same_run/a" \
    --base-out "$out/same_run/base"
run "$here/make_deepspeed.py" --stage 2 --data-seed 1 --out "$out/same_run/b/deepspeed" --same-run "$out/same_run/b"
run "$here/make_fsdp2.py" --out "$out/fsdp2"
du -sh "$out"
