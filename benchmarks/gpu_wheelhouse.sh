#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no network): mergekit for the side-by-side,
# pytest/hypothesis for the CUDA tests, psutil for peak RSS. Run HERE, before the
# device call; the folder travels with `carry` (ignored by git, ~25 MB).
#   bash benchmarks/gpu_wheelhouse.sh [DIR]   (default bench_out/wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-bench_out/wheels}
mkdir -p "$dir"
pure="mergekit==0.1.5 peft accelerate click pydantic annotated-types typing-inspection typing-extensions
      pytest pluggy iniconfig hypothesis sortedcontainers"
# shellcheck disable=SC2086
pip download --quiet --no-deps --only-binary=:all: -d "$dir" $pure
# compiled ones, for each Python the device may run
for py in 3.10 3.11 3.12; do
  pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 -d "$dir" pydantic-core immutables protobuf sentencepiece psutil
done
du -sh "$dir"
