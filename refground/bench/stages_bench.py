"""``quickstart-stages``: where the main job's time goes, stage by stage, against the CPU's limit.

Each stage of ``refground quickstart`` is measured on a sample of a freshly generated world of the default
image size (``--quick``: a small one of 128 px and tiny models), with its throughput beside a simple baseline
run in the same process (the implementation the stage had before issue 16, kept here, where there was one),
and for the neural stages the share of the time in each part of a step (torch.profiler, over labelled
ranges) and a FLOP estimate of a training step (``torch.utils.flop_counter.FlopCounterMode``) against the
measured step time, as a fraction of the CPU's fp32 matmul throughput (a ``torch.mm`` probe in the same run).

Rows (units in the row; ``ratio`` = figure against baseline, higher is better):

- ``stage.synth``: images/s of ``refground data synth`` (its default 2 worker processes) against 1 process.
- ``stage.detector.load``: train images/s of :func:`load_train_data` (decode, place, ground truth for all images
  at once) against the per-image loop it replaced (:func:`reference_ground_truth` + the same decoding).
- ``stage.detector.sampling``: ms per batch of the region head's RoI sampling (:func:`sample_rois`) against the
  per-image loop it replaced (:func:`reference_sample_rois`).
- ``stage.detector.step``: training images/s (batches of 8; backbone and FPN under bfloat16 autocast where the
  CPU has native bfloat16) against float32 throughout, as before; ``.share.<part>`` the share of the step in data (batch assembly), forward (backbone, heads, RoI
  sampling), backward and optimizer; ``.gflops`` the achieved GFLOP/s against the ``torch.mm`` probe
  (ratio = fraction of it) with the step's GFLOP in the note.
- ``stage.extract``: images/s of :meth:`Extractor.compute` on one thread (as ``refground extract`` runs in
  each worker) against the pre-change version (ground-truth boxes pooled in a second region-head call; same
  config);
  ``.share.<part>`` decode, backbone, proposals (dense head, NMS, region head), I/O (chunk commit).
- ``stage.cmrin.step``: training queries/s (batches of 64, the default CMRIN), shares, GFLOP/s against mm.
- ``stage.graph``: images/s of the relation graphs of the world's boxes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.bench import BenchResult, best_time, register

PARTS_DETECTOR = ("data", "forward", "backward", "optimizer")
PARTS_EXTRACT = ("decode", "backbone", "proposals", "io")


# ------------------------------------------------------------------------------------------ probes


def mm_gflops(n: int = 1536, repeat: int = 5) -> float:
    """fp32 GFLOP/s of the best of ``repeat`` ``torch.mm`` of two n x n matrices (2 n^3 FLOP each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def step_flops(step: Callable[[], Any]) -> float:
    """FLOP of one call of ``step`` (forward and backward matmuls and convolutions), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def profile_shares(run: Callable[[], Any], parts: Sequence[str]) -> tuple[float, dict[str, float]]:
    """Run ``run()`` under torch.profiler; returns (wall seconds, the fraction of the wall time in each
    labelled range of ``parts`` (``record_function`` ranges, e.g. as :func:`labelled` marks them); "other" is
    the rest)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    # Self-contained ranges: a part's CPU total is its wall time on the calling thread.
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in parts}
    shares = {p: totals.get(p, 0.0) / wall for p in parts}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return wall, shares


@contextmanager
def labelled(obj: Any, attr: str, label: str) -> Iterator[None]:
    """Wrap ``obj.attr`` (a function or method) in ``torch.profiler.record_function(label)`` for the block."""
    from torch.profiler import record_function

    original = getattr(obj, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return original(*args, **kwargs)

    setattr(obj, attr, wrapped)
    try:
        yield
    finally:
        setattr(obj, attr, original)


def _rows(prefix: str, shares: dict[str, float], note: str) -> list[BenchResult]:
    return [BenchResult(f"{prefix}.share.{p}", round(v, 4), "%", None, None, note if p == "other" else "")
            for p, v in shares.items()]


# ------------------------------------------------------------------------ kept pre-change versions


def reference_ground_truth(ds: Any, config: Any, ids: Sequence[int]) -> tuple[np.ndarray, ...]:
    """The per-image loop :func:`refground.features.detector_train.load_train_data` had before issue 16:
    (offsets int64[N+1], boxes float32[M, 4] in network-input pixels, cats, colors, sizes int64[M]) of the
    images ``ids``, objects of categories the detector does not know dropped."""
    from refground.features.detector_train import _attribute_index

    cat_pos = {c: k for k, c in enumerate(config.class_names)}
    ds_cats = np.array([cat_pos.get(c, -1) for c in ds.categories], dtype=np.int64)
    offsets, boxes, cats, cols, sizes = [0], [], [], [], []
    for image_id in ids:
        r = ds.image_row(image_id)
        h, w = int(ds.image_height[r]), int(ds.image_width[r])
        s = config.input_size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        sl = ds.object_slice(image_id)
        rows = np.arange(sl.start, sl.stop)
        b = ds.object_boxes[sl].astype(np.float32) * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
        c = ds_cats[ds.object_categories[sl]]
        keep = c >= 0
        boxes.append(b[keep])
        cats.append(c[keep])
        cols.append(_attribute_index(ds, "color", config.color_names, rows)[keep])
        sizes.append(_attribute_index(ds, "size", config.size_names, rows)[keep])
        offsets.append(offsets[-1] + int(keep.sum()))
    return (np.array(offsets, dtype=np.int64), np.concatenate(boxes).reshape(-1, 4), np.concatenate(cats),
            np.concatenate(cols), np.concatenate(sizes))


def reference_sample_rois(model: Any, scores: torch.Tensor, boxes: torch.Tensor, batch: Any,
                          generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The per-image loop :func:`refground.features.detector_train.sample_rois` replaced (same outputs in the
    same layout; its random draws came per image, so the same seed picks other random subsets)."""
    from refground.boxes import box_iou, clip_boxes_to_image, nms, remove_small_boxes
    from refground.features.detector_train import jitter_boxes

    c = model.config
    rois, cls_t, col_t, size_t, reg_t, fg_all = [], [], [], [], [], []
    for b in range(scores.shape[0]):
        gt = batch.gt[b]
        bx = clip_boxes_to_image(boxes[b], batch.content[b])
        top = scores[b].topk(min(c.train_pre_nms_top_n, bx.shape[0])).indices
        bx, sc = bx[top], scores[b][top]
        ok = remove_small_boxes(bx, c.min_box_size)
        bx, sc = bx[ok], sc[ok]
        props = bx[nms(bx, sc, c.proposal_nms)[: c.train_proposals]]
        cand = torch.cat([props, gt, jitter_boxes(gt, c.jitter_per_object, generator)])
        cand = clip_boxes_to_image(cand, batch.content[b])
        cand = cand[remove_small_boxes(cand, 1.0)]
        if len(gt):
            best, match = box_iou(cand, gt).max(dim=1)
        else:
            best, match = torch.zeros(len(cand)), torch.zeros(len(cand), dtype=torch.int64)
        fg = torch.nonzero(best >= 0.5).squeeze(1)
        bg = torch.nonzero(best < 0.5).squeeze(1)
        n_fg = min(len(fg), int(c.rois_per_image * c.fg_fraction))
        fg = fg[torch.randperm(len(fg), generator=generator)[:n_fg]]
        bg = bg[torch.randperm(len(bg), generator=generator)[: c.rois_per_image - n_fg]]
        sel = torch.cat([fg, bg])
        is_fg = torch.zeros(len(sel), dtype=torch.bool)
        is_fg[: len(fg)] = True
        m = match[sel]
        rois.append(torch.cat([torch.full((len(sel), 1), float(b)), cand[sel]], dim=1))
        if len(gt):
            cls_t.append(torch.where(is_fg, batch.cats[b][m] + 1, torch.zeros_like(m)))
            col_t.append(torch.where(is_fg, batch.colors[b][m], torch.full_like(m, -1)))
            size_t.append(torch.where(is_fg, batch.sizes[b][m], torch.full_like(m, -1)))
            reg_t.append(model.box_coder.encode(gt[m], cand[sel]))
        else:
            z = torch.zeros(len(sel), dtype=torch.int64)
            cls_t += [z]
            col_t += [z - 1]
            size_t += [z - 1]
            reg_t.append(torch.zeros((len(sel), 4)))
        fg_all.append(is_fg)
    return (torch.cat(rois), torch.cat(cls_t), torch.cat(col_t), torch.cat(size_t), torch.cat(reg_t),
            torch.cat(fg_all))


class TwoPassDetector:
    """The built-in detector as extraction used it before issue 16: without ``propose_pooled``, so the
    ground-truth boxes are pooled in a second region-head call (:meth:`region_features`)."""

    def __init__(self, detector: Any) -> None:
        self._detector = detector

    def __getattr__(self, name: str) -> Any:
        if name in ("propose_pooled", "propose_classified"):
            raise AttributeError(name)
        return getattr(self._detector, name)


# ------------------------------------------------------------------------------------------- stages


def _world(root: Path, quick: bool, seed: int, workers: int) -> tuple[Any, float]:
    from refground.data.synth import write_synthetic

    n, size = (48, 128) if quick else (320, 256)
    t0 = time.perf_counter()
    ds = write_synthetic(root / f"synth-w{workers}", name="synth", num_images=n, seed=seed, image_size=size,
                         workers=workers)
    return ds, n / (time.perf_counter() - t0)


def _detector_config(quick: bool) -> Any:
    from refground.features.detector import DetectorConfig

    if not quick:
        return DetectorConfig()
    return DetectorConfig(input_size=128, widths=[8, 16, 16, 16], depths=[0, 1, 0, 0], fpn_channels=16,
                          head_channels=16, roi_size=3, feature_dim=32, pre_nms_top_n=120, post_nms_top_n=60,
                          rois_per_image=16, train_proposals=16, inference_batch=4)


def _bench_detector(ds: Any, quick: bool, seed: int, mm: float) -> list[BenchResult]:
    from refground.features import detector_train as dt
    from refground.features.base import read_image  # noqa: F401  (decoding is part of both timings)
    from refground.features.detector import DetectorModel

    config = _detector_config(quick)
    ids = dt.split_image_ids(ds, "train")
    dt.load_images(ds, ids)  # both timings read the files from the page cache
    t0 = time.perf_counter()
    data = dt.load_train_data(ds, "train", config)
    new_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    side = data.images.shape[1]
    placed = np.zeros((len(ids), side, side, 3), dtype=np.uint8)
    for k, img in enumerate(dt.load_images(ds, ids)):  # the images at the default size: no resizing
        placed[k, :img.shape[0], :img.shape[1]] = img
    reference_ground_truth(ds, config, ids)
    old_load = time.perf_counter() - t0
    out = [BenchResult("stage.detector.load", len(ids) / new_load, "images/s", len(ids) / old_load,
                       old_load / new_load, "decode + place + ground truth of the train images; baseline: "
                       "the per-image ground-truth loop it replaced")]

    torch.manual_seed(seed)
    model = DetectorModel(config)
    optimizer = dt._make_optimizer(model, config)
    gen = torch.Generator().manual_seed(seed)
    batch = min(config.batch_size, len(data))
    steps = 3 if quick else 8
    from torch.profiler import record_function

    def step(k: int) -> None:
        idx = [(k * batch + j) % len(data) for j in range(batch)]
        with record_function("data"):
            b = dt.make_batch(data, idx, None)
        with record_function("forward"):
            losses = dt.training_losses(model, b, gen)
        with record_function("backward"):
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
        with record_function("optimizer"):
            optimizer.step()

    def timed(n: int, precision: str) -> float:
        """Median seconds of ``n`` steps with the backbone in ``precision`` (after one warm-up step)."""
        model.config.train_precision = precision
        try:
            step(0)  # warm-up: first-call allocations and kernel choices
            times = []
            for k in range(1, n + 1):
                t = time.perf_counter()
                step(k)
                times.append(time.perf_counter() - t)
        finally:
            model.config.train_precision = default
        return statistics.median(times)

    # The pre-change step (float32 throughout) and today's alternate in rounds: the host's speed drifts.
    default = config.train_precision
    rounds = [(timed(steps, default), timed(steps, "float32")) for _ in range(1 if quick else 3)]
    new_step = statistics.median(r[0] for r in rounds)
    old_step = statistics.median(r[1] for r in rounds)
    flops = step_flops(lambda: step(0))
    with torch.no_grad():
        b0 = dt.make_batch(data, list(range(batch)), None)
        logits, boxes = model.dense(model.maps(b0.x)[model.STRIDE])
        scores, boxes = logits.sigmoid(), boxes
    new_sample = best_time(lambda: dt.sample_rois(model, scores, boxes, b0, gen), repeat=3)
    old_sample = best_time(lambda: reference_sample_rois(model, scores, boxes, b0, gen), repeat=3)
    _, shares = profile_shares(lambda: [step(k) for k in range(steps)], PARTS_DETECTOR)
    gflops = flops / new_step / 1e9
    note = (f"batch {batch} at {config.input_size} px, {torch.get_num_threads()} threads, backbone in "
            f"{dt.training_precision(config)}")
    out += [BenchResult("stage.detector.sampling", new_sample * 1000, "ms/batch", old_sample * 1000,
                        old_sample / new_sample, f"RoI sampling of a batch of {batch}; baseline: the per-image loop"),
            BenchResult("stage.detector.step", batch / new_step, "images/s", batch / old_step, old_step / new_step,
                        f"{note}; baseline: float32 throughout"),
            BenchResult("stage.detector.gflops", gflops, "GFLOP/s", mm, gflops / mm,
                        f"{flops / 1e9:.2f} GFLOP per step (forward + backward) in {new_step * 1000:.0f} ms; "
                        f"baseline: torch.mm probe")]
    return out + _rows("stage.detector", shares, "RoI sampling and losses are in forward")


def _bench_extract(ds: Any, quick: bool, seed: int) -> list[BenchResult]:
    from refground.cache.chunks import ChunkedJob
    from refground.features import extract as X
    from refground.features.base import read_image  # noqa: F401
    from refground.features.detector import BuiltinDetector, DetectorModel

    torch.manual_seed(seed)
    det = BuiltinDetector(DetectorModel(_detector_config(quick)))
    n = min(len(ds.image_ids), 32 if quick else 160)
    rows = range(0, n)
    with torch.no_grad():
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # as `refground extract` runs each worker
        try:
            one = X.Extractor(ds, det, det, None, 100, 16, 0)
            old_det = TwoPassDetector(det)
            two = X.Extractor(ds, old_det, old_det, None, 100, 16, 0)
            one.compute(range(0, min(n, 16)), {"features"})  # warm-up
            t0 = time.perf_counter()
            two.compute(rows, {"features"})
            old = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as d:
                job = ChunkedJob(Path(d) / "f.h5", "bench", n, n)

                def run() -> None:
                    job.save(0, one.compute(rows, {"features"})["features"])

                with labelled(X, "read_image", "decode"), labelled(det, "_run_maps", "backbone"), \
                        labelled(det.model, "detect", "proposals"), labelled(det, "_pool", "proposals"), \
                        labelled(job, "save", "io"):
                    wall, shares = profile_shares(run, PARTS_EXTRACT)
        finally:
            torch.set_num_threads(before)
    return [BenchResult("stage.extract", n / wall, "images/s", n / old, old / wall,
                        "one thread (as each extract worker); baseline: ground-truth boxes pooled in a second "
                        "region-head call")] + _rows("stage.extract", shares, "chunk arrays, Python")


def _bench_cmrin(quick: bool, seed: int, mm: float) -> list[BenchResult]:
    from torch.profiler import record_function

    from refground.bench.cmrin_bench import TRAIN_BATCH, _world as cmrin_world
    from refground.grounding.candidates import make_batch
    from refground.methods.cmrin.model import triplet_loss

    steps = 2 if quick else 20
    cands, train_q, _, model, where = cmrin_world(TRAIN_BATCH * (steps + 1), 0, seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=model.config.lr)
    gen = torch.Generator().manual_seed(seed)
    batches = [np.arange(i * TRAIN_BATCH, (i + 1) * TRAIN_BATCH) % len(train_q) for i in range(steps + 1)]

    def step(rows: np.ndarray) -> None:
        with record_function("data"):
            b = make_batch(train_q, cands, rows)
        with record_function("forward"):
            loss = triplet_loss(model(**b.inputs())["scores"], b.targets, model.config.margin, gen)
        with record_function("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()

    step(batches[0])
    times = []
    for rows in batches[1:]:
        t = time.perf_counter()
        step(rows)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    flops = step_flops(lambda: step(batches[0]))
    _, shares = profile_shares(lambda: [step(r) for r in batches[1:]], PARTS_DETECTOR)
    gflops = flops / step_s / 1e9
    return [BenchResult("stage.cmrin.step", TRAIN_BATCH / step_s, "queries/s", None, None,
                        f"default CMRIN, batch {TRAIN_BATCH}; {where}; {torch.get_num_threads()} threads"),
            BenchResult("stage.cmrin.gflops", gflops, "GFLOP/s", mm, gflops / mm,
                        f"{flops / 1e9:.2f} GFLOP per step in {step_s * 1000:.0f} ms; baseline: torch.mm probe")
            ] + _rows("stage.cmrin", shares, "the bidirectional LSTM's per-word matmuls dominate forward")


def _bench_graph(ds: Any) -> list[BenchResult]:
    from refground.graph import spatial_relations_many

    offs = ds.image_object_offsets
    boxes = [torch.as_tensor(ds.object_boxes[offs[i]:offs[i + 1]], dtype=torch.float32) for i in range(len(offs) - 1)]
    sizes = [(int(h), int(w)) for h, w in zip(ds.image_height, ds.image_width)]
    t0 = time.perf_counter()
    spatial_relations_many(boxes, sizes)
    s = time.perf_counter() - t0
    return [BenchResult("stage.graph", len(boxes) / s, "images/s", None, None,
                        "relation graphs of the ground-truth boxes (see the graph benchmark for its baseline)")]


@register("quickstart-stages")
def bench_quickstart_stages(quick: bool, seed: int) -> list[BenchResult]:
    mm = mm_gflops(512 if quick else 1536)
    with tempfile.TemporaryDirectory() as d:
        ds, rate = _world(Path(d), quick, seed, 2)
        _, rate_one = _world(Path(d), quick, seed, 1)
        out = [BenchResult("stage.mm_probe", mm, "GFLOP/s", None, None,
                           f"best fp32 torch.mm, {torch.get_num_threads()} threads"),
               BenchResult("stage.synth", rate, "images/s", rate_one, rate / rate_one,
                           f"{len(ds.image_ids)} images of {int(ds.image_width[0])} px, 2 worker processes; "
                           "baseline: 1 process")]
        out += _bench_detector(ds, quick, seed, mm)
        out += _bench_extract(ds, quick, seed)
        out += _bench_graph(ds)
    out += _bench_cmrin(quick, seed, mm)
    return out


__all__ = ["TwoPassDetector", "bench_quickstart_stages", "labelled", "mm_gflops",
           "profile_shares", "reference_ground_truth", "reference_sample_rois", "step_flops"]
