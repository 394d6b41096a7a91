#!/usr/bin/env bash
# Generate a small synthetic world, write it as RefCOCO-style and Flickr30K-style files, import both back
# and compare their statistics. Usage: bash examples/data_roundtrip.sh [CACHE_DIR]
set -euo pipefail
CACHE=${1:-cache}
refground data synth --num-images 200 --dataset synth_small --cache "$CACHE"
refground data export --dataset synth_small --format refer --corpus refcoco --out-dir "$CACHE/export/refer" --cache "$CACHE"
refground data export --dataset synth_small --format flickr30k --out-dir "$CACHE/export/flickr30k" --cache "$CACHE"
refground data import-refcoco --root "$CACHE/export/refer" --corpus refcoco --split-by unc \
    --images "$CACHE/export/refer/images" --dataset synth_small_refer --cache "$CACHE" --force
refground data import-flickr30k --root "$CACHE/export/flickr30k" --images "$CACHE/export/flickr30k/flickr30k_images" \
    --dataset synth_small_flickr --cache "$CACHE" --force
for d in synth_small synth_small_refer synth_small_flickr; do
    refground data stats --dataset "$d" --cache "$CACHE" --json
done
