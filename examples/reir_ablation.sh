#!/usr/bin/env bash
# ReIR on the default synthetic world: the README's ReIR tables (Table 2 and 3 analogues, the class-name baseline,
# the supervised upper bound, per phrase kind, and Fig. 4's Acc at IoU 0.5-0.8 with and without L_reg). Makes what
# ReIR reads (the detector's first-stage proposals, the relation labels), trains every variant as run V (seed 0; a
# finished run is a cache hit when run again; EPOCHS overrides the default schedule), then one report over them:
# markdown, JSON and PNG under CACHE/synth/report/reir.*.
# Needs, in CACHE: the world and detector of `refground quickstart` (or `refground data synth` and `refground train
# detector`). JOBS=2 trains two variants side by side on one thread each (the default: one at a time).
# Usage: bash examples/reir_ablation.sh [CACHE_DIR] [EPOCHS]
set -euo pipefail
CACHE=${1:-./cache}
EPOCHS=${2:-}
JOBS=${JOBS:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RG=refground
if [ -x "$ROOT/.venv/bin/refground" ]; then RG="$ROOT/.venv/bin/refground"; fi  # the checkout's venv, if any
run() { echo "+ $*" >&2; "$@"; }  # each command printed before it runs
run "$RG" extract --cache "$CACHE" --first-stage
run "$RG" pseudo reir --cache "$CACHE"
extra=()
if [ -n "$EPOCHS" ]; then extra=(--epochs "$EPOCHS"); fi
threads=()
if [ "$JOBS" -gt 1 ]; then threads=(--threads 1); fi
variants=(reir tsd-vogn tsd-str tsd baseline tsd-str-noq uniform upper-bound reir-k3 reir-k10)  # the full model first
pids=()
for V in "${variants[@]}"; do
  run "$RG" train reir --cache "$CACHE" --variant "$V" --run "$V" "${extra[@]}" "${threads[@]}" &
  pids+=($!)
  if [ "${#pids[@]}" -ge "$JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
run "$RG" report reir --cache "$CACHE" --out "$CACHE/synth/report/reir.md"
