"""LTS as a pipeline step: train a run on cached dense maps, load it, segment queries, write predictions.

``train_lts`` trains on the train split's expressions (their referents' masks; fully supervised like the
paper) with Adam and a x0.1 step at 2/3 of the epochs, keeps the epoch with the best val overall IoU and
resumes after the last finished epoch. ``predict_lts_many`` writes, per expression of a split, the predicted
mask (COCO RLE), its bounding box and the localisation heatmap's maximum (``point``) to a predictions file
that ``refground eval`` scores like any other (:mod:`refground.eval.predictions`).

Run folder ``<cache>/<dataset>/runs/lts/<name>/`` (:mod:`refground.train`) plus ``vocab.json`` and
``predictions/<split>.jsonl`` with a manifest each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground import masks as rmasks
from refground.cache import parent, require, write_manifest
from refground.data.model import Dataset
from refground.data.store import dataset_dir, load_dataset
from refground.errors import DataError, UsageError
from refground.grounding.queries import QueryTable, encode_queries, encode_query_rows
from refground.methods.lts.data import (
    DenseMaps,
    Window,
    decode_targets,
    mask_targets,
    referent_masks,
    windows_of,
)
from refground.methods.lts.model import (
    LTS,
    LTSConfig,
    heatmap_points,
    lts_loss,
    upsample_probabilities,
)
from refground.progress import track
from refground.runs import local_run_name, resolve_run
from refground.text.vocab import Vocabulary
from refground.train import (
    MODEL_FILE,
    LoadedRun,
    RunSpec,
    best_epoch_figures,
    complete_run,
    config_params,
    fit,
    load_run_folder,
    step_decay,
)

STEP = "train.lts@1"
PREDICT_STEP = "predict.lts@1"
EVAL_BATCH = 128
DEFAULT_DENSE = "detector-default"


def run_dir(dataset: str, cache: Any, name: str) -> Path:
    """``<cache>/<dataset>/runs/lts/<name>``."""
    return dataset_dir(dataset, cache).parent / "runs" / "lts" / local_run_name(name, "lts", dataset)


def dense_path(dataset: str, cache: Any, dense: str) -> Path:
    """``<cache>/<dataset>/dense/<dense>.zarr``, required complete and current (else a one-line ArtifactError
    naming the extract command)."""
    path = dataset_dir(dataset, cache).parent / "dense" / f"{dense}.zarr"
    flag = f" --dataset {dataset}" if dataset != "synth" else ""
    name = "" if dense == DEFAULT_DENSE else f" --name {dense}"
    require(path, f"refground extract{flag}{name} --dense", check_parents=True)
    return path


def training_precision(config: LTSConfig) -> str:
    """``config.train_precision`` with "auto" resolved as the detector's (bfloat16 on CPUs with native
    bfloat16 instructions, else float32)."""
    from refground.features.detector_train import native_bfloat16

    if config.train_precision != "auto":
        return config.train_precision
    return "bfloat16" if native_bfloat16() else "float32"


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Batch:
    """A training batch: the window it reads (index into the epoch's windows) and the query indices, int64[B].
    ``len`` and slicing are those of the indices (what :func:`refground.distributed.shard` cuts)."""

    __slots__ = ("index", "window")

    def __init__(self, window: int, index: np.ndarray) -> None:
        self.window, self.index = int(window), np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: slice) -> Batch:
        return Batch(self.window, self.index[item])


class SplitData:
    """One split's expressions for LTS: ``queries`` (:class:`QueryTable`), ``zrows`` int64[Q] (zarr row of each
    query's image), ``sizes`` int64[Q, 2] (image height, width), ``windows`` (sorted zarr rows per block of
    images) and, with ``masks``, ``gt`` (referent RLEs) and ``targets`` ({4, 8}: uint8 shares,
    :func:`refground.methods.lts.data.mask_targets`)."""

    def __init__(self, ds: Dataset, split: str, vocab: Vocabulary, dense: DenseMaps, window_images: int,
                 masks: bool, command: str = "refground train lts", rows: np.ndarray | None = None) -> None:
        self.queries: QueryTable = encode_queries(ds, split, vocab) if rows is None else \
            encode_query_rows(ds, rows, vocab)
        q_rows = ds.query_rows(split, "expression") if rows is None else np.asarray(rows, dtype=np.int64)
        self.zrows = dense.rows_of(self.queries.image_rows)
        img = self.queries.image_rows
        self.sizes = np.stack([np.asarray(ds.image_height)[img], np.asarray(ds.image_width)[img]], 1).astype(np.int64)
        self.windows = windows_of(self.zrows, window_images)
        self.gt = referent_masks(ds, q_rows, command) if masks else None
        self.targets = mask_targets(self.gt, dense.frame) if masks else None

    def __len__(self) -> int:
        return len(self.queries)

    def in_window(self, w: int) -> np.ndarray:
        """Indices of the queries whose image is in window ``w``, in query order."""
        return np.flatnonzero(np.isin(self.zrows, self.windows[w]))

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> list[Batch]:
        """Batches window by window: with ``rng`` the windows in random order and the queries of each window
        shuffled (training), else in order (evaluation)."""
        order = rng.permutation(len(self.windows)) if rng is not None else np.arange(len(self.windows))
        out = []
        for w in order.tolist():
            idx = self.in_window(w)
            if rng is not None:
                idx = idx[rng.permutation(len(idx))]
            out += [Batch(w, idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]
        return out

    def words(self, index: np.ndarray) -> torch.Tensor:
        w = self.queries.words[index]
        return torch.from_numpy(w[:, :max(1, int((w != 0).sum(1).max()))])


class WindowReader:
    """Reads the dense maps of one window at a time (a contiguous read per level), keeping the last one: batches
    come window by window, so each window is read once per pass."""

    def __init__(self, dense: DenseMaps, data: SplitData) -> None:
        self.dense, self.data = dense, data
        self._key: int | None = None
        self._win: Window | None = None

    def get(self, w: int) -> Window:
        if self._key != w:
            self._win = None  # frees the last window before the next is read
            rows = self.data.windows[w]
            self._win = Window(rows, self.dense.read(rows))
            self._key = w
        assert self._win is not None
        return self._win

    def inputs(self, batch: Batch) -> list[torch.Tensor]:
        """F_v1, F_v2, F_v3 float32 Tensors of the batch's queries."""
        return self.get(batch.window).gather(self.data.zrows[batch.index])


def word_matrix(vocab: Vocabulary, vectors: Any, dim: int, seed: int) -> torch.Tensor:
    """float32[V, dim] initial embeddings: the word vector where ``vectors`` has the word, else N(0, 0.1) from
    ``seed`` (row 0, padding, zero)."""
    gen = np.random.default_rng([int(seed), 7])
    m = gen.normal(0.0, 0.1, size=(len(vocab), dim)).astype(np.float32)
    for i, w in enumerate(vocab.words):
        if i >= 2 and w in vectors:
            m[i] = vectors.matrix[vectors.index[w]]
    m[0] = 0.0
    return torch.from_numpy(m)


def load_vectors(ds: Dataset, vocab: Vocabulary, word_vectors: Path | None, dim: int, seed: int) -> Any:
    """GloVe vectors of ``word_vectors`` restricted to the vocabulary, else the toolkit's own of ``ds``."""
    from refground.text.wordvec import load_glove, toolkit_vectors

    if word_vectors is not None:
        if not Path(word_vectors).is_file():
            raise UsageError(f"{word_vectors}: word-vector file not found")
        return load_glove(word_vectors, restrict_to=set(vocab.words))
    return toolkit_vectors(ds, dim=dim, seed=seed)


@torch.no_grad()
def segment(model: LTS, inputs: list[torch.Tensor], words: torch.Tensor, sizes: np.ndarray,
            threshold: float) -> dict[str, Any]:
    """Run ``model`` (eval mode) on a batch and bring its outputs to each image's size: ``masks`` list of bool
    Tensor[H, W], ``probs`` list of float Tensor[H, W] (upsampled P_mask), ``heatmap`` float Tensor[B, h, w]
    (sigmoid of the localisation map at stride 8), ``points`` float Tensor[B, 2] (its maximum, image x, y)."""
    out = model(*inputs, words)
    probs: list[torch.Tensor] = [torch.empty(0)] * len(words)
    points = torch.zeros(len(words), 2)
    keys = [tuple(int(v) for v in s) for s in sizes]
    for size in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == size]
        p = upsample_probabilities(out["mask"][idx], size)
        points[idx] = heatmap_points(out["heatmap"][idx], size)
        for j, i in enumerate(idx):
            probs[i] = p[j]
    return {"probs": probs, "masks": [p > threshold for p in probs], "heatmap": torch.sigmoid(out["heatmap"]),
            "points": points}


def _pass(model: LTS, dense: DenseMaps, data: SplitData, threshold: float, description: str = ""
          ) -> Iterator[tuple[Batch, dict[str, Any]]]:
    """:func:`segment` over a whole split, window by window, in batches of :data:`EVAL_BATCH`."""
    reader = WindowReader(dense, data)
    batches = data.batches(EVAL_BATCH)
    for b in (track(batches, total=len(batches), description=description) if description else batches):
        yield b, segment(model, reader.inputs(b), data.words(b.index), data.sizes[b.index], threshold)


def evaluate_split(model: LTS, dense: DenseMaps, data: SplitData, threshold: float) -> dict[str, float]:
    """Overall IoU, mean IoU, prec@0.5..0.9 and localisation accuracy (the heatmap's maximum inside the
    referent mask) of ``model`` on ``data`` (which holds ground truth), with the metric module's definitions."""
    from refground.eval.metrics import mask_stats_from_counts, point_in_mask

    assert data.gt is not None
    inter = np.zeros(len(data), dtype=np.int64)
    union = np.zeros(len(data), dtype=np.int64)
    loc = np.zeros(len(data), dtype=bool)
    model.eval()
    for b, res in _pass(model, dense, data, threshold):
        for j, i in enumerate(b.index.tolist()):
            gt = torch.from_numpy(rmasks.decode(data.gt[i]))
            pred = res["masks"][j]
            inter[i] = int((pred & gt).sum())
            union[i] = int((pred | gt).sum())
            loc[i] = bool(point_in_mask(res["points"][j:j + 1].numpy(), gt.numpy())[0])
    stats = mask_stats_from_counts(inter, union)
    return {**stats, "loc_acc": float(loc.mean()) if len(loc) else float("nan")}


def load_run(path: Path) -> LoadedRun:
    """Load a complete LTS run folder (refuses an interrupted or missing one with a one-line error)."""
    return load_run_folder(path, "lts", LTSConfig.from_dict, LTS)


def train_lts(dataset: str, cache: Any = None, name: str = "lts", config: LTSConfig | None = None,
              dense: str = DEFAULT_DENSE, word_vectors: Path | None = None, seed: int = 0, resume: bool = True,
              force: bool = False) -> dict[str, Any]:
    """Train LTS on ``dataset``'s train split into the run ``name`` from the dense maps ``dense/<dense>.zarr``.

    Skips a complete run with the same fingerprint (config, seed, inputs) unless ``force``; resumes an
    interrupted one after its last epoch. Returns the run summary: ``run``, ``cache_hit``, ``resumed_from``,
    ``best_epoch``, ``train_seconds``, ``queries_per_s``, ``metrics`` (val overall IoU, mean IoU, prec@X and
    localisation accuracy at the best epoch), ``curve``, ``precision`` (float32 or bfloat16 autocast).
    """
    t_start = time.perf_counter()
    config = config or LTSConfig()
    ds_dir = dataset_dir(dataset, cache)
    d_path = dense_path(dataset, cache, dense)
    out = run_dir(dataset, cache, name)
    precision = training_precision(config)
    wv_parent = {"word_vectors": parent("file", word_vectors)} if word_vectors is not None else {}
    params = {"config": config_params(config.to_dict(), ("vocab_size", "visual_dims")), "seed": int(seed),
              "dense": dense, "word_vectors": "glove" if word_vectors is not None else "toolkit",
              "precision": precision, "train_split": "train", "select_split": "val"}
    spec = RunSpec(out, STEP, params, {"dataset": parent("dataset", ds_dir), "dense": parent("artifact", d_path),
                                       **wv_parent}, kind="runs/lts")
    with spec.lock():
        result = spec.start(name, force, t_start)
        if result["cache_hit"]:
            return result
        ds = load_dataset(ds_dir)
        maps = DenseMaps(d_path, ds)
        vocab = Vocabulary.of_split(ds, "train", config.min_word_count)
        train = SplitData(ds, "train", vocab, maps, config.window_images, masks=True)
        val = SplitData(ds, "val", vocab, maps, config.window_images, masks=True)
        vectors = load_vectors(ds, vocab, word_vectors, config.word_dim, seed)
        config.vocab_size, config.visual_dims, config.word_dim = len(vocab), maps.channels, int(vectors.dim)
        state = spec.begin(config.to_dict(), vocab, resume, force)

        torch.manual_seed(seed)
        model = LTS(config)
        model.load_word_vectors(word_matrix(vocab, vectors, config.word_dim, seed))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        reader = WindowReader(maps, train)

        def batches(rng: np.random.Generator) -> list[Batch]:
            return train.batches(config.batch_size, rng)

        def train_step(b: Batch, gen: torch.Generator) -> tuple[torch.Tensor, int, dict[str, float]]:
            inputs = reader.inputs(b)
            with _autocast(precision):
                out = model(*inputs, train.words(b.index))
            out = {k: v.float() for k, v in out.items()}
            loss, parts = lts_loss(out, decode_targets(train.targets[4][b.index]),
                                   decode_targets(train.targets[8][b.index]), config)
            return loss, len(b), parts

        def evaluate() -> dict[str, Any]:
            figs = evaluate_split(model, maps, val, config.threshold)
            return {f"val_{k}": round(v, 5) for k, v in figs.items()}

        fr = fit(model, optimizer, spec, epochs=config.epochs, seed=seed, batches=batches, train_step=train_step,
                 evaluate=evaluate, select="val_overall_iou", lr_at=step_decay(config.lr, config.lr_decay_epochs),
                 state=state, description="train lts")
        metrics = {"split": "val", "best_epoch": fr.best_epoch, "precision": precision, **best_epoch_figures(fr)}
        result.update(spec.finish(fr, config.epochs, len(train), metrics), precision=precision,
                      seconds=round(time.perf_counter() - t_start, 3))
        return result


def predictions_path(run: Path, split: str) -> Path:
    """``<run>/predictions/<split>.jsonl``."""
    return Path(run) / "predictions" / f"{split}.jsonl"


def predict_lts_many(dataset: str, cache: Any, name: str, splits: list[str], force: bool = False
                     ) -> list[dict[str, Any]]:
    """Write (or find current) the predictions of run ``name`` on each of ``splits``: per expression query its
    mask (RLE), the mask's bounding box (``box``; absent for an empty mask, which then misses) and the
    localisation heatmap's maximum (``point``). Returns ``{"path", "split", "status", ...}`` per split."""
    from refground.cache.lock import claim_current
    from refground.cache.manifest import parent_fingerprints
    from refground.eval.predictions import write_predictions

    ref = resolve_run(name, "lts", dataset, cache)
    if not ref.local:
        raise UsageError(f"--run {name}: LTS predicts on the dataset it was trained on (its dense maps); "
                         "train a run on this dataset")
    m = complete_run(ref.path, "lts")
    dense = m.params.get("dense", DEFAULT_DENSE)
    d_path = dense_path(dataset, cache, dense)
    ds_dir = dataset_dir(dataset, cache)
    parents = {"run": parent("file", ref.path / MODEL_FILE), "dense": parent("artifact", d_path),
               "dataset": parent("dataset", ds_dir)}
    parent_fps = parent_fingerprints(parents)
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as locks:
        todo = []
        jobs = [(predictions_path(ref.path, split), {"split": split}) for split in splits]
        for split, (path, params), (fp, hit) in zip(splits, jobs, claim_current(locks, jobs, PREDICT_STEP,
                                                                                parent_fps, force)):
            results.append({"path": str(path), "split": split, "status": "hit", "features": dense,
                            "run_origin": ref.origin(m.fingerprint)})
            if hit is None:
                todo.append((results[-1], path, split, params, fp))
            else:
                results[-1].update(hit)
        if not todo:
            return results
        run = load_run(ref.path)
        ds = load_dataset(ds_dir)
        maps = DenseMaps(d_path, ds)
        for result, path, split, params, fp in todo:
            data = SplitData(ds, split, run.vocab, maps, run.config.window_images, masks=False)
            lines: list[dict[str, Any]] = [{}] * len(data)
            t0 = time.perf_counter()
            for b, res in _pass(run.model, maps, data, run.config.threshold, f"lts {split}"):
                for j, i in enumerate(b.index.tolist()):
                    mask = res["masks"][j].numpy()
                    rle = rmasks.encode(mask)
                    line: dict[str, Any] = {"query_id": int(data.queries.query_ids[i]), "mask": rle,
                                            "point": [round(float(v), 3) for v in res["points"][j]]}
                    if mask.any():
                        line["box"] = list(rmasks.to_bbox(rle))
                    lines[i] = line
            seconds = time.perf_counter() - t0
            write_predictions(path, lines)
            ms = round(1000 * seconds / max(1, len(lines)), 4)
            write_manifest(path, step=PREDICT_STEP, params=params, parents=parents, fingerprint=fp,
                           kind="predictions", extra={"queries": len(lines), "seconds": round(seconds, 3),
                                                      "ms_per_query": ms})
            result.update(status="written", queries=len(lines), ms_per_query=ms)
    return results


def explain_query(dataset: str, cache: Any, name: str, query_id: int) -> dict[str, Any]:
    """Everything the paper's Figure 4 draws for one query: ``query`` (record), ``heatmap`` float32[h, w]
    (sigmoid of H_mask at stride 8; the output map without localisation), ``probs`` float32[H, W] (upsampled
    P_mask), ``mask`` bool[H, W] (the prediction), ``gt`` bool[H, W] (the referent mask, None without one),
    ``point`` (x, y) of the heatmap's maximum, ``threshold``."""
    ds = load_dataset(dataset_dir(dataset, cache))
    q = ds.query(query_id)
    if q.task != "expression":
        raise UsageError(f"query {query_id} is a caption; LTS segments referring expressions")
    ref = resolve_run(name, "lts", dataset, cache)
    m = complete_run(ref.path, "lts")
    run = load_run(ref.path)
    maps = DenseMaps(dense_path(dataset, cache, m.params.get("dense", DEFAULT_DENSE)), ds)
    row = np.array([ds.query_row(q.id)])
    data = SplitData(ds, q.split, run.vocab, maps, 1, masks=False, rows=row)
    res = segment(run.model, WindowReader(maps, data).inputs(Batch(0, np.array([0]))), data.words(np.array([0])),
                  data.sizes[:1], run.config.threshold)
    try:
        gt = rmasks.decode(referent_masks(ds, row, "refground show --method lts")[0])
    except DataError:  # a query without a referent mask: drawn without ground truth
        gt = None
    return {"query": q, "heatmap": res["heatmap"][0].numpy(), "probs": res["probs"][0].numpy(),
            "mask": res["masks"][0].numpy(), "gt": gt, "point": tuple(float(v) for v in res["points"][0]),
            "threshold": run.config.threshold}


__all__ = ["DEFAULT_DENSE", "PREDICT_STEP", "STEP", "SplitData", "dense_path", "evaluate_split", "explain_query",
           "load_run", "predict_lts_many", "predictions_path", "run_dir", "segment", "train_lts"]
