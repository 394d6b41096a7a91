"""Applying a run to a dataset it was not trained on: which features artifact of that dataset it reads, and
what of the dataset's words it never saw.

A run learned on region features of one extractor (detector and backbone); on another dataset it must read
features of that same extractor, or its scores mean nothing. :func:`features_for_run` finds them by the
extractor's fingerprint (recorded in every features manifest), so a user need not know the artifact's name,
and says which ``refground extract`` writes them when there are none.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any


from refground.cache.manifest import MANIFEST_SUFFIX, read_manifest_of
from refground.errors import ArtifactError

log = logging.getLogger("refground")
# The parents of a features artifact that decide what its region features are.
SOURCE_ROLES = ("detector", "backbone")


def _source(manifest: Any) -> dict[str, str]:
    """``{"detector": fingerprint, "backbone": fingerprint}`` of a features manifest (roles it has)."""
    return {r: manifest.parents[r].fingerprint for r in SOURCE_ROLES if r in manifest.parents}


def _builtin_spec(path: str) -> str:
    """``builtin:DATASET/NAME`` for a detector run inside a cache, else ``builtin:<absolute folder>``."""
    p = Path(os.path.abspath(path))
    if p.parent.name == "detector" and p.parent.parent.name == "runs":
        return f"builtin:{p.parent.parent.parent.name}/{p.name}"
    return f"builtin:{p}"


def extract_command_like(manifest: Any, dataset: str) -> str:
    """The ``refground extract`` that gives ``dataset`` features of the extractor of ``manifest`` (a features
    artifact of another dataset): the same detector and backbone, spelled so they resolve from ``dataset``."""
    params, parents = manifest.params, manifest.parents
    parts = [f"refground extract --dataset {dataset}"]
    for role in SOURCE_ROLES:
        spec = str(params.get(role) or "")
        if not spec:
            continue
        kind = spec.partition(":")[0]
        if kind == "builtin" and role in parents:
            spec = _builtin_spec(parents[role].path)
        elif kind == "hf" and role in parents:
            spec = f"hf:{os.path.abspath(parents[role].path)}"
        parts.append(f"--{role} {spec}")
    return " ".join(parts)


def features_for_run(train_features: Path, dataset_root: Path, dataset: str, given: str | None = None,
                     needs: tuple[str, ...] = ()) -> str:
    """The features artifact name (``features/<name>.h5`` under ``dataset_root``, the dataset's folder in the
    cache) that a run trained on ``train_features`` (another dataset's artifact) reads on ``dataset``.

    ``given`` (the user's ``--features``) is taken as it is, with a warning when its extractor is known not to
    be the run's. Otherwise the one whose detector and backbone fingerprints are the training features' and
    that holds every section of ``needs`` (:data:`refground.features.contents.NEEDS`); none is a one-line
    ArtifactError with the ``refground extract`` that writes them."""
    from refground.features.contents import features_contents

    train = read_manifest_of(train_features)
    if given is not None:
        m = read_manifest_of(dataset_root / "features" / f"{given}.h5")
        if train is not None and m is not None and _source(m) != _source(train):
            log.warning("features %s of %s come from another extractor than the run's training features (%s): "
                        "its scores on them may mean little", given, dataset, train_features)
        return given
    if train is None:
        raise ArtifactError(f"{train_features}: the features the run was trained on are gone, so which extractor "
                            "it needs is unknown; give --features NAME of this dataset")
    want = _source(train)
    found = []
    folder = dataset_root / "features"
    for path in sorted(folder.glob(f"*.h5{MANIFEST_SUFFIX}")) if folder.is_dir() else []:
        artifact = path.with_name(path.name[: -len(MANIFEST_SUFFIX)])
        m = read_manifest_of(artifact)
        if m is not None and m.complete and _source(m) == want and artifact.is_file() and \
                all(features_contents(artifact).has(n) for n in needs):
            found.append(artifact.stem)
    if not found:
        what = f" with {', '.join(n.replace('_', ' ') for n in needs)}" if needs else ""
        raise ArtifactError(f"{folder}: no features of {dataset}{what} extracted with the run's extractor "
                            f"({train_features}); run `{extract_command_like(train, dataset)}`")
    name = Path(train_features).stem
    return name if name in found else found[0]


def split_unknown_words(ds: Any, split: str, vocab: Any, top: int = 20) -> dict[str, Any]:
    """:func:`unknown_words` of the expression queries of ``split`` of dataset ``ds``."""
    return unknown_words([ds._query_at(k).tokens for k in ds.query_rows(split, "expression").tolist()], vocab, top)


def unknown_words(tokens: list[list[str]], vocab: Any, top: int = 20) -> dict[str, Any]:
    """How much of ``tokens`` (one token list per query) a run's vocabulary (``vocab.index``: lower-cased word ->
    id, as :class:`refground.text.vocab.Vocabulary` looks words up) never saw: ``{"tokens",
    "unknown_tokens", "unknown_token_rate", "queries_with_unknown", "distinct_unknown", "top_unknown":
    [[word, count], ...]}`` (the ``top`` most frequent, ties by word)."""
    counts: Counter[str] = Counter()
    total = with_unknown = 0
    for words in tokens:
        total += sum(1 for w in words if w)
        missing = [w.lower() for w in words if w and w.lower() not in vocab.index]
        counts.update(missing)
        with_unknown += bool(missing)
    n_unknown = int(sum(counts.values()))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"tokens": int(total), "unknown_tokens": n_unknown,
            "unknown_token_rate": float(n_unknown / total) if total else float("nan"),
            "queries": len(tokens), "queries_with_unknown": int(with_unknown),
            "distinct_unknown": len(counts), "top_unknown": [[w, int(c)] for w, c in ranked]}


def check_feature_width(run_width: int, width: int, features: Path, run: Path) -> None:
    """A one-line ArtifactError when ``features`` (D = ``width``) cannot feed a run trained on D = ``run_width``."""
    if int(run_width) != int(width):
        raise ArtifactError(f"{features}: region features of width {width}, but the run {run} was trained on width "
                            f"{run_width}; extract this dataset's features with the run's extractor")


__all__ = ["check_feature_width", "extract_command_like", "features_for_run", "split_unknown_words", "unknown_words"]
