#!/usr/bin/env bash
# Re-runs every measurement behind the README's tables, with the commands the README names, on the default
# world (seed 0), and collects each figure as JSON under <CACHE>/readme/. On the project's 2-core machine this
# takes about two hours (the six Table 2 variants and three seeds dominate); pass "quick" as the second
# argument to measure only the quickstart, CMRIN seed 0 (both candidate sets) and VL-NMS-FC.
# Usage: bash examples/readme_figures.sh [CACHE_DIR] [quick]
set -euo pipefail
CACHE=${1:-cache}
MODE=${2:-all}
OUT="$CACHE/readme"
mkdir -p "$OUT"
FLOOR=0.3
rg() { refground "$@" --cache "$CACHE"; }
# The main job (its own 2-epoch CMRIN run lives in runs/cmrin/cmrin of a separate cache, like a user's).
refground quickstart --cache "$CACHE/quickstart" --json > "$OUT/quickstart.json"
# The feature cache, the detector and the graphs (README "The feature cache", "The built-in detector").
rg data synth --json > "$OUT/synth.json"
rg train detector --json > "$OUT/detector.json"
rg extract --detections --no-dense --json > "$OUT/extract.json"
rg graph --json > "$OUT/graph.json"
# CMRIN, 10 epochs, seed 0: "Results on the default world".
rg train cmrin --json > "$OUT/cmrin.json"
for split in val testA testB; do
  rg eval --method cmrin --split "$split" --json > "$OUT/cmrin-gt-$split.json"
  rg eval --method cmrin --split "$split" --candidates proposals --top-n 10 --json > "$OUT/cmrin-top10-$split.json"
done
# VL-NMS-FC with its pseudo ground truth, and CMRIN on its proposals.
rg pseudo vlnms --json > "$OUT/pseudo-vlnms.json"
rg train vlnms --variant fc --loss bce --json > "$OUT/vlnms-fc-bce.json"
rg vlnms --confidence-only --min-confidence "$FLOOR" --json > "$OUT/vlnms-confidence.json"
rg vlnms --run fc-bce --min-confidence "$FLOOR" --json > "$OUT/vlnms-proposals-fc-bce.json"
for split in val testA testB; do
  rg eval --method cmrin --split "$split" --candidates vlnms --vlnms-run fc-bce --top-n 10 --json \
    > "$OUT/cmrin-vlnms-$split.json"
done
[ "$MODE" = quick ] && exit 0
# CMRIN seeds 1 and 2, and the Table 2 rows.
for seed in 1 2; do
  rg train cmrin --seed "$seed" --run "cmrin-s$seed" --json > "$OUT/cmrin-s$seed.json"
  for split in val testA testB; do
    rg eval --method cmrin --run "cmrin-s$seed" --split "$split" --json > "$OUT/cmrin-s$seed-$split.json"
  done
done
for variant in instance global-2 guided-2 fusion-1 fusion-3; do
  rg train cmrin --variant "$variant" --json > "$OUT/cmrin-$variant.json"
done
rg report cmrin --json > "$OUT/report-cmrin.json"
# The other VL-NMS rows (Tables 1, 2, 4, 6).
rg train vlnms --variant fc --loss rank --json > "$OUT/vlnms-fc-rank.json"
rg train vlnms --variant trans --loss bce --json > "$OUT/vlnms-trans-bce.json"
rg train vlnms --variant fc --loss bce --no-pseudo --json > "$OUT/vlnms-fc-bce-nopseudo.json"
rg report vlnms --min-confidence "$FLOOR" --json > "$OUT/report-vlnms.json"
# The benchmarks' measured ratios.
refground bench --json > "$OUT/bench.json"
