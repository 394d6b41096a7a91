#!/usr/bin/env bash
# The main job as individual commands (what `refground quickstart` runs in one process): the default
# synthetic world, the built-in detector, region features (no dense maps: CMRIN does not read them), spatial
# relation graphs, CMRIN, and its evaluation with ground-truth objects and with the detector's top-10
# proposals. Every step is a cache hit when run again. Usage: bash examples/quickstart.sh [CACHE_DIR] [EPOCHS]
set -euo pipefail
CACHE=${1:-cache}
EPOCHS=${2:-2}
refground data synth --cache "$CACHE"
refground train detector --cache "$CACHE"
refground extract --no-dense --cache "$CACHE"
refground graph --cache "$CACHE"
refground train cmrin --epochs "$EPOCHS" --lr-decay-epochs $((EPOCHS - 1)) --cache "$CACHE"
for split in val testA testB; do
  refground eval --method cmrin --split "$split" --cache "$CACHE"
  refground eval --method cmrin --split "$split" --candidates proposals --top-n 10 --cache "$CACHE"
done
refground show --method cmrin --split testB --cache "$CACHE"
