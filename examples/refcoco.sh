#!/usr/bin/env bash
# RefCOCO (or RefCOCO+ / RefCOCOg) from the real files, end to end: import the refer layout, extract proposals
# and region features, build the spatial relation graphs, train CMRIN, and evaluate it on the test splits with
# ground-truth objects and with the detector's top-N proposals as candidates.
#
# Usage: bash examples/refcoco.sh --refer DIR --images DIR --detector SPEC [options]
#   --refer DIR        the refer data folder: DIR/<corpus>/refs(<split-by>).p and DIR/<corpus>/instances.json
#   --images DIR       the COCO train2014 image folder
#   --detector SPEC    proposals: hf:PATH (a transformers object detector folder), mattnet:FILE (MAttNet
#                      detections JSON), builtin:DATASET/NAME (a `refground train detector` run of another
#                      dataset in this cache) or builtin:/path/to/run
#   --backbone SPEC    region features of proposals and ground-truth objects: hf:PATH (a transformers backbone)
#                      or builtin[:...] as above. Needed with hf: and mattnet: detectors, which cannot pool the
#                      ground-truth boxes CMRIN trains on; a built-in detector is its own backbone.
#   --corpus NAME      refcoco (default), refcoco+ or refcocog
#   --split-by NAME    unc (default; refcoco, refcoco+), umd or google (refcocog)
#   --dataset NAME     dataset name in the cache (default <corpus>_<split-by>)
#   --cache DIR        artifact root (default $REFGROUND_CACHE or ./cache)
#   --epochs N         CMRIN training epochs (default: the config's)
#   --run NAME         CMRIN run name (default cmrin)
#   --splits "A B"     evaluation splits (default "testA testB"; "val test" for refcocog)
#   --top-n N          proposals per image as candidates (default 10)
#   --features NAME    features artifact name (default from the detector and backbone)
#   --max-proposals N  proposals stored per image (default 100)
# Environment: CMRIN_ARGS (extra `refground train cmrin` options, e.g. "--config my.json --seed 1"),
#   EXTRACT_ARGS (extra `refground extract` options, e.g. "--workers 8 --batch-size 32").
# Every step is skipped when its artifact is already current, so a second run only re-reads the results.
set -euo pipefail

REFER="" IMAGES="" DETECTOR="" BACKBONE="" CORPUS=refcoco SPLIT_BY=unc DATASET="" CACHE_DIR=""
EPOCHS="" RUN=cmrin SPLITS="" TOP_N=10 FEATURES="" MAX_PROPOSALS=100
die() { echo "refcoco.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || die "$1 needs a value (see the usage at the top of $0)"
  case "$1" in
    --refer) REFER=$2 ;; --images) IMAGES=$2 ;; --detector) DETECTOR=$2 ;; --backbone) BACKBONE=$2 ;;
    --corpus) CORPUS=$2 ;; --split-by) SPLIT_BY=$2 ;; --dataset) DATASET=$2 ;; --cache) CACHE_DIR=$2 ;;
    --epochs) EPOCHS=$2 ;; --run) RUN=$2 ;; --splits) SPLITS=$2 ;; --top-n) TOP_N=$2 ;;
    --features) FEATURES=$2 ;; --max-proposals) MAX_PROPOSALS=$2 ;;
    *) die "unknown option $1 (see the usage at the top of $0)" ;;
  esac
  shift 2
done
[[ -n $REFER && -n $IMAGES && -n $DETECTOR ]] || die "give --refer DIR --images DIR --detector SPEC"
case "$DETECTOR" in
  hf:*|mattnet:*) [[ -n $BACKBONE ]] || die "--detector $DETECTOR cannot pool the ground-truth boxes CMRIN \
trains on: add --backbone hf:PATH (a transformers backbone) or builtin:DATASET/NAME" ;;
  builtin:*) ;;
  *) die "--detector $DETECTOR: expected hf:PATH, mattnet:FILE, builtin:DATASET/NAME or builtin:/path/to/run" ;;
esac
DATASET=${DATASET:-${CORPUS}_${SPLIT_BY}}
if [[ -z $SPLITS ]]; then
  if [[ $CORPUS == refcocog ]]; then SPLITS="val test"; else SPLITS="testA testB"; fi
fi
# The artifact name is chosen here and given to every step, so they all read the same one (named as extract
# would: detector-DATASET.NAME, hf-<folder>, mattnet-<file>).
source "$(dirname "${BASH_SOURCE[0]}")/_recipe.sh"   # short (the artifact name of a spec), run (echoed)
FEATURES=${FEATURES:-$(short "$DETECTOR")${BACKBONE:++$(short "$BACKBONE")}}
C=(--dataset "$DATASET")
[[ -z $CACHE_DIR ]] || C+=(--cache "$CACHE_DIR")

run refground data import-refcoco --root "$REFER" --images "$IMAGES" --corpus "$CORPUS" --split-by "$SPLIT_BY" "${C[@]}"
# No dense maps: CMRIN reads region features only (dense maps of 20k COCO images take hours and gigabytes).
# shellcheck disable=SC2086  # EXTRACT_ARGS and CMRIN_ARGS are option lists, split on spaces on purpose
run refground extract --detector "$DETECTOR" ${BACKBONE:+--backbone "$BACKBONE"} --max-proposals "$MAX_PROPOSALS" \
    --features "$FEATURES" --no-dense "${C[@]}" ${EXTRACT_ARGS:-}
run refground graph --features "$FEATURES" "${C[@]}"
# shellcheck disable=SC2086
run refground train cmrin --run "$RUN" --features "$FEATURES" ${EPOCHS:+--epochs "$EPOCHS"} "${C[@]}" ${CMRIN_ARGS:-}
for split in $SPLITS; do
  # Ground-truth objects as candidates (the paper's main setting), then the detector's top-N proposals.
  run refground eval --method cmrin --run "$RUN" --split "$split" "${C[@]}"
  run refground eval --method cmrin --run "$RUN" --split "$split" --candidates proposals --top-n "$TOP_N" "${C[@]}"
done
