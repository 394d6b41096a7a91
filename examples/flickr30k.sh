#!/usr/bin/env bash
# Flickr30K Entities from the real files, as far as the toolkit goes today: import the annotations, extract
# proposals and region features, build the spatial relation graphs, and score a proposal baseline for phrase
# grounding (every phrase grounded to its image's most confident proposal: the floor a phrase-grounding method
# has to beat, and a check that the detector's boxes land on Flickr30K's objects at all).
#
# No registered method trains on phrases yet: CMRIN and VL-NMS learn from referring expressions, and Flickr30K
# Entities holds captions with linked phrases (one caption query per sentence, one mention per phrase). When a
# phrase-grounding method (ReIR, BiCM) is registered, its `refground train` / `refground eval --method` steps
# go after `graph` below, reading the same features artifact.
#
# Usage: bash examples/flickr30k.sh --root DIR --images DIR --detector SPEC [options]
#   --root DIR         Flickr30K Entities: DIR/Sentences/, DIR/Annotations/, DIR/train.txt, val.txt, test.txt
#   --images DIR       the flickr30k-images folder
#   --detector SPEC    proposals: hf:PATH (a transformers object detector folder), mattnet:FILE (MAttNet
#                      detections JSON; needs --backbone), builtin:DATASET/NAME (a `refground train detector` run
#                      of another dataset in this cache) or builtin:/path/to/run
#   --backbone SPEC    region features: hf:PATH or builtin[:...]; the baseline reads boxes only, but a method
#                      trained later will want ground-truth object features (an hf: detector alone has none)
#   --dataset NAME     dataset name in the cache (default flickr30k)
#   --cache DIR        artifact root (default $REFGROUND_CACHE or ./cache)
#   --splits "A B"     evaluation splits (default "test")
#   --features NAME    features artifact name (default from the detector and backbone)
#   --max-proposals N  proposals stored per image (default 100)
# Environment: EXTRACT_ARGS (extra `refground extract` options, e.g. "--workers 8"), PYTHON (the interpreter
#   that has refground installed; default the one beside the `refground` command).
set -euo pipefail

ROOT="" IMAGES="" DETECTOR="" BACKBONE="" DATASET=flickr30k CACHE_DIR="" SPLITS=test FEATURES="" MAX_PROPOSALS=100
die() { echo "flickr30k.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || die "$1 needs a value (see the usage at the top of $0)"
  case "$1" in
    --root) ROOT=$2 ;; --images) IMAGES=$2 ;; --detector) DETECTOR=$2 ;; --backbone) BACKBONE=$2 ;;
    --dataset) DATASET=$2 ;; --cache) CACHE_DIR=$2 ;; --splits) SPLITS=$2 ;; --features) FEATURES=$2 ;;
    --max-proposals) MAX_PROPOSALS=$2 ;;
    *) die "unknown option $1 (see the usage at the top of $0)" ;;
  esac
  shift 2
done
[[ -n $ROOT && -n $IMAGES && -n $DETECTOR ]] || die "give --root DIR --images DIR --detector SPEC"
case "$DETECTOR" in
  mattnet:*) [[ -n $BACKBONE ]] || die "--detector $DETECTOR gives boxes only: add --backbone hf:PATH or builtin:DATASET/NAME" ;;
  hf:*|builtin:*) ;;
  *) die "--detector $DETECTOR: expected hf:PATH, mattnet:FILE, builtin:DATASET/NAME or builtin:/path/to/run" ;;
esac
# The artifact name is chosen here and given to every step (named as extract would).
source "$(dirname "${BASH_SOURCE[0]}")/_recipe.sh"   # short (the artifact name of a spec), run (echoed)
FEATURES=${FEATURES:-$(short "$DETECTOR")${BACKBONE:++$(short "$BACKBONE")}}
REFGROUND=$(command -v refground) || die "the refground command is not on PATH"
PYTHON=${PYTHON:-$(dirname "$REFGROUND")/python}
[[ -x $PYTHON ]] || PYTHON=python3
C=(--dataset "$DATASET")
[[ -z $CACHE_DIR ]] || C+=(--cache "$CACHE_DIR")

run refground data import-flickr30k --root "$ROOT" --images "$IMAGES" "${C[@]}"
# shellcheck disable=SC2086  # EXTRACT_ARGS is an option list, split on spaces on purpose
run refground extract --detector "$DETECTOR" ${BACKBONE:+--backbone "$BACKBONE"} --max-proposals "$MAX_PROPOSALS" \
    --features "$FEATURES" --no-dense "${C[@]}" ${EXTRACT_ARGS:-}
run refground graph --features "$FEATURES" "${C[@]}"   # what a phrase-grounding method will read

# The baseline's predictions: one phrase line per mention of every caption, the image's top proposal, written
# to <cache>/<dataset>/predictions/top-proposal/<features>.jsonl, whose path the snippet prints.
echo "+ $PYTHON - (the top-proposal baseline's predictions)" >&2
PRED=$("$PYTHON" - "$CACHE_DIR" "$DATASET" "$FEATURES" <<'EOF'
import sys

from refground.cache import RaggedH5, require
from refground.data.store import cache_root, load_named
from refground.eval.predictions import write_predictions
from refground.features.pipeline import features_path
from refground.structures import RaggedBoxes

cache, dataset, features = sys.argv[1] or None, sys.argv[2], sys.argv[3]
ds = load_named(dataset, cache)
path = features_path(dataset, cache, features)
require(path, "refground extract", check_parents=True)
with RaggedH5(path) as f:
    props = RaggedBoxes.read(f, "proposals")  # best first per image, images in dataset order
lines = []
for q in ds.queries("all", "caption"):
    boxes = props.group(ds.image_row(q.image_id))
    if len(boxes):  # an image without proposals leaves its phrases missing (counted as misses)
        lines += [{"query_id": q.id, "mention": m, "box": boxes[0].tolist()} for m in range(len(q.mentions))]
out = cache_root(cache) / dataset / "predictions" / "top-proposal" / f"{features}.jsonl"
out.parent.mkdir(parents=True, exist_ok=True)
write_predictions(out, lines)
print(f"wrote {out} ({len(lines)} phrases)", file=sys.stderr)
print(out)
EOF
)
for split in $SPLITS; do
  run refground eval --predictions "$PRED" --split "$split" "${C[@]}"
done
