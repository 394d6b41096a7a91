#!/usr/bin/env bash
# Train on one dataset, apply on another: the default world's detector and CMRIN run used, without retraining,
# on a second synthetic world generated with another seed (issue 15's acceptance check).
#   1. the second world (dataset OTHER, seed OTHER_SEED);
#   2. its features, extracted with the default world's detector (`--detector builtin:synth/default`, written
#      as features/detector-synth.default.h5) and their relation graphs;
#   3. `refground eval --method cmrin --run synth/RUN --dataset OTHER` on val, testA and testB, with
#      ground-truth objects and with the detector's top-10 proposals. The run keeps its own vocabulary: the
#      figures JSON lists the words of OTHER it never saw (run.unknown_words).
# The default world ("synth", its detector and the CMRIN run) must exist: `refground quickstart` makes them
# (run "cmrin"), or `refground train cmrin --run full` the 10-epoch run.
# Usage: bash examples/cross_dataset.sh [CACHE_DIR] [RUN] [OTHER] [OTHER_SEED] [NUM_IMAGES]
set -euo pipefail
CACHE=${1:-cache}
RUN=${2:-cmrin}
OTHER=${3:-synth-seed1}
OTHER_SEED=${4:-1}
NUM_IMAGES=${5:-5000}
set -x
refground data synth --dataset "$OTHER" --seed "$OTHER_SEED" --num-images "$NUM_IMAGES" --cache "$CACHE"
refground extract --dataset "$OTHER" --detector builtin:synth/default --no-dense --cache "$CACHE"
refground graph --dataset "$OTHER" --features detector-synth.default --cache "$CACHE"
for split in val testA testB; do
  refground eval --method cmrin --run "synth/$RUN" --dataset "$OTHER" --split "$split" --cache "$CACHE"
  refground eval --method cmrin --run "synth/$RUN" --dataset "$OTHER" --split "$split" --candidates proposals \
    --top-n 10 --cache "$CACHE"
done
