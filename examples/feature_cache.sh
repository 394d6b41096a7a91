#!/usr/bin/env bash
# The feature cache on the default synthetic world: train the built-in detector, extract proposals, region
# features and dense maps, build the spatial relation graphs, then list and verify the cache. Every step is
# a cache hit when run again. Usage: bash examples/feature_cache.sh [CACHE_DIR]
# Two machines (or processes) can split the extraction: `refground extract --shard 1/2` on one and
# `--shard 2/2` on the other, then copy the .partial chunks together and run `refground extract merge`.
set -euo pipefail
CACHE=${1:-cache}
refground data synth --cache "$CACHE"
refground train detector --cache "$CACHE"
refground extract --cache "$CACHE"
refground graph --cache "$CACHE"
refground cache ls --cache "$CACHE"
refground cache verify --cache "$CACHE"
