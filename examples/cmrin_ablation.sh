#!/usr/bin/env bash
# CMRIN's Table 2 on the default synthetic world: train the six variants (same schedule, seed 0), then the
# report (markdown + JSON under <cache>/synth/report/). Needs the features and graphs of
# examples/quickstart.sh or examples/feature_cache.sh. Two runs share the two cores: one thread each.
# Usage: bash examples/cmrin_ablation.sh [CACHE_DIR]
set -euo pipefail
CACHE=${1:-cache}
export OMP_NUM_THREADS=1
for pair in "cmrin instance" "global-2 guided-2" "fusion-1 fusion-3"; do
  pids=()
  for variant in $pair; do
    refground train cmrin --variant "$variant" --cache "$CACHE" & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done   # a failed run stops the script
done
refground report cmrin --cache "$CACHE"
