#!/usr/bin/env bash
# One prepared run on a GPU node without network access (see experiments/gpu/README.md):
#   environment -> tests/test_cuda.py -> a budgeted profiler.collect -> infinigen_sim.validate of that
#   bundle -> every policy at the paper-like point (OPT-6.7B shapes, batch 8, prompt 1920, gen 32).
# Each stage runs under its own `timeout`; the budgets sum to under 8 minutes. Everything goes to the
# folder given (or $OUT), as it goes. Usage:
#   bash experiments/gpu/run_all.sh [--dry-run] [--pack] [DIR]
#     --dry-run  list the stages, their budgets and the collection's plan and estimate; measure nothing
#     --pack     after each stage also pack DIR/run into DIR/gpu-run.tar.gz (a tool that returns few files)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DRY=0 PACK=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --pack) PACK=1 ;;
    *) echo "run_all.sh: unknown flag $1 (--dry-run, --pack)" >&2; exit 2 ;;
  esac
  shift
done
DEST=${1:-${OUT:-}}
if [[ -z $DEST ]]; then echo "run_all.sh: give an output folder (or set OUT)" >&2; exit 2; fi
mkdir -p "$DEST" || exit 2
DEST=$(cd "$DEST" && pwd)
RUN=$DEST/run
mkdir -p "$RUN"
PY=${PYTHON:-python3}

# Stage budgets in seconds (the collection's own budget leaves room for its summary); with the 5 s each
# stage may take to die after its timeout they stay under 480 s.
ENV_S=15 TESTS_S=85 COLLECT_S=195 COLLECT_BUDGET_S=165 VALIDATE_S=30 PAPER_S=125
TOTAL_S=$((ENV_S + TESTS_S + COLLECT_S + VALIDATE_S + PAPER_S))

# Pure-Python wheels carried in .whl/ import from the zip; any other wheel is unpacked first.
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
WHEELS=""
for wheel in "$ROOT"/.whl/*.whl; do
  [[ -e $wheel ]] || continue
  if [[ $wheel == *-none-any.whl ]]; then WHEELS="$WHEELS:$wheel"
  else "$PY" -m zipfile -e "$wheel" "$SITE" || echo "run_all.sh: could not unpack $wheel" >&2; fi
done
export PYTHONPATH="$ROOT:$SITE$WHEELS${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2

summary() { echo "$*" | tee -a "$DEST/summary.txt"; }

pack() {
  [[ $PACK == 1 ]] && tar -czf "$DEST/gpu-run.tar.gz.part" -C "$DEST" run && mv "$DEST/gpu-run.tar.gz.part" "$DEST/gpu-run.tar.gz"
  return 0
}

stage() {  # stage NAME SECONDS COMMAND...: run it under timeout, its output in run/NAME.log
  local name=$1 seconds=$2 start rc
  shift 2
  if [[ $DRY == 1 ]]; then
    printf '  %-9s %4d s  %s\n' "$name" "$seconds" "$*"
    return 0
  fi
  summary "== $name (timeout ${seconds} s): $*"
  start=$(date +%s)
  timeout --kill-after=5 "$seconds" "$@" > "$RUN/$name.log" 2>&1
  rc=$?
  tail -n 25 "$RUN/$name.log" | tee -a "$DEST/summary.txt"
  summary "-- $name: exit $rc after $(( $(date +%s) - start )) s$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')"
  pack
  return 0
}

if [[ $DRY == 1 ]]; then
  echo "run_all.sh --dry-run: stages and their timeouts (sum ${TOTAL_S} s = $((TOTAL_S / 60)) min $((TOTAL_S % 60)) s; limit 480 s)"
fi
stage env "$ENV_S" bash experiments/gpu/environment.sh "$RUN"
stage tests "$TESTS_S" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider
stage collect "$COLLECT_S" "$PY" -m profiler.collect --device cuda --budget-s "$COLLECT_BUDGET_S" --out "$RUN/bundle"
stage validate "$VALIDATE_S" "$PY" -m infinigen_sim.validate "$RUN/bundle" --out "$RUN/bundle-validation"
stage paper "$PAPER_S" "$PY" experiments/gpu/paper_point.py --bundle "$RUN/bundle" --out "$RUN/paper_point.jsonl"

if [[ $DRY == 1 ]]; then
  (( TOTAL_S + 5 * 5 < 480 )) || { echo "run_all.sh: stage budgets sum to ${TOTAL_S} s, over 8 minutes" >&2; exit 1; }
  echo "wheels on PYTHONPATH: ${WHEELS:-none}$(ls "$SITE" 2>/dev/null | head -c 200 | tr '\n' ' ' | sed 's/^/ unpacked: /')"
  "$PY" -c "import simpy" 2>/dev/null && echo "simpy: importable" || echo "simpy: MISSING (carry it: see experiments/gpu/README.md)"
  echo "collect stage's plan:"
  "$PY" -m profiler.collect --device cuda --budget-s "$COLLECT_BUDGET_S" --dry-run --out "$RUN/bundle" | sed 's/^/  /'
  echo "paper stage:"
  "$PY" experiments/gpu/paper_point.py --dry-run | sed 's/^/  /'
  rmdir "$RUN" "$DEST" 2>/dev/null
  exit 0
fi
summary "done: $DEST (bundle: run/bundle, validation: run/bundle-validation/validation.md)"
