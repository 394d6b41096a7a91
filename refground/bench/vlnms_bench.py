"""Benchmarks of VL-NMS (:mod:`refground.methods.vlnms.model`, :mod:`refground.methods.vlnms.run`).

- ``vlnms_nms``: :func:`fused_nms` for the 7 queries of one image over 81 pre-NMS detections (the default
  world's means), top 100 each, against a baseline of one ``refground.boxes.batched_nms`` per query; both
  must keep the same boxes (else RuntimeError).
- ``vlnms_score``: relatedness of every detection for all the queries of an image with VL-NMS-FC at its
  default size, scored the way ``refground vlnms`` does (the image's boxes encoded once, the queries of 64
  images per forward) against one query per forward; both must give the same scores (else RuntimeError).

Inputs are random, shaped like the default world (clustered boxes in a 480 x 640 image, 8 classes, 256-d
features, 6-18 words of a 63-word vocabulary), so the benchmarks run anywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from refground.bench import BenchResult, best_time, register
from refground.boxes import batched_nms

IMAGE_SIZE = (480, 640)
QUERIES_PER_IMAGE = 7
DETECTIONS = 81


def _detections(rng: np.random.Generator, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k boxes around k // 6 object centres (duplicates overlap, as before NMS), confidences and 8 classes."""
    centres = rng.uniform([60, 60], [580, 420], size=(max(1, k // 6), 2))
    pick = rng.integers(0, len(centres), size=k)
    wh = rng.uniform(20, 90, size=(len(centres), 2))[pick] * rng.uniform(0.8, 1.25, size=(k, 2))
    c = centres[pick] + rng.normal(0, 6, size=(k, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).clip(0, [640, 480, 640, 480])
    return (torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(rng.uniform(0.05, 1, k).astype(np.float32)),
            torch.from_numpy((pick % 8).astype(np.int64)))


@register("vlnms_nms")
def bench_vlnms_nms(quick: bool, seed: int) -> list[BenchResult]:
    from refground.boxes import fused_nms

    rng = np.random.default_rng(seed)
    boxes, conf, labels = _detections(rng, DETECTIONS)
    rel = torch.from_numpy(rng.uniform(0, 1, (QUERIES_PER_IMAGE, DETECTIONS)).astype(np.float32))

    def ours() -> torch.Tensor:
        return fused_nms(boxes, conf, rel, labels, 0.5, 100)

    def loop() -> list[torch.Tensor]:
        return [batched_nms(boxes, rel[q] * conf, labels, 0.5)[:100] for q in range(QUERIES_PER_IMAGE)]

    a, b = ours(), loop()
    for q in range(QUERIES_PER_IMAGE):
        if not torch.equal(a[q][a[q] >= 0], b[q]):
            raise RuntimeError("fused_nms keeps other boxes than per-query batched_nms")
    repeat = 2 if quick else 5
    t_ours, t_loop = best_time(ours, repeat), best_time(loop, repeat)
    return [BenchResult("vlnms_nms", t_ours * 1000, "ms/image", t_loop * 1000, t_loop / t_ours,
                        f"{QUERIES_PER_IMAGE} queries x {DETECTIONS} detections, top 100, per-class IoU 0.5; "
                        "baseline: batched_nms per query")]


@register("vlnms_score")
def bench_vlnms_score(quick: bool, seed: int) -> list[BenchResult]:
    from refground.methods.vlnms.model import VLNMSConfig, build_relatedness
    from refground.methods.vlnms.run import (DetectionSet, VLNMSQueries, make_vlnms_batch, relatedness_scores)
    from refground.grounding.queries import QueryTable

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images = 8 if quick else 64
    counts = np.clip(rng.poisson(DETECTIONS, images), 16, 166)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    parts = [_detections(rng, int(k)) for k in counts]
    boxes = torch.cat([p[0] for p in parts]).numpy()
    n = int(offsets[-1])
    obj_off = np.zeros(images + 1, np.int64)
    dets = DetectionSet(np.arange(images), offsets, boxes, torch.cat([p[1] for p in parts]).numpy(),
                        torch.cat([p[2] for p in parts]).numpy(),
                        rng.standard_normal((n, 256)).astype(np.float16),
                        np.tile(np.array(IMAGE_SIZE, np.int64), (images, 1)), obj_off, np.zeros((0, 4), np.float32),
                        np.zeros(0, np.float32), np.zeros(images + 1, np.int64), 0.05)
    nq = images * QUERIES_PER_IMAGE
    lengths = rng.integers(6, 19, nq)
    words = rng.integers(1, 63, (nq, 18))
    words[np.arange(18)[None, :] >= lengths[:, None]] = 0
    table = QueryTable(np.arange(nq), np.repeat(np.arange(images), QUERIES_PER_IMAGE), words.astype(np.int64),
                       np.full(nq, -1), ["synthetic"] * nq)
    queries = VLNMSQueries(table, np.zeros(nq + 1, np.int64), np.zeros(0, np.int64))
    model = build_relatedness(VLNMSConfig(vocab_size=63)).eval()
    index = np.arange(nq)
    single = index[: (QUERIES_PER_IMAGE * 2 if quick else QUERIES_PER_IMAGE * 8)]

    def ours() -> list[np.ndarray]:
        return relatedness_scores(model, queries, dets, index)[0]

    def one_by_one() -> list[np.ndarray]:
        with torch.no_grad():
            out = []
            for i in single:
                b = make_vlnms_batch(queries, dets, np.array([i]))
                out.append(model(**b.inputs())["scores"][0].numpy())
            return out

    a, b = ours(), one_by_one()
    for i in range(len(single)):
        if not np.allclose(a[i], b[i], atol=1e-5):
            raise RuntimeError("grouped relatedness scores differ from one query per forward")
    t_ours = best_time(ours, 2 if quick else 3) / images
    t_single = best_time(one_by_one, 2 if quick else 3) / (len(single) / QUERIES_PER_IMAGE)
    return [BenchResult("vlnms_score", t_ours * 1000, "ms/image", t_single * 1000, t_single / t_ours,
                        f"VL-NMS-FC default size, {QUERIES_PER_IMAGE} queries x ~{DETECTIONS} detections per image; "
                        f"baseline: one query per forward; {torch.get_num_threads()} threads")]
