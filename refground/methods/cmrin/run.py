"""CMRIN as a pipeline step: train a run, load it, score queries, write predictions.

``train_cmrin`` trains on the ground-truth objects of the train split (the candidates of Sec. 4.2), keeps
the epoch with the best val Precision@1 (ground-truth candidates) and records the curve. ``predict_cmrin``
scores a split's expressions against ground-truth objects or the top-N detector proposals and writes a
predictions file (:mod:`refground.eval.predictions`) that ``refground eval`` scores like any other.

Run folder ``<cache>/<dataset>/runs/cmrin/<name>/`` (:mod:`refground.train`) plus ``vocab.json`` and
``predictions/<split>.<candidates>.jsonl`` (candidates ``gt`` or ``proposals<N>``) with a manifest each.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.cache import parent, require, write_manifest
from refground.cache import fingerprint as make_fingerprint
from refground.data.store import dataset_dir, load_dataset
from refground.errors import UsageError
from refground.features.pipeline import features_path
from refground.graph_artifact import graph_path
from refground.grounding.candidates import (CANDIDATE_NEEDS, HFLIP_WORDS, VFLIP_WORDS, CandidateSet, CandidateSpec,
                                            Flips, candidates_for, feature_stats, load_candidates, make_batch,
                                            require_candidate_sections)
from refground.grounding.queries import (QueryTable, encode_queries, encode_query_rows, flip_word_map,
                                         single_referent_rows)
from refground.methods.cmrin.model import CMRIN, CMRINConfig, triplet_loss
from refground.progress import track
from refground.runs import RunRef, local_run_name, resolve_run
from refground.text.vocab import Vocabulary
from refground.train import (MODEL_FILE, LoadedRun, RunSpec, best_epoch_figures, complete_run,
                             config_params, fit, load_run_folder, step_decay)

STEP = "train.cmrin@1"
PREDICT_STEP = "predict.cmrin@1"
EVAL_BATCH = 256


def run_dir(dataset: str, cache: Any, name: str) -> Path:
    """``<cache>/<dataset>/runs/cmrin/<name>``: where training writes (``name`` plain or ``<dataset>/NAME``)."""
    return dataset_dir(dataset, cache).parent / "runs" / "cmrin" / local_run_name(name, "cmrin", dataset)


def _inputs(dataset: str, cache: Any, features: str) -> tuple[Path, Path, Path]:
    """The dataset folder, features and graph files of ``features`` on ``dataset``, each required current; the
    remedies name the dataset and the artifact (a run applied to another dataset reads that dataset's)."""
    from refground.features.contents import DEFAULT_NAME, extract_command

    ds_dir = dataset_dir(dataset, cache)
    f_path = features_path(dataset, cache, features)
    g_path = graph_path(dataset, cache, features)
    require(f_path, extract_command(f_path, force=False), check_parents=True)
    graph = "refground graph" + (f" --dataset {dataset}" if dataset != "synth" else "") + \
        (f" --features {features}" if features != DEFAULT_NAME else "")
    require(g_path, graph, check_parents=True)
    return ds_dir, f_path, g_path


@torch.no_grad()
def score_queries(model: CMRIN, queries: QueryTable, cands: CandidateSet, index: np.ndarray | None = None,
                  batch_size: int = EVAL_BATCH, extras: bool = False, description: str = ""
                  ) -> list[dict[str, np.ndarray]]:
    """Scores of every candidate of each query (rows ``index`` of ``queries``, default all), in order.

    Each item: ``{"scores": float32[K]}`` and with ``extras`` the CMRE outputs where the variant has them:
    ``vertex_gates`` float32[K], ``edge_gates`` float32[11], ``word_types`` float32[T, 4].
    """
    model.eval()
    index = np.arange(len(queries)) if index is None else np.asarray(index, dtype=np.int64)
    out: list[dict[str, np.ndarray]] = []
    chunks = [index[i:i + batch_size] for i in range(0, len(index), batch_size)]
    for rows in (track(chunks, total=len(chunks), description=description) if description else chunks):
        b = make_batch(queries, cands, rows)
        res = model(**b.inputs())
        k = b.cand_mask.sum(1).tolist()
        t = (b.words != 0).sum(1).tolist()
        for n in range(len(rows)):
            item = {"scores": res["scores"][n, :k[n]].numpy().astype(np.float32)}
            if extras and "vertex_gates" in res:
                item["vertex_gates"] = res["vertex_gates"][n, :k[n]].numpy().astype(np.float32)
                item["edge_gates"] = res["edge_gates"][n].numpy().astype(np.float32)
                item["word_types"] = res["word_types"][n, :t[n]].numpy().astype(np.float32)
            out.append(item)
    return out


def precision_by_kind(hits: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """``{"precision@1": ..., "precision@1/<kind>": ...}`` from per-query hits (selection of the referent)."""
    kinds_arr = np.asarray(kinds)
    figs = {"precision@1": float(hits.mean()) if len(hits) else float("nan")}
    for k in sorted(set(kinds)):
        if k:
            figs[f"precision@1/{k}"] = float(hits[kinds_arr == k].mean())
    return figs


def _gt_hits(model: CMRIN, queries: QueryTable, cands: CandidateSet) -> np.ndarray:
    scored = score_queries(model, queries, cands)
    best = np.array([int(np.argmax(s["scores"])) for s in scored])
    return best == queries.targets


def load_run(path: Path) -> LoadedRun:
    """Load a complete CMRIN run folder (refuses an interrupted or missing one with a one-line error)."""
    return load_run_folder(path, "cmrin", CMRINConfig.from_dict, CMRIN)


def train_cmrin(dataset: str, cache: Any = None, name: str = "default", config: CMRINConfig | None = None,
                features: str = "detector-default", seed: int = 0, resume: bool = True, force: bool = False
                ) -> dict[str, Any]:
    """Train CMRIN on ``dataset``'s train split (ground-truth objects as candidates) into the run ``name``.

    Needs the features artifact ``features`` and its graph artifact. Skips a complete run with the same
    fingerprint (config, seed, inputs) unless ``force``; resumes an interrupted one after its last epoch.
    Returns the run summary: ``run``, ``cache_hit``, ``resumed_from``, ``best_epoch``, ``train_seconds``,
    ``queries_per_s``, ``metrics`` (val Precision@1 overall and per kind at the best epoch), ``curve``.
    """
    t_start = time.perf_counter()
    config = config or CMRINConfig()
    # What the features lack is said first (before "run `refground graph`", before any loading).
    require_candidate_sections(features_path(dataset, cache, features), ("gt",), "`refground train cmrin`")
    ds_dir, f_path, g_path = _inputs(dataset, cache, features)
    out = run_dir(dataset, cache, name)
    params = {"config": config_params(config.to_dict()),
              "seed": int(seed), "features": features, "train_split": "train", "select_split": "val"}
    spec = RunSpec(out, STEP, params, {"dataset": parent("dataset", ds_dir), "features": parent("artifact", f_path),
                                       "graph": parent("artifact", g_path)}, kind="runs/cmrin")
    with spec.lock():  # one writer per run folder, from the cache-hit check to the complete manifest
        result = spec.start(name, force, t_start)
        if result["cache_hit"]:
            return result
        ds = load_dataset(ds_dir)
        cands = load_candidates(ds, f_path, "gt", graph_file=g_path)
        vocab = Vocabulary.of_split(ds, "train", config.min_word_count)
        train_q = encode_queries(ds, "train", vocab)
        val_q = encode_queries(ds, "val", vocab)
        usable = single_referent_rows(train_q, dataset)
        config.vocab_size, config.visual_dim = len(vocab), cands.feature_dim
        state = spec.begin(config.to_dict(), vocab, resume, force)

        torch.manual_seed(seed)
        model = CMRIN(config)
        model.set_feature_stats(*feature_stats(cands, np.unique(train_q.image_rows)))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        val_ok = val_q.targets >= 0

        def batches(rng: np.random.Generator) -> list[np.ndarray]:
            perm = usable[rng.permutation(len(usable))]
            return [perm[i:i + config.batch_size] for i in range(0, len(perm), config.batch_size)]

        h_words, v_words = flip_word_map(vocab, HFLIP_WORDS), flip_word_map(vocab, VFLIP_WORDS)

        def train_step(rows: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, int]:
            flips = None
            if config.flip_augment:
                coins = (torch.rand(len(rows), 2, generator=gen) < 0.5).numpy()
                flips = Flips(coins[:, 0], coins[:, 1], h_words, v_words)
            b = make_batch(train_q, cands, rows, flips)
            return triplet_loss(model(**b.inputs())["scores"], b.targets, config.margin, gen), len(rows)

        def evaluate() -> dict[str, Any]:
            hits = _gt_hits(model, val_q, cands)[val_ok]
            kinds = [val_q.kinds[i] for i in np.flatnonzero(val_ok)]
            return {f"val_{k}": round(v, 5) for k, v in precision_by_kind(hits, kinds).items()}

        fr = fit(model, optimizer, spec, epochs=config.epochs, seed=seed, batches=batches, train_step=train_step,
                 evaluate=evaluate, select="val_precision@1", lr_at=step_decay(config.lr, config.lr_decay_epochs), state=state, description="train cmrin")
        metrics = {"split": "val", "candidates": "gt", "best_epoch": fr.best_epoch, **best_epoch_figures(fr)}
        result.update(spec.finish(fr, config.epochs, len(usable), metrics), seconds=round(time.perf_counter() - t_start, 3))
        return result


def predictions_path(run: Path, split: str, spec: CandidateSpec, folder: Path | None = None,
                     features: str | None = None) -> Path:
    """``<run>/predictions/<split>.<candidates tag>.jsonl``; for a run applied to another dataset than its own,
    ``folder`` (that dataset's ``predictions/cmrin/<run tag>``) instead of the run's ``predictions``; with
    ``features`` (a features artifact the user chose over the run's own) ``<split>.<tag>.<features>.jsonl``, so
    predictions on two artifacts never replace each other."""
    name = f"{split}.{spec.tag}" + (f".{features}" if features else "") + ".jsonl"
    return (Path(folder) if folder is not None else Path(run) / "predictions") / name


def predict_cmrin(dataset: str, cache: Any, name: str, split: str, spec: CandidateSpec = CandidateSpec(),
                  force: bool = False, features: str | None = None) -> dict[str, Any]:
    """Write (or find current) the predictions of run ``name`` on ``split``: for every expression query its
    ranked candidates (``boxes``, ``scores``; ``box`` the top one). Returns ``{"path", "status", ...}``."""
    return predict_cmrin_many(dataset, cache, name, [(split, spec)], force, features)[0]


def resolve_for(dataset: str, cache: Any, name: str, features: str | None = None,
                sources: tuple[str, ...] = ("gt",)) -> tuple[RunRef, Any, Path, Path, Path]:
    """The run ``name`` (``NAME``, ``DATASET/NAME`` or a folder: :func:`refground.runs.resolve_run`) as applied
    to ``dataset``: ``(ref, manifest, dataset folder, features file, graph file)``. The features are ``features``
    if given, else the run's own on its own dataset, and on another dataset the artifact extracted with the
    extractor the run was trained on that holds what the candidate ``sources`` read
    (:func:`refground.grounding.transfer.features_for_run`)."""
    from refground.data.store import cache_root
    from refground.grounding.transfer import features_for_run

    ref = resolve_run(name, "cmrin", dataset, cache)
    m = complete_run(ref.path, "cmrin")
    if ref.local:
        features = features or m.params.get("features", "detector-default")
    else:
        train_features = m.parents.get("features")
        if train_features is None and features is None:
            raise UsageError(f"{ref.path}: the run records no features artifact; give --features NAME")
        needs = tuple(dict.fromkeys(n for src in sources for n in CANDIDATE_NEEDS.get(src, ())))
        features = features_for_run(Path(train_features.path), cache_root(cache) / dataset, dataset, features,
                                    needs) if train_features is not None else features
    ds_dir, f_path, g_path = _inputs(dataset, cache, features)
    return ref, m, ds_dir, f_path, g_path


def predict_cmrin_many(dataset: str, cache: Any, name: str, jobs: list[tuple[str, CandidateSpec]],
                       force: bool = False, features: str | None = None) -> list[dict[str, Any]]:
    """:func:`predict_cmrin` for several ``(split, candidates)`` at once: the run, the dataset and each
    per-image candidate set are loaded once, and only when some predictions file is missing or stale.
    Candidates come through the shared interface (:func:`refground.grounding.candidates.candidates_for`):
    ground-truth objects, the detector's proposals, or any query-aware proposal set.

    ``name`` may be another dataset's run (``DATASET/NAME``) or a run folder: it is applied as trained (its
    vocabulary, its feature statistics) to ``dataset``'s features of the same extractor, and its predictions go
    to ``<cache>/<dataset>/predictions/cmrin/<DATASET.NAME>/``; the manifest records the run's origin and every
    result the words of the split the run never saw (``unknown_words``)."""
    from refground.cache.manifest import parent_fingerprints
    from refground.data.store import cache_root

    sources = tuple(dict.fromkeys(spec.source for _, spec in jobs))
    ref, m, ds_dir, f_path, g_path = resolve_for(dataset, cache, name, features, sources)
    require_candidate_sections(f_path, sources)  # before any loading
    folder = None if ref.local else cache_root(cache) / dataset / "predictions" / "cmrin" / ref.tag
    # An artifact the user chose over the run's own training features gets its own predictions files.
    suffix = features if features is not None and features != m.params.get("features") else None
    parents = {"run": parent("file", ref.path / MODEL_FILE), "features": parent("artifact", f_path),
               "graph": parent("artifact", g_path), "dataset": parent("dataset", ds_dir)}
    parent_fps = parent_fingerprints(parents)
    # Each predictions file is written by one process at a time: its lock is held from its cache-hit check to
    # its manifest (a second `eval` of the same run and split is refused, not raced).
    with contextlib.ExitStack() as locks:
        return _predict_locked(locks, dataset, cache, ref, ref.origin(m.fingerprint), (folder, suffix), jobs, force,
                               ds_dir, f_path, g_path, parents, parent_fps)


def _predict_locked(locks: contextlib.ExitStack, dataset: str, cache: Any, ref: RunRef, origin: dict[str, Any],
                    where: tuple[Path | None, str | None], jobs: list[tuple[str, CandidateSpec]], force: bool,
                    ds_dir: Path, f_path: Path, g_path: Path, parents: dict[str, Any], parent_fps: dict[str, str]
                    ) -> list[dict[str, Any]]:
    """:func:`predict_cmrin_many` after the inputs are checked; takes each predictions file's lock into
    ``locks`` before looking at it. ``where``: the predictions folder (None: the run's) and features suffix
    of :func:`predictions_path`."""
    from refground.cache import current_extra, current_fingerprint
    from refground.cache.lock import artifact_lock
    from refground.eval.predictions import write_predictions
    from refground.grounding.transfer import check_feature_width, split_unknown_words

    out = ref.path
    results: list[dict[str, Any]] = []
    todo = []
    for split, spec in jobs:
        path = predictions_path(out, split, spec, *where)
        locks.enter_context(artifact_lock(path))
        params = {"split": split, "source": spec.key, "top_n": int(spec.top_n) if spec.source != "gt" else 0}
        p_path = spec.proposals_file(dataset, cache, split)
        if p_path is not None:
            require(p_path, f"refground vlnms --run {spec.run} --split {split}", check_parents=True)
            params["proposals"] = current_fingerprint("artifact", p_path)
        fp = make_fingerprint(PREDICT_STEP, params, parent_fps)
        results.append({"path": str(path), "split": split, "candidates": spec.tag, "status": "hit",
                        "features": f_path.stem, "run_origin": origin})
        hit = current_extra(path, fp, force)
        if hit is None:
            todo.append((results[-1], path, split, spec, p_path, params, fp))
        else:
            results[-1].update(hit)
    if not todo:
        return results
    run = load_run(out)
    ds = load_dataset(ds_dir)
    cand_sets: dict[CandidateSpec, CandidateSet] = {}
    for result, path, split, spec, p_path, params, fp in todo:
        queries = encode_queries(ds, split, run.vocab)
        if p_path is not None:  # per split: the proposals are the split's queries'
            cands, queries = candidates_for(ds, spec, queries, f_path, g_path, p_path)
        else:
            if spec not in cand_sets:
                cand_sets[spec] = candidates_for(ds, spec, queries, f_path, g_path)[0]
            cands = cand_sets[spec]
        check_feature_width(run.config.visual_dim, cands.feature_dim, f_path, out)
        unknown = split_unknown_words(ds, split, run.vocab)
        t0 = time.perf_counter()
        scored = score_queries(run.model, queries, cands, description=f"cmrin {split} ({spec.tag})")
        seconds = time.perf_counter() - t0
        lines = []
        for n, sc in enumerate(scored):
            r = int(queries.image_rows[n])
            order = np.argsort(-sc["scores"], kind="stable")
            boxes = cands.group(r)[order]
            if len(boxes) == 0:
                continue  # no candidate: the query counts as a miss
            lines.append({"query_id": int(queries.query_ids[n]), "box": boxes[0].tolist(),
                          "boxes": boxes.tolist(), "scores": sc["scores"][order].tolist()})
        write_predictions(path, lines)
        ms = round(1000 * seconds / max(1, len(queries)), 4)
        write_manifest(path, step=PREDICT_STEP, params=params, parents=parents, fingerprint=fp, kind="predictions",
                       extra={"queries": len(lines), "seconds": round(seconds, 3), "ms_per_query": ms,
                              "unknown_words": unknown, "run_origin": origin})
        result.update(status="written", queries=len(lines), ms_per_query=ms, unknown_words=unknown)
    return results


def explain_query(dataset: str, cache: Any, name: str, query_id: int, spec: CandidateSpec = CandidateSpec(),
                  features: str | None = None) -> dict[str, Any]:
    """Everything Figure 4 draws for one query: ``query`` (record), ``boxes`` float32[K, 4], ``scores``
    float32[K] (eq. 8), ``vertex_gates`` float32[K] (eq. 4; absent for the global-language variants),
    ``edge_gates`` float32[11], ``word_types`` float32[T, 4], ``tokens`` list[str], ``candidates`` tag."""
    ds = load_dataset(dataset_dir(dataset, cache))
    q = ds.query(query_id)
    if q.task != "expression":
        raise UsageError(f"query {query_id} is a caption; CMRIN grounds referring expressions")
    ref, _, _, f_path, g_path = resolve_for(dataset, cache, name, features, (spec.source,))
    run = load_run(ref.path)
    table = encode_query_rows(ds, np.array([ds.query_row(q.id)]), run.vocab)
    cands, table = candidates_for(ds, spec, table, f_path, g_path, spec.proposals_file(dataset, cache, q.split))
    item = score_queries(run.model, table, cands, extras=True)[0]
    r = int(table.image_rows[0])
    return {"query": q, "tokens": q.tokens, "boxes": cands.group(r),
            "candidates": spec.tag, **item}

