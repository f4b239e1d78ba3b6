#!/usr/bin/env bash
# Regenerates tests/config/ota_fork/fixtures/ with the OTA authors' own code:
# pmahdavi/ota-merge (a mergekit 0.1.2 fork), installed in a scratch venv of its
# own (never curvlens's: it pins pydantic 2.10 and needs transformers 4.x).
#   bash tests/config/ota_fork/make_fixtures.sh /path/to/ota-merge [/path/to/scratch-venv]
# The fixtures checked in were made from commit eee703f (ota.py last changed in
# 2836ef5), with torch 2.13.0 CPU, pydantic 2.10.6 and transformers 4.57.6.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
fork="$(cd "$1" && pwd)"
venv="${2:-${TMPDIR:-/tmp}/ota-fork-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.13.0
  "$venv/bin/pip" install --quiet "pydantic~=2.10.6" "transformers>=4.45.2,<5" pyyaml "$fork"
fi
commit="$(git -C "$fork" rev-parse --short HEAD 2>/dev/null || echo unknown)"
OMP_NUM_THREADS=1 "$venv/bin/python" "$here/make_fixtures.py" --fork "$fork" --fork-commit "$commit"
du -sh "$here/fixtures"
