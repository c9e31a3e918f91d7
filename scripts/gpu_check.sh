#!/usr/bin/env bash
# GPU check (issue 14): the scan on one GPU at LLM width against the authors' method.
#
#   scripts/gpu_check.sh OUTDIR [--device cuda|cpu] [--smoke] [--steps machine,tests,scan,authors,svd]
#
# Runs in about 8 minutes on one GPU (--smoke: tiny shapes, under 2 minutes on a CPU) and writes
# every log and table into OUTDIR (summary.md first).  The project is made importable through
# PYTHONPATH, never installed: no pip dependency resolution, no network, and Ray is never
# imported (the GPU machine has none).  Set PYTHON to pick the interpreter.
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: scripts/gpu_check.sh OUTDIR [--device cuda|cpu] [--smoke] [--steps LIST]" >&2
    exit 2
fi
OUT=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUTDIR $OUT: pass a writable folder" >&2; exit 2; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
"$PY" "$REPO/scripts/gpu_check.py" "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
