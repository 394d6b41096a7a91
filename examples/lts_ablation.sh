#!/usr/bin/env bash
# LTS's ablation on the default synthetic world: the README's LTS ablation tables (Tables 2, 4 and 5, the mask box
# beside CMRIN, per-kind figures and the grid of successes and failures) at EPOCHS epochs per run. Trains every
# variant as run V-eEPOCHS (same schedule, seed 0; a finished run is a cache hit when run again), then one report
# over those runs, which places each run by its config.json: markdown, JSON and grid PNG under
# CACHE/synth/report/lts_ablation_eEPOCHS.*.
# Needs, in CACHE: the world, detector and features of `refground quickstart` (or `refground train detector` and
# `refground extract`), and the dense maps of `refground extract --dense`; CMRIN's row needs quickstart's run "cmrin".
# Usage: bash examples/lts_ablation.sh [CACHE_DIR] [EPOCHS]
set -euo pipefail
CACHE=${1:-./cache}
EPOCHS=${2:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RG=refground
if [ -x "$ROOT/.venv/bin/refground" ]; then RG="$ROOT/.venv/bin/refground"; fi  # the checkout's venv, if any
run() { echo "+ $*" >&2; "$@"; }  # each command printed before it runs
runs=()
for V in fusion filter fusion-filter fusion-seg filter-seg fusion-filter-seg lts lts-trans lts-n2 lts-n3 \
         lts-wordfilter; do
  run "$RG" train lts --cache "$CACHE" --variant "$V" --run "$V-e$EPOCHS" --epochs "$EPOCHS"
  runs+=("$V-e$EPOCHS")
done
run "$RG" report lts --cache "$CACHE" --runs "$(IFS=,; echo "${runs[*]}")" \
  --out "$CACHE/synth/report/lts_ablation_e$EPOCHS.md"
