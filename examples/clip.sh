#!/usr/bin/env bash
# The built-in CLIP and retrieval on the default synthetic world: the README's figures for issue 19. Makes the web
# corpus, trains the built-in CLIP on it (never on the world), writes the world's CLIP artifact with the built-in
# detector's proposals, measures the zero-shot figures on val (`refground report clip`), searches it with faiss
# (text -> images, text -> regions, image -> queries, an IVF index, 4 shards) and runs the retrieval benchmark.
# Needs, in CACHE: the world and detector of `refground quickstart` (made here when missing).
# Usage: bash examples/clip.sh [CACHE_DIR]
set -euo pipefail
CACHE=${1:-./cache}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RG=refground
if [ -x "$ROOT/.venv/bin/refground" ]; then RG="$ROOT/.venv/bin/refground"; fi  # the checkout's venv, if any
run() { echo "+ $*" >&2; "$@"; }  # each command printed before it runs
run "$RG" data synth --preset web --cache "$CACHE"
run "$RG" train clip --cache "$CACHE"
run "$RG" data synth --cache "$CACHE"
run "$RG" train detector --cache "$CACHE"
run "$RG" extract --cache "$CACHE" --clip builtin
run "$RG" report clip --cache "$CACHE"
run "$RG" retrieve --cache "$CACHE" "a red star" --top-k 5 --out "$CACHE/synth/report/retrieve_images.png"
run "$RG" retrieve --cache "$CACHE" "the red star" --regions --top-k 5 --out "$CACHE/synth/report/retrieve_regions.png"
run "$RG" retrieve --cache "$CACHE" --image 1 --top-k 5
run "$RG" retrieve --cache "$CACHE" "a blue circle" --regions --index ivf --top-k 5
run "$RG" retrieve --cache "$CACHE" "a blue circle" --regions --shards 4 --top-k 5
run "$RG" bench retrieval
