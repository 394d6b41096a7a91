"""ReIR as a pipeline step: train a run from captions and first-stage proposals, ground phrases, write predictions.

``train_reir`` trains on the train split's captions (image-caption pairs only: :mod:`refground.methods.reir.data`
enforces that no phrase-to-box link and no box of the caption's image reaches a weak variant's batches) with Adam
and a x0.1 step, keeps the epoch with the best val Acc (the paper selects its hyper-parameters on val) and
resumes after the last finished epoch. ``predict_reir_many`` writes one line per phrase, ``{"query_id",
"mention", "box"}``, to a predictions file that ``refground eval`` scores (Acc and PointIt per phrase kind).
The class-name baseline (:func:`class_name_boxes`: the proposal whose detector class best matches the phrase
head by word vectors, the highest detector confidence on ties) is the run name ``class-name``: it has nothing to
train, ``refground eval --method reir --run class-name`` writes and scores its predictions.

Run folder ``<cache>/<dataset>/runs/reir/<name>/`` (:mod:`refground.train`) plus ``vocab.json``,
``classes.json`` (the detector's class names the run's s^a read) and ``predictions/<split>.jsonl`` with a
manifest each.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.cache import parent, require, write_manifest
from refground.data.store import dataset_dir, load_dataset
from refground.errors import ArtifactError, UsageError
from refground.methods.reir.data import (CaptionTable, CaptionView, ProposalTable, phrase_truth,
                                         supervised_targets)
from refground.methods.reir.model import ReIR, ReIRConfig, reir_loss
from refground.progress import track
from refground.runs import local_run_name, resolve_run
from refground.text.vocab import Vocabulary
from refground.train import (MODEL_FILE, LoadedRun, RunSpec, best_epoch_figures, complete_run, config_params, fit,
                             load_run_folder, step_decay)

STEP = "train.reir@1"
PREDICT_STEP = "predict.reir@1"
EVAL_BATCH = 128
DEFAULT_FEATURES = "detector-default-rpn"
CLASS_NAME_RUN = "class-name"


def run_dir(dataset: str, cache: Any, name: str) -> Path:
    """``<cache>/<dataset>/runs/reir/<name>``."""
    return dataset_dir(dataset, cache).parent / "runs" / "reir" / local_run_name(name, "reir", dataset)


def features_path(dataset: str, cache: Any, features: str) -> Path:
    """``<cache>/<dataset>/features/<features>.h5``, which must be complete and current (a one-line error naming
    `refground extract --first-stage` otherwise)."""
    path = dataset_dir(dataset, cache).parent / "features" / f"{features}.h5"
    if not path.exists():
        raise ArtifactError(f"{path}: no proposals; run `refground extract --first-stage` (ReIR reads the detector's "
                            "first-stage proposals, features/detector-default-rpn.h5)")
    require(path, "refground extract --first-stage", check_parents=True)
    return path


def relations_path(dataset: str, cache: Any) -> Path:
    """``<cache>/<dataset>/pseudo/reir.h5`` (a one-line error naming `refground pseudo reir` when missing)."""
    from refground.methods.reir.pseudo import pseudo_path

    path = pseudo_path(dataset, cache)
    if not path.exists():
        raise ArtifactError(f"{path}: no relation labels; run `refground pseudo reir`")
    return path  # its completeness and staleness: load_pseudo_reir checks them when it reads it


def load_vectors(view: CaptionView, vocab: Vocabulary, word_vectors: Path | None, dim: int) -> Any:
    """GloVe vectors of ``word_vectors`` (the paper's off-the-shelf E_ext), else the toolkit's own vectors of the
    dataset's sentences, built without any mention-object link (:func:`refground.text.wordvec.toolkit_vectors`
    with ``grounded_weight=0``): weak supervision forbids them."""
    from refground.text.wordvec import load_glove, toolkit_vectors

    if word_vectors is not None:
        if not Path(word_vectors).is_file():
            raise UsageError(f"{word_vectors}: word-vector file not found")
        return load_glove(word_vectors, restrict_to=set(vocab.words) | {w.lower() for w in view.categories})
    return toolkit_vectors(view, dim=dim, grounded_weight=0.0)


def word_matrix(vocab: Vocabulary, vectors: Any, dim: int, seed: int) -> torch.Tensor:
    """float32[V, dim] initial embeddings: the word vector where ``vectors`` has the word (zero-padded or cut to
    ``dim``), else N(0, 0.1) from ``seed``; row 0 (padding) zero."""
    gen = np.random.default_rng([int(seed), 7])
    m = gen.normal(0.0, 0.1, size=(len(vocab), dim)).astype(np.float32)
    for i, w in enumerate(vocab.words):
        if i >= 2 and w in vectors:
            v = vectors.matrix[vectors.index[w]][:dim]
            m[i] = 0.0
            m[i, :len(v)] = v
    m[0] = 0.0
    return torch.from_numpy(m)


class Inputs:
    """Everything a run reads for a dataset: the weak view, the proposals, the relation labels, word vectors and
    the class names (built once, shared by the splits)."""

    def __init__(self, dataset: str, cache: Any, f_path: Path, r_path: Path, max_proposals: int) -> None:
        """``f_path`` and ``r_path``: the proposals and relation labels (:func:`features_path`,
        :func:`relations_path`), already located by the caller, whose fingerprints name them."""
        from refground.methods.reir.pseudo import load_pseudo_reir

        self.ds_dir = dataset_dir(dataset, cache)
        self.f_path, self.r_path = f_path, r_path
        self.ds = load_dataset(self.ds_dir)
        self.view = CaptionView.of(self.ds)
        if not len(self.view.query_rows("all", "caption")):
            raise UsageError(f"dataset {dataset!r} has no captions; ReIR grounds the phrases of captions "
                             "(`refground data synth` makes them; `refground data import-flickr30k` reads them)")
        self.proposals = ProposalTable.read(self.f_path, self.view, max_proposals)
        if not self.proposals.class_names:
            raise ArtifactError(f"{self.f_path}: no detector class names; ReIR's s^a needs them (run `refground "
                                "extract --first-stage` with the built-in detector)")
        self.relations = load_pseudo_reir(self.r_path)

    def table(self, split: str, vocab: Vocabulary, vectors: Any) -> CaptionTable:
        return CaptionTable.build(self.view, split, vocab, vectors, self.proposals.class_names, self.relations,
                                  self.proposals)


@torch.no_grad()
def ground(model: ReIR, table: CaptionTable, proposals: ProposalTable, description: str = "") -> np.ndarray:
    """The predicted box of every phrase, float32[Q, N, 4] (eq. 11's argmax, refined), model in eval mode."""
    model.eval()
    n = table.phrase_mask.shape[1]
    out = np.zeros((len(table), n, 4), np.float32)
    idx = np.arange(len(table))
    chunks = [idx[a:a + EVAL_BATCH] for a in range(0, len(idx), EVAL_BATCH)]
    for chunk in (track(chunks, total=len(chunks), description=description) if description else chunks):
        b = table.batch(proposals, chunk)
        res = model(b)
        out[chunk, :res["pred_boxes"].shape[1]] = res["pred_boxes"].numpy()
    return out


def accuracy(pred: np.ndarray, truth: list[list[np.ndarray | None]]) -> dict[str, float]:
    """Acc and PointIt (the metric module's definitions, union box of several) of predicted boxes float[Q, N, 4]
    against ``truth`` (:func:`refground.methods.reir.data.phrase_truth`), over the phrases with a true box."""
    from refground.eval.metrics import phrase_hits, pointit_hits

    boxes, gts = [], []
    for q, row in enumerate(truth):
        for i, gt in enumerate(row):
            if gt is not None:
                boxes.append(pred[q, i])
                gts.append(gt)
    if not boxes:
        return {"accuracy": float("nan"), "pointit": float("nan"), "phrases": 0}
    b = np.stack(boxes).astype(np.float64)
    return {"accuracy": float(phrase_hits(b, gts, "union").mean()), "pointit": float(pointit_hits(b, gts).mean()),
            "phrases": len(gts)}


def load_run(path: Path) -> LoadedRun:
    """Load a complete ReIR run folder (refuses an interrupted or missing one with a one-line error)."""
    return load_run_folder(path, "reir", ReIRConfig.from_dict, ReIR)


def train_reir(dataset: str, cache: Any = None, name: str = "reir", config: ReIRConfig | None = None,
               features: str = DEFAULT_FEATURES, word_vectors: Path | None = None, seed: int = 0,
               resume: bool = True, force: bool = False) -> dict[str, Any]:
    """Train ReIR on ``dataset``'s train captions into the run ``name`` from the proposals ``features/<features>.h5``
    and the relation labels ``pseudo/reir.h5``.

    Skips a complete run with the same fingerprint (config, seed, inputs) unless ``force``; resumes an interrupted
    one after its last epoch. Returns the run summary: ``run``, ``cache_hit``, ``resumed_from``, ``best_epoch``,
    ``train_seconds``, ``queries_per_s`` (captions), ``metrics`` (val Acc and PointIt at the best epoch),
    ``curve``."""
    t_start = time.perf_counter()
    config = config or ReIRConfig()
    if local_run_name(name, "reir", dataset) == CLASS_NAME_RUN:
        raise UsageError(f"--run {CLASS_NAME_RUN} is the class-name baseline (nothing to train); `refground eval "
                         f"--method reir --run {CLASS_NAME_RUN}` writes and scores it")
    ds_dir = dataset_dir(dataset, cache)
    f_path = features_path(dataset, cache, features)
    r_path = relations_path(dataset, cache)
    out = run_dir(dataset, cache, name)
    wv_parent = {"word_vectors": parent("file", word_vectors)} if word_vectors is not None else {}
    params = {"config": config_params(config.to_dict(), ("vocab_size", "visual_dim", "num_relations")),
              "seed": int(seed), "features": features, "word_vectors": "glove" if word_vectors is not None else
              "toolkit", "train_split": "train", "select_split": "val"}
    spec = RunSpec(out, STEP, params, {"dataset": parent("dataset", ds_dir), "features": parent("artifact", f_path),
                                       "relations": parent("artifact", r_path), **wv_parent}, kind="runs/reir")
    with spec.lock():
        result = spec.start(name, force, t_start)
        if result["cache_hit"]:
            return result
        inp = Inputs(dataset, cache, f_path, r_path, config.max_proposals)
        train_rows = inp.view.query_rows("train", "caption")
        vocab = Vocabulary.build((inp.view.query_texts[k].split(" ") for k in train_rows.tolist()),
                                 min_count=config.min_word_count)
        vectors = load_vectors(inp.view, vocab, word_vectors, config.word_dim)
        train = inp.table("train", vocab, vectors)
        val = inp.table("val", vocab, vectors)
        if not len(train):
            raise UsageError(f"dataset {dataset!r} has no training captions")
        val_truth = phrase_truth(inp.ds, val.query_ids, val.phrase_mask.shape[1])  # best-epoch selection only
        targets = None
        if config.supervised:  # the upper bound: the one variant whose batches carry phrase-box links
            targets = supervised_targets(phrase_truth(inp.ds, train.query_ids, train.phrase_mask.shape[1]), train,
                                         inp.proposals)
        config.vocab_size, config.visual_dim = len(vocab), int(inp.proposals.feats.shape[-1])
        config.num_relations = len(inp.relations.classes)
        state = spec.begin(config.to_dict(), vocab, resume, force)
        (out / "classes.json").write_text(json.dumps({"class_names": inp.proposals.class_names}))

        torch.manual_seed(seed)
        model = ReIR(config)
        model.load_word_vectors(word_matrix(vocab, vectors, config.word_dim, seed))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        epoch_of = {"epoch": 0}

        def batches(rng: np.random.Generator) -> list[np.ndarray]:
            return train.batches(config.batch_size, rng)

        def lr_at(epoch: int) -> float:
            epoch_of["epoch"] = epoch
            return step_decay(config.lr, config.lr_decay_epochs)(epoch)

        def train_step(index: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, int, dict[str, float]]:
            b = train.batch(inp.proposals, index, targets)
            res = model(b)
            loss, parts = reir_loss(model, res, b, epoch_of["epoch"] >= config.reg_warmup_epochs)
            return loss, len(b), parts

        def evaluate() -> dict[str, Any]:
            figs = accuracy(ground(model, val, inp.proposals), val_truth)
            return {"val_accuracy": round(figs["accuracy"], 5), "val_pointit": round(figs["pointit"], 5)}

        fr = fit(model, optimizer, spec, epochs=config.epochs, seed=seed, batches=batches, train_step=train_step,
                 evaluate=evaluate, select="val_accuracy", lr_at=lr_at, state=state, description="train reir")
        metrics = {"split": "val", "best_epoch": fr.best_epoch, **best_epoch_figures(fr)}
        result.update(spec.finish(fr, config.epochs, len(train), metrics),
                      seconds=round(time.perf_counter() - t_start, 3))
        return result


# --------------------------------------------------------------------------------------- class-name baseline
def class_name_boxes(table: CaptionTable, proposals: ProposalTable) -> np.ndarray:
    """The class-name baseline's box per phrase, float32[Q, N, 4]: the proposal of the caption's image whose
    detector class is most similar to the phrase head (eq. 3's s^a), the highest detector confidence on ties
    (and the first proposal on a tie of both)."""
    img = table.image_rows
    classes = proposals.classes[img]  # [Q, M]
    s_a = np.take_along_axis(table.class_sim, np.broadcast_to(classes[:, None, :], (len(table),
                             table.class_sim.shape[1], classes.shape[1])), axis=2)  # [Q, N, M]
    valid = proposals.mask[img][:, None, :]
    s_a = np.where(valid, s_a, -np.inf)
    best_sim = s_a.max(-1, keepdims=True)
    conf = np.where(s_a >= best_sim - 1e-6, proposals.scores[img][:, None, :], -np.inf)
    pick = conf.argmax(-1)  # [Q, N]
    return np.take_along_axis(proposals.boxes[img][:, None, :, :].repeat(table.class_sim.shape[1], 1),
                              pick[..., None, None].repeat(4, -1), axis=2)[:, :, 0]


# --------------------------------------------------------------------------------------------- predictions
def predictions_path(run: Path, split: str) -> Path:
    """``<run>/predictions/<split>.jsonl``."""
    return Path(run) / "predictions" / f"{split}.jsonl"


def _lines(table: CaptionTable, boxes: np.ndarray) -> list[dict[str, Any]]:
    lines = []
    for q in range(len(table)):
        for i in range(int(table.num_phrases[q])):
            lines.append({"query_id": int(table.query_ids[q]), "mention": i,
                          "box": [round(float(v), 3) for v in boxes[q, i]]})
    return lines


def predict_reir_many(dataset: str, cache: Any, name: str, splits: list[str], features: str | None = None,
                      force: bool = False) -> list[dict[str, Any]]:
    """Write (or find current) the predictions of run ``name`` (or the class-name baseline, ``class-name``) on each
    of ``splits``: one line per caption phrase, ``{"query_id", "mention", "box"}``. Returns ``{"path", "split",
    "status", ...}`` per split."""
    from refground.cache.lock import claim_current
    from refground.cache.manifest import parent_fingerprints
    from refground.eval.predictions import write_predictions

    baseline = name.rsplit("/", 1)[-1] == CLASS_NAME_RUN
    ds_dir = dataset_dir(dataset, cache)
    if baseline:
        path_run = run_dir(dataset, cache, name)
        feats = features or DEFAULT_FEATURES
        origin: Any = None
        run_parent = {}
    else:
        ref = resolve_run(name, "reir", dataset, cache)
        if not ref.local:
            raise UsageError(f"--run {name}: ReIR predicts on the dataset it was trained on (its proposals' class "
                             "names and relation labels); train a run on this dataset")
        m = complete_run(ref.path, "reir")
        path_run = ref.path
        feats = features or m.params.get("features", DEFAULT_FEATURES)
        origin = ref.origin(m.fingerprint)
        run_parent = {"run": parent("file", ref.path / MODEL_FILE)}
    f_path = features_path(dataset, cache, feats)
    r_path = relations_path(dataset, cache)
    parents = {**run_parent, "features": parent("artifact", f_path), "relations": parent("artifact", r_path),
               "dataset": parent("dataset", ds_dir)}
    parent_fps = parent_fingerprints(parents)
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as locks:
        todo = []
        jobs = [(predictions_path(path_run, split), {"split": split, "baseline": "class-name"} if baseline
                 else {"split": split}) for split in splits]
        for split, (path, params), (fp, hit) in zip(splits, jobs, claim_current(locks, jobs, PREDICT_STEP,
                                                                                parent_fps, force)):
            results.append({"path": str(path), "split": split, "status": "hit", "features": feats,
                            **({"run_origin": origin} if origin is not None else {})})
            if hit is None:
                todo.append((results[-1], path, split, params, fp))
            else:
                results[-1].update(hit)
        if not todo:
            return results
        if baseline:
            inp = Inputs(dataset, cache, f_path, r_path, ReIRConfig().max_proposals)
            rows = inp.view.query_rows("train", "caption")
            vocab = Vocabulary.build((inp.view.query_texts[k].split(" ") for k in rows.tolist()), min_count=1)
            vectors = load_vectors(inp.view, vocab, None, ReIRConfig().word_dim)
            model = None
        else:
            run = load_run(path_run)
            inp = Inputs(dataset, cache, f_path, r_path, run.config.max_proposals)
            classes = json.loads((path_run / "classes.json").read_text())["class_names"]
            if classes != inp.proposals.class_names:
                raise ArtifactError(f"{f_path}: its detector classes differ from those run {name} trained with")
            vocab = run.vocab
            wv = m.params.get("word_vectors", "toolkit")
            if wv != "toolkit":
                raise UsageError(f"run {name} was trained with GloVe vectors; predict with the same file is not "
                                 "wired yet: retrain with the toolkit's vectors")
            vectors = load_vectors(inp.view, vocab, None, run.config.word_dim)
            model = run.model
        for result, path, split, params, fp in todo:
            table = inp.table(split, vocab, vectors)
            t0 = time.perf_counter()
            boxes = class_name_boxes(table, inp.proposals) if model is None else \
                ground(model, table, inp.proposals, f"reir {split}")
            seconds = time.perf_counter() - t0
            lines = _lines(table, boxes)
            write_predictions(path, lines)
            ms = round(1000 * seconds / max(1, len(table)), 4)
            write_manifest(path, step=PREDICT_STEP, params=params, parents=parents, fingerprint=fp,
                           kind="predictions", extra={"captions": len(table), "phrases": len(lines),
                                                      "seconds": round(seconds, 3), "ms_per_caption": ms})
            result.update(status="written", captions=len(table), phrases=len(lines), ms_per_caption=ms)
    return results


def explain_caption(dataset: str, cache: Any, name: str, query_id: int) -> dict[str, Any]:
    """One caption through run ``name``: the image, the caption's tokens and phrase spans, and per phrase the
    top-K candidates (boxes refined by delta^c, their scores s^c and s = s^c s^f), the chosen box and the true
    boxes (for the figure). Keys: ``image_id``, ``tokens``, ``spans``, ``candidates`` list of float[K, 4],
    ``scores`` list of float[K], ``boxes`` float[N, 4], ``truth`` list of float[k, 4] or None, ``kinds``."""
    ref = resolve_run(name, "reir", dataset, cache)
    m = complete_run(ref.path, "reir")
    run = load_run(ref.path)
    inp = Inputs(dataset, cache, features_path(dataset, cache, m.params.get("features", DEFAULT_FEATURES)),
                 relations_path(dataset, cache), run.config.max_proposals)
    vectors = load_vectors(inp.view, run.vocab, None, run.config.word_dim)
    q = inp.ds.query(int(query_id))
    if q.task != "caption":
        raise UsageError(f"query {query_id} is an expression; ReIR grounds the phrases of captions")
    table = inp.table(q.split, run.vocab, vectors)
    where = np.nonzero(table.query_ids == int(query_id))[0]
    row = int(where[0])
    run.model.eval()
    with torch.no_grad():
        b = table.batch(inp.proposals, np.array([row]))
        res = run.model(b)
    n = int(table.num_phrases[row])
    if "top" in res:
        cands = res["boxes_f"][0, :n].numpy()
        scores = res["score"][0, :n].numpy()
    else:
        k = min(run.config.top_k, res["s_c"].shape[-1])
        order = res["s_c"][0, :n].argsort(-1, descending=True)[:, :k]
        cands = torch.gather(res["boxes_c"][0, :n], 1, order[..., None].expand(-1, -1, 4)).numpy()
        scores = torch.gather(res["s_c"][0, :n], 1, order).numpy()
    truth = phrase_truth(inp.ds, np.array([int(query_id)]), n)[0]
    return {"image_id": q.image_id, "tokens": q.tokens, "spans": [(m_.start, m_.end) for m_ in q.mentions[:n]],
            "candidates": list(cands), "scores": list(scores), "boxes": res["pred_boxes"][0, :n].numpy(),
            "truth": truth, "kinds": [m_.kind for m_ in q.mentions[:n]],
            "dataset": inp.ds}


__all__ = ["CLASS_NAME_RUN", "DEFAULT_FEATURES", "accuracy", "class_name_boxes", "explain_caption", "ground",
           "load_run", "predict_reir_many", "predictions_path", "run_dir", "train_reir"]
