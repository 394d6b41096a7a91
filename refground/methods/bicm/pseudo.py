"""KAM's pseudo labels (`refground pseudo bicm`, Sec. 3.5, Table 7).

From the two unpaired pools of the train split (:func:`refground.methods.bicm.data.unpaired_pools`): every
image's nearest query of the whole query pool by CLIP cosine (a faiss inner-product search of the whole-image
embeddings against the L2-normalised query embeddings, :mod:`refground.retrieval.index`), then QAM + COM + SF on
that pair (:func:`refground.methods.bicm.modules.compute_scores`), the candidate of highest fused score
``S_r`` (eq. 10) and that score. All of them are stored (``pseudo/bicm.h5``); Thr_k is applied when KAM trains
(:meth:`PseudoLabels.kept`), so Table 7's rows at Thr_k in {0.6, 0.7, 0.8, 0.9} come from one pass.

Precision against the benchmark's truth is measured *after* the labels are fixed, by evaluation code that reads
what BiCM never does (:func:`judge`): a pseudo label is correct when its box has IoU >= 0.5 with an object of its
image that its query text denotes. On the synthetic world the text is evaluated on the image's objects by the
world's independent oracle (:mod:`refground.data.synth.oracle`), so a query written for another image is judged
too; elsewhere only a text that the image's own annotations hold can be judged (correct when the box matches
that query's referent), and the share of judged labels is reported beside the precision. The figures go into the
artifact's manifest, never into what KAM reads.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.cache import write_manifest
from refground.data.store import dataset_dir
from refground.errors import ArtifactError, UsageError
from refground.methods.bicm.data import QUERY_KINDS, unpaired_pools
from refground.methods.bicm.model import variant_config
from refground.methods.bicm.modules import ModuleScores, candidates, compute_scores

STEP = "pseudo.bicm@1"
THRESHOLDS = (0.6, 0.7, 0.8, 0.9)  # Table 7's Thr_k


def pseudo_path(dataset: str, cache: Any) -> Path:
    """``<cache>/<dataset>/pseudo/bicm.h5``."""
    return dataset_dir(dataset, cache).parent / "pseudo" / "bicm.h5"


@dataclass
class PseudoLabels:
    """One candidate pseudo label per train image: ``scores`` (:class:`ModuleScores` of the (image, nearest query)
    pairs, pool order), ``texts`` (the nearest query of each), ``query_cosine`` float32[I] (its CLIP cosine with
    the image), ``box_index`` int64[I] (the chosen candidate: a proposal index, or N for P_t), ``boxes``
    float32[I, 4], ``fused`` float32[I] (its S_r), and the ``thr_a`` / ``top_n`` / ``lambda_t`` they were made
    with."""

    scores: ModuleScores
    texts: list[str]
    query_cosine: np.ndarray
    box_index: np.ndarray
    boxes: np.ndarray
    fused: np.ndarray
    thr_a: float
    top_n: int
    lambda_t: float
    min_score: float = 0.0
    min_boxes: int = 0

    def kept(self, thr_k: float) -> np.ndarray:
        """Indices of the labels whose fused score passes ``thr_k`` (Sec. 3.5: "higher than a threshold")."""
        return np.flatnonzero(self.fused > float(thr_k))


def nearest_queries(image_embedding: np.ndarray, query_embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each image the row of its nearest query by cosine, and that cosine: int64[I], float32[I] (faiss flat
    inner product on L2-normalised rows; ties to the lower row)."""
    from refground.retrieval.index import build_index, faiss_threads, normalise, search_index

    # faiss's OpenMP threads spin on a busy core: as many as torch was given (the command's --threads)
    with faiss_threads(torch.get_num_threads()):
        index = build_index(normalise(query_embedding.astype(np.float32)), "flat")
        scores, rows = search_index(index, normalise(image_embedding.astype(np.float32)), 1)
    return rows[:, 0].astype(np.int64), scores[:, 0].astype(np.float32)


def make_pseudo(inp: Any, seed: int = 0, kind: str = "expression", thr_a: float = 0.7, lambda_t: float = 1000.0,
                description: str = "bicm pseudo labels") -> tuple[PseudoLabels, Any]:
    """The pseudo labels of the train split of ``inp`` (:class:`refground.methods.bicm.run.Inputs`) from its
    unpaired pools: see the module docstring. Returns (labels, the image pool)."""
    images, queries = unpaired_pools(inp.ds, "train", kind, seed)
    clip = inp.clip
    fq = clip.clip.embed_texts(list(queries.texts)).numpy()
    fi = clip.image_embedding[images.rows].astype(np.float32)
    rows, cos = nearest_queries(fi, fq)
    texts = [queries.texts[r] for r in rows.tolist()]
    ms = compute_scores(clip, inp.image, inp.props, images.rows, texts, thr_a, description)
    cfg = variant_config("qam-com-sf", thr_a=thr_a, lambda_t=lambda_t, top_n=inp.top_n, min_score=inp.min_score,
                         min_boxes=inp.min_boxes)
    cand = candidates(ms, cfg, inp.props)
    from refground.methods.bicm.model import fused_score

    s = fused_score(cand["s_pq"], cand["s_cq"], cand["s_td"], cfg).masked_fill(~cand["valid"], float("-inf"))
    best = s.argmax(1)
    ar = torch.arange(len(best))
    labels = PseudoLabels(ms, texts, cos, best.numpy().astype(np.int64), cand["boxes"][ar, best].numpy(),
                          s[ar, best].numpy().astype(np.float32), float(thr_a), int(inp.top_n), float(lambda_t),
                          float(inp.min_score), int(inp.min_boxes))
    return labels, images


def save_pseudo(path: Path, labels: PseudoLabels) -> None:
    arrays = dict(labels.scores.arrays)
    arrays.update({"pl_box_index": labels.box_index, "pl_boxes": labels.boxes, "pl_fused": labels.fused,
                   "pl_query_cosine": labels.query_cosine,
                   "pl_texts": np.array([t.encode("utf-8") for t in labels.texts], dtype=object)})
    import h5py

    from refground.atomic import atomic_file

    with atomic_file(Path(path), "w+b") as fh:
        with h5py.File(fh, "w") as f:
            for k, v in arrays.items():
                if v.dtype == object:
                    f.create_dataset(k, data=v, dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(k, data=v)
            f.attrs.update({"thr_a": labels.thr_a, "top_n": labels.top_n, "lambda_t": labels.lambda_t,
                            "min_score": labels.min_score, "min_boxes": labels.min_boxes})


def load_pseudo(path: Path) -> PseudoLabels:
    """Read ``pseudo/bicm.h5`` (a one-line error for a damaged file)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            arrays = {k: f[k][()] for k in f.keys()}
            attrs = dict(f.attrs)
    except (OSError, KeyError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc}); run `refground pseudo bicm --force`") from None
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in arrays.pop("pl_texts")]
    return PseudoLabels(ModuleScores({k: v for k, v in arrays.items() if not k.startswith("pl_")}), texts,
                        arrays["pl_query_cosine"], arrays["pl_box_index"], arrays["pl_boxes"], arrays["pl_fused"],
                        float(attrs["thr_a"]), int(attrs["top_n"]), float(attrs["lambda_t"]), float(attrs["min_score"]),
                        int(attrs["min_boxes"]))


# ------------------------------------------------------------------------------------------- judging


def judge(ds: Any, image_rows: np.ndarray, texts: list[str], boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether each pseudo label is correct, and whether it could be judged: bool[I], bool[I] (see the module
    docstring). Evaluation only: reads the dataset's objects and annotations."""
    from refground.boxes import _box_iou_np

    synthetic = str(ds.meta.get("source", "")).startswith("synth")
    correct = np.zeros(len(texts), bool)
    judged = np.zeros(len(texts), bool)
    if synthetic:
        from refground.data.synth import oracle

    own: dict[tuple[int, str], list[int]] = {}
    if not synthetic:  # a text the image's own expressions hold: its referent
        for r in range(len(ds.query_ids)):
            if ds.query_tasks[r] == 0:
                q = ds.query(int(ds.query_ids[r]))
                own.setdefault((int(q.image_id), q.text), []).append(q.referent_object_id)
    obj_row = {int(o): k for k, o in enumerate(ds.object_ids.tolist())}
    for k, (row, text) in enumerate(zip(image_rows.tolist(), texts)):
        image_id = int(ds.image_ids[row])
        if synthetic:
            try:
                ids = sorted(oracle.evaluate(oracle.View.of(ds, image_id), text))
            except ValueError:  # the oracle's ParseError: a text outside the world's grammar
                continue
        else:
            ids = own.get((image_id, text), [])
            if not ids:
                continue
        judged[k] = True
        if ids:
            gt = ds.object_boxes[[obj_row[i] for i in ids]].reshape(-1, 4)
            union = np.concatenate([gt[:, :2].min(0), gt[:, 2:].max(0)])[None]
            iou = _box_iou_np(boxes[k:k + 1].astype(np.float64), np.concatenate([gt, union]))
            correct[k] = bool((iou >= 0.5).any())
    return correct, judged


def precision_table(fused: np.ndarray, correct: np.ndarray, judged: np.ndarray,
                    thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict[str, Any]]:
    """Table 7: per Thr_k the number of pseudo labels kept (fused score above it), how many could be judged and
    their precision (share correct among the judged ones, in [0, 1])."""
    rows = []
    for t in thresholds:
        keep = fused > t
        j = keep & judged
        rows.append({"thr_k": t, "labels": int(keep.sum()), "judged": int(j.sum()),
                     "precision": round(float(correct[j].mean()), 5) if j.any() else None})
    return rows


def pseudo_bicm(dataset: str, cache: Any, *, seed: int = 0, force: bool = False, features: str = "detector-default",
                clip: str | None = None, kind: str = "expression", thr_a: float = 0.7, lambda_t: float = 1000.0,
                top_n: int = 100, min_score: float = 0.2, min_boxes: int = 10) -> dict[str, Any]:
    """Write ``pseudo/bicm.h5`` (or find it current) and report Table 7. Returns ``{"path", "status", "tables",
    "json"}``."""
    from refground.cache.lock import claim_current
    from refground.cache.manifest import parent_fingerprints, read_manifest_of
    from refground.methods.bicm.run import Inputs
    from refground.tables import TableData

    if kind not in QUERY_KINDS:
        raise UsageError(f"--queries {kind!r}: expected one of {', '.join(QUERY_KINDS)}")
    inp = Inputs(dataset, cache, features, clip, top_n, min_score, min_boxes)
    path = pseudo_path(dataset, cache)
    params = {"seed": int(seed), "features": features, "kind": kind, "thr_a": float(thr_a),
              "lambda_t": float(lambda_t), "top_n": int(top_n), "min_score": float(min_score),
              "min_boxes": int(min_boxes), "split": "train"}
    parents = inp.parents()
    status = "hit"
    with contextlib.ExitStack() as locks:
        path.parent.mkdir(parents=True, exist_ok=True)
        ((fp, hit),) = claim_current(locks, [(path, params)], STEP, parent_fingerprints(parents), force)
        if hit is None:
            t0 = time.perf_counter()
            labels, images = make_pseudo(inp, seed, kind, thr_a, lambda_t)
            seconds = time.perf_counter() - t0
            save_pseudo(path, labels)
            correct, judged = judge(inp.ds, labels.scores["image_rows"], labels.texts, labels.boxes)
            table = precision_table(labels.fused, correct, judged)
            write_manifest(path, step=STEP, params=params, parents=parents, fingerprint=fp, kind="pseudo",
                           extra={"images": len(labels.texts), "distinct_queries": len(set(labels.texts)),
                                  "seconds": round(seconds, 2), "table7": table,
                                  "judged_all": round(float(judged.mean()), 5),
                                  "precision_all": round(float(correct[judged].mean()), 5)
                                  if judged.any() else None})
            status = "written"
    extra = read_manifest_of(path).extra
    rows = [[r["thr_k"], r["labels"], r["judged"], r["precision"]] for r in extra["table7"]]
    title = (f"BiCM pseudo labels (Table 7): {extra['images']} train images, {extra['distinct_queries']} distinct "
             f"nearest queries, {extra['seconds']} s")
    tables = [TableData(title, ["Thr_k", "pseudo labels", "judged", "precision"], rows,
                        ["float", "count", "count", "percent"])]
    return {"path": str(path), "status": status, "tables": tables,
            "json": {"path": str(path), "status": status, **extra}}


__all__ = ["PseudoLabels", "THRESHOLDS", "judge", "load_pseudo", "make_pseudo", "nearest_queries",
           "precision_table", "pseudo_bicm", "pseudo_path", "save_pseudo"]
