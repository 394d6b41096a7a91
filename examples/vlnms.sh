#!/usr/bin/env bash
# VL-NMS on the default synthetic world, end to end: the detector's pre-NMS detection set, pseudo ground truth
# of contextual objects, the three relatedness models of Table 1 and the no-pseudo-GT twin of Table 4,
# query-aware proposals, and the report (Tables 1, 2, 4, 6 and recall@N PNGs under <cache>/synth/report/).
# CMRIN is the second stage: the run "cmrin" of `refground train cmrin` (trained here if missing).
# Usage: bash examples/vlnms.sh [CACHE_DIR]
set -euo pipefail
CACHE=${1:-cache}
# Detection floor of the query-aware proposals, chosen on val for the built-in detector (README, VL-NMS);
# 0 is the paper's protocol (every stored detection enters the NMS).
FLOOR=0.3
refground data synth --cache "$CACHE"
refground train detector --cache "$CACHE"
refground extract --detections --no-dense --cache "$CACHE"   # proposals + the pre-NMS set (confidence >= 0.05)
refground graph --cache "$CACHE"
refground train cmrin --cache "$CACHE"
refground pseudo vlnms --cache "$CACHE"                      # prints its precision/recall against the mentions
refground train vlnms --variant fc --loss bce --cache "$CACHE"
refground train vlnms --variant fc --loss rank --cache "$CACHE"
refground train vlnms --variant trans --loss bce --cache "$CACHE"
refground train vlnms --variant fc --loss bce --no-pseudo --cache "$CACHE"
refground vlnms --confidence-only --min-confidence "$FLOOR" --cache "$CACHE"
for run in fc-bce fc-rank trans-bce fc-bce-nopseudo; do
  refground vlnms --run "$run" --min-confidence "$FLOOR" --cache "$CACHE"
done
refground eval --method cmrin --candidates vlnms --vlnms-run fc-bce --top-n 10 --split testB --cache "$CACHE"
refground report vlnms --min-confidence "$FLOOR" --cache "$CACHE"
