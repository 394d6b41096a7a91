#!/usr/bin/env bash
# One table across supervision levels on the default world (`refground report supervision`): the class-name
# baseline, CMRIN (boxes paired) on the detector's top 10, VL-NMS + CMRIN, ReIR (captions only), LTS's mask box
# (masks paired) and BiCM (nothing paired), each with its default run. Makes every run it needs (about an hour
# on 2 cores when nothing is cached; a finished run is a cache hit), then the report: markdown, JSON and a bar
# chart under CACHE/synth/report/supervision.*. --threads 1 lets two of these share the machine.
# Usage: bash examples/supervision.sh [CACHE_DIR]
set -euo pipefail
CACHE=${1:-./cache}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RG=refground
if [ -x "$ROOT/.venv/bin/refground" ]; then RG="$ROOT/.venv/bin/refground"; fi
run() { echo "+ $*" >&2; "$@"; }
run "$RG" data synth --cache "$CACHE"
run "$RG" train detector --cache "$CACHE"
run "$RG" extract --detections --cache "$CACHE"             # proposals, pre-NMS detections, dense maps
run "$RG" graph --cache "$CACHE"
run "$RG" train cmrin --cache "$CACHE"
run "$RG" pseudo vlnms --cache "$CACHE"
run "$RG" train vlnms --variant fc --loss bce --cache "$CACHE"
run "$RG" vlnms --run fc-bce --min-confidence 0.3 --cache "$CACHE"
run "$RG" extract --first-stage --cache "$CACHE"   # a file of its own (detector-default-rpn.h5)
run "$RG" pseudo reir --cache "$CACHE"
run "$RG" train reir --variant reir --run reir --cache "$CACHE"
run "$RG" train lts --cache "$CACHE"
EXTRACT_FLAGS=--detections bash "$ROOT/examples/bicm.sh" "$CACHE"   # the same extract flags throughout
run "$RG" report supervision --cache "$CACHE"
