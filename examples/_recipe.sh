# Shared by the real-data recipes (refcoco.sh, flickr30k.sh): sourced, not run.

# The features artifact name of a --detector / --backbone spec, as `refground extract` names it:
# detector-DATASET.NAME (builtin:DATASET/NAME), detector-NAME (builtin:NAME or a run folder), hf-<folder>,
# mattnet-<file>. The recipes choose it once and give it to every step, so they all read the same artifact.
short() {
  local kind=${1%%:*} s=${1#*:}
  s=${s%/}
  if [[ $kind == builtin && $s =~ ^[^/.~][^/]*/[^/]+$ ]]; then echo "detector-${s/\//.}"; return; fi
  s=${s##*/}
  echo "${kind/builtin/detector}-${s%.json}"
}

run() { { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2; "$@"; }  # echoed like set -x
