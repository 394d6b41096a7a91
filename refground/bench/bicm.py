"""Benchmark of BiCM's per-query work (`refground bench bicm`): QAM + COM + SF with the CLIP artifact's cached
proposal-crop embeddings against a CLIP call per proposal.

For each of N expression queries of a cached dataset (a seeded sample of all its expressions) the work BiCM does
for one query at prediction time, on the query's own image with the detector's proposals (the paper's: the
boxes of confidence >= 0.2, at least 10, at most 100; :class:`~refground.methods.bicm.model.BiCMConfig`):

- ours: the query's CLIP text embedding, then :func:`~refground.methods.bicm.modules.image_modules` with that one
  text: one vision pass with the last block's attention, one backward pass for eq. 3, the query-aware and
  vanilla maps, P_t and its crop's embedding, and S^PQ / S^CQ / S^TD of every proposal, S^PQ (eq. 6) from the
  CLIP artifact's cached proposal-crop embeddings;
- baseline ("per-proposal CLIP call"): the same, but every proposal crop is cut and embedded by its own
  ``clip.embed_images([crop])`` call (no cache), as a pipeline without the crop cache would.

Both run on every query, alternately, after one warm-up call each; the image is read before the clock starts
(both need it). Figures: the median ms per query of each, ratio = baseline / ours. The two must agree (S^PQ
within the float16 storage of the cache, every other output equal), else RuntimeError: a stale CLIP artifact,
or one made with another crop recipe, would be measured as a speed-up of wrong scores.

Reads ``<cache>/<dataset>/features/detector-default.h5`` and the dataset's CLIP artifact (`refground extract
--clip ...`); writes nothing there. On demand: only `refground bench bicm` runs it (a bare `refground bench`
has no dataset to point it at).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import numpy as np

from refground.bench import BenchResult, register
from refground.errors import UsageError

DEFAULT_QUERIES = 50
QUICK_QUERIES = 5
SPQ_TOLERANCE = 1e-2  # cosines of float16-stored unit vectors against float32 ones differ by ~1e-3 at most


def _ours(inp: Any, image: np.ndarray, text: str, boxes: np.ndarray, labels: np.ndarray, crop_rows: np.ndarray,
          thr_a: float) -> dict[str, np.ndarray]:
    """One query's modules with the cached crop embeddings (``inp``: a :class:`ClipInputs`)."""
    from refground.methods.bicm.modules import image_modules

    fq = inp.clip.embed_texts([text])
    return image_modules(inp, image, [text], fq, boxes, labels, crop_rows, thr_a)


def _per_proposal(inp: Any, image: np.ndarray, text: str, boxes: np.ndarray, labels: np.ndarray,
                  thr_a: float) -> dict[str, np.ndarray]:
    """The same query with every proposal crop (the artifact's crop recipe) through its own CLIP call."""
    import torch

    from refground.features.extract import clip_crops
    from refground.methods.bicm.modules import image_modules

    clip = inp.clip
    fq = clip.embed_texts([text])
    crops = clip_crops(image, boxes, float(inp.crop.get("context", 0.1)), bool(inp.crop.get("square", True)))
    emb = torch.cat([clip.embed_images([c]) for c in crops]) if crops else torch.zeros(0, int(fq.shape[1]))
    fresh = dataclasses.replace(inp, crop_embedding=emb.numpy())
    return image_modules(fresh, image, [text], fq, boxes, labels, np.arange(len(boxes)), thr_a)


def _check(ours: dict[str, np.ndarray], base: dict[str, np.ndarray], where: str) -> float:
    """The largest S^PQ difference of the two; RuntimeError when it, or any other output, disagrees."""
    diff = float(np.abs(ours["s_pq"] - base["s_pq"]).max()) if ours["s_pq"].size else 0.0
    if not diff <= SPQ_TOLERANCE:
        raise RuntimeError(f"bicm: {where}: the CLIP artifact's crop embeddings give S^PQ {diff:.3g} away from fresh "
                           "ones (a stale artifact, or another crop recipe); re-run `refground extract --clip ... "
                           "--force`")
    for key in ("s_cq", "td_qa", "td_va", "pt_box_qa", "pt_box_va", "pt_pq_qa", "sim_iq"):
        if not np.allclose(ours[key], base[key], rtol=1e-5, atol=1e-7):
            raise RuntimeError(f"bicm: {where}: {key} differs between the cached and the per-proposal run")
    return diff


@register("bicm", on_demand=True)
def bench_bicm(quick: bool, seed: int, dataset: str = "synth", cache: Any = None,
               queries: int | None = None) -> list[BenchResult]:
    """Median ms per query of BiCM's modules with cached crop embeddings vs a CLIP call per proposal."""
    from refground.methods.bicm.model import BiCMConfig
    from refground.methods.bicm.run import DEFAULT_FEATURES, Inputs, eval_pairs

    n = int(queries) if queries is not None else (QUICK_QUERIES if quick else DEFAULT_QUERIES)
    if n < 1:
        raise UsageError(f"--queries {n}: must be at least 1")
    cfg = BiCMConfig()
    inp = Inputs(dataset, cache, DEFAULT_FEATURES, None, cfg.top_n, cfg.min_score, cfg.min_boxes)
    rows, texts, _, _ = eval_pairs(inp.ds, "all", "expression")
    if not len(rows):
        raise UsageError(f"dataset {dataset}: no expressions to time")
    pick = np.random.default_rng([int(seed), 19]).permutation(len(rows))[:n]
    from refground.threads import use_threads

    # the idle cores only: torch's threads spin on a busy core (a step beside another job can take 5x as long)
    with use_threads("auto") as threads:
        clip = inp.clip  # the model and the cached embeddings, loaded before the clock starts
        images = {int(r): inp.image(int(r)) for r in np.unique(rows[pick])}
        props = inp.props

        def args(k: int) -> tuple[np.ndarray, str, np.ndarray, np.ndarray, np.ndarray]:
            row = int(rows[k])
            sl = props.of(row)
            return images[row], texts[k], props.boxes[sl], props.labels[sl], props.crop_rows[sl]

        image, text, boxes, labels, crop_rows = args(int(pick[0]))
        _ours(clip, image, text, boxes, labels, crop_rows, cfg.thr_a)  # warm-up (first-call allocations)
        _per_proposal(clip, image, text, boxes, labels, cfg.thr_a)
        t_ours, t_base, worst, counts = [], [], 0.0, []
        for k in pick.tolist():
            image, text, boxes, labels, crop_rows = args(k)
            t0 = time.perf_counter()
            ours = _ours(clip, image, text, boxes, labels, crop_rows, cfg.thr_a)
            t1 = time.perf_counter()
            base = _per_proposal(clip, image, text, boxes, labels, cfg.thr_a)
            t2 = time.perf_counter()
            t_ours.append(1000 * (t1 - t0))
            t_base.append(1000 * (t2 - t1))
            worst = max(worst, _check(ours, base, f"query {k} ({text!r})"))
            counts.append(len(boxes))
    ours_ms, base_ms = statistics.median(t_ours), statistics.median(t_base)
    note = (f"{len(pick)} expression queries of {dataset} ({inp.ds_dir.parent}), {np.mean(counts):.1f} proposals per "
            f"query (confidence >= {cfg.min_score}, at least {cfg.min_boxes}, at most {cfg.top_n}), CLIP "
            f"{inp.clip_name}, {threads} torch thread(s); median of per-query times, image read excluded; baseline = "
            f"every proposal crop "
            f"through its own embed_images call; S^PQ agrees within {worst:.1e}, the other outputs within 1e-5")
    return [BenchResult("bicm QAM+COM+SF", ours_ms, "ms/query", base_ms, base_ms / ours_ms, note)]
