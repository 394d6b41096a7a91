#!/usr/bin/env bash
# BiCM on the default synthetic world: the README's BiCM figures (Tables 4-7 analogues, per kind, the lambda_t
# sweep, the qualitative figure). Makes what BiCM reads (the world, the built-in detector and its proposals, the
# built-in CLIP's corpus and model, the CLIP embeddings of the proposals), the pseudo labels of the unpaired train
# pools, KAM, every ablation row's predictions, the report. Every step is a cache hit when run again.
# EXTRACT_FLAGS: flags every `refground extract` of this cache uses (e.g. "--detections" where VL-NMS shares it:
# an extract without them rewrites the features file without the pre-NMS set, and VL-NMS's runs refuse it).
# Usage: bash examples/bicm.sh [CACHE_DIR]
set -euo pipefail
CACHE=${1:-./cache}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RG=refground
if [ -x "$ROOT/.venv/bin/refground" ]; then RG="$ROOT/.venv/bin/refground"; fi  # the checkout's venv, if any
run() { echo "+ $*" >&2; "$@"; }  # each command printed before it runs
run "$RG" data synth --cache "$CACHE"
run "$RG" train detector --cache "$CACHE"
run "$RG" data synth --preset web --cache "$CACHE"          # the CLIP's own corpus (never the benchmark's images)
run "$RG" train clip --cache "$CACHE"                        # ~17 minutes on 2 cores
# shellcheck disable=SC2086
run "$RG" extract --clip builtin ${EXTRACT_FLAGS:-} --cache "$CACHE"   # proposals + their CLIP crop embeddings
run "$RG" pseudo bicm --cache "$CACHE"                       # Table 7: nearest query per train image, QAM+COM+SF
run "$RG" train bicm --cache "$CACHE"                        # KAM on the pseudo labels
for split in val testA testB; do
  run "$RG" eval --method bicm --run bicm --split "$split" --cache "$CACHE"
  run "$RG" eval --method bicm --run class-name --split "$split" --cache "$CACHE"
done
run "$RG" report bicm --cache "$CACHE" --splits val,testA,testB
run "$RG" show --method bicm --run bicm --split testB --cache "$CACHE" --out "$CACHE/synth/report/bicm_show.png"
python "$ROOT/examples/bicm_ceiling.py" "$CACHE" testB   # what perfect appearance knowledge would reach
