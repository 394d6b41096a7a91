"""Benchmarks of LTS (:mod:`refground.methods.lts`): dense-map reads, ASPP, training throughput and inference.

``refground bench lts`` measures four rows, each against a slow baseline in the same run:

- ``lts_dense_read``: queries/s of a training epoch's map reads from a zarr dense artifact the way
  :func:`refground.methods.lts.run.train_lts` reads them -- :meth:`DenseMaps.read` of one block of sorted
  images (a window), then :meth:`Window.gather` per batch of 32 queries, ~5 queries per image -- against a
  baseline of :meth:`DenseMaps.read_one` per query (three zarr reads of one image each, stacked per batch).
  Both must give bitwise the same tensors (else RuntimeError). The artifact is written with the toolkit's own
  writer (:class:`ChunkedJob` + :func:`write_zarr`, as ``refground extract --dense`` assembles it) in a
  temporary folder: random float16 maps of the default world's shapes (64 channels at 8x8, 16x16 and 32x32 of
  a 256-px frame). It is freshly written, so both sides read it from the page cache.
- ``lts_aspp``: ms per forward + backward (training mode, input gradient included, as inside the model) of
  :class:`~refground.methods.lts.model.ASPP` at its default size (97 -> 48 channels: F_m3 plus the prior,
  rates 4, 8, 12, 32x32 maps, batch 32). Baseline: the same ASPP as ONE convolution pass
  (:func:`aspp_one_conv`: the 1x1 branch and the three atrous branches as a single 7x7 kernel of dilation 4
  holding each branch's taps, 4 x 48 output channels), checked equal to the module to 1e-5. It does the same
  work in one call but multiplies the taps no branch uses (49 taps per output against 1 or 9), so the ratio
  says how much the separate convolutions save.
- ``lts_train``: queries/s of a full training step (forward, :func:`lts_loss`, backward, Adam) of the
  default :class:`LTS` at batch 32 on random inputs of the default world's shapes, under bfloat16 CPU autocast
  as ``train_lts`` runs it where the CPU has native bfloat16 (baseline: float32, so the ratio is the speed-up);
  float32 alone elsewhere (the note says so).
- ``lts_infer``: ms per query of :func:`refground.methods.lts.run.segment` (eval mode, probabilities upsampled
  to 256x256, thresholded) on batches of 128 against one query per call; both must agree (probabilities to
  1e-4, masks wherever the probability is not within 1e-4 of the threshold).

Absolute figures on a shared CPU are noisy; the ratios are measured side by side. ``quick``: tiny sizes, a few
seconds in all.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from refground.bench import BenchResult, best_time, register
from refground.bench.cmrin_bench import SYNTH_TRAIN_QUERIES
from refground.methods.lts.data import STRIDES, DenseMaps, Window, windows_of
from refground.methods.lts.model import ASPP, LTS, LTSConfig, downsample_masks, lts_loss

FRAME = 256             # the dense frame of the default world (256-px images)
CHANNELS = 64           # channels of each level of the built-in detector's maps
QUERIES_PER_IMAGE = 5   # about what the default world has
VOCAB = 64              # about the default world's vocabulary (random word ids; the size barely matters here)
TRAIN_BATCH = 32        # LTSConfig().batch_size
INFER_BATCH = 128       # refground.methods.lts.run.EVAL_BATCH


# ------------------------------------------------------------------------------------------- random inputs
def write_dense(path: Path, images: int, seed: int, chunk: int = 64) -> None:
    """A dense artifact at ``path`` (a ``.zarr`` folder) the way ``refground extract --dense`` assembles one:
    image ids 1..``images``, random float16 maps s32 [I, 64, 8, 8], s16 [I, 64, 16, 16], s8 [I, 64, 32, 32]
    committed as chunks of ``chunk`` images, then :func:`refground.cache.zarrstore.write_zarr`."""
    from refground.cache.chunks import ChunkedJob
    from refground.cache.zarrstore import write_zarr

    rng = np.random.default_rng(seed)
    job = ChunkedJob(path, "bench", images, chunk)
    for k in range(job.num_chunks):
        lo, hi = job.chunk_range(k)
        arrays = {"images.ids": np.arange(lo + 1, hi + 1, dtype=np.int64)}
        for s in STRIDES:
            arrays[f"s{s}.map"] = rng.standard_normal((hi - lo, CHANNELS, FRAME // s, FRAME // s),
                                                      dtype=np.float32).astype(np.float16)
        job.save(k, arrays)
    write_zarr(path, job, {"format": "refground-dense", "strides": list(STRIDES), "image_size": FRAME})
    job.remove()


def dense_dataset(images: int):
    """A :class:`~refground.data.model.Dataset` holding only the image ids 1..``images`` (all DenseMaps reads;
    no objects, no queries)."""
    from refground.data.model import Dataset

    empty = np.zeros(0, dtype=np.int64)
    return Dataset("bench", [], {}, {"image_ids": np.arange(1, images + 1, dtype=np.int64), "object_ids": empty,
                                     "query_ids": empty})


def random_batch(batch: int, seed: int, frame: int = FRAME) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Inputs of one LTS batch shaped like the default world's: maps [B, 64, S/32..S/8] (float32), words
    LongTensor[B, T] (6-18 words, 0 = padding, trimmed to the longest), soft targets at stride 4 and 8 of
    random elliptical referent masks (:func:`downsample_masks`)."""
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, CHANNELS, frame // s, frame // s, generator=g) for s in STRIDES]
    lengths = torch.randint(6, 19, (batch,), generator=g)
    words = torch.randint(1, VOCAB, (batch, 18), generator=g)
    words[torch.arange(18)[None, :] >= lengths[:, None]] = 0
    words = words[:, :int(lengths.max())]
    centre = torch.rand(batch, 2, generator=g) * frame
    radius = 5 + torch.rand(batch, 2, generator=g) * frame / 4
    yy, xx = torch.meshgrid(torch.arange(frame) + 0.5, torch.arange(frame) + 0.5, indexing="ij")
    masks = (((xx[None] - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 +
             ((yy[None] - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2) <= 1
    side4, side8 = frame // 4, frame // 8
    return maps, words, downsample_masks(masks, (side4, side4)), downsample_masks(masks, (side8, side8))


def default_model(seed: int) -> LTS:
    """The default LTS (LTSConfig sizes) for :data:`VOCAB` words and 64-channel maps, freshly initialised."""
    torch.manual_seed(seed)
    return LTS(LTSConfig(vocab_size=VOCAB, visual_dims=[CHANNELS] * 3))


# ------------------------------------------------------------------------------------------- dense reads
def epoch_plan(zrows: np.ndarray, window: int, batch: int, rng: np.random.Generator
               ) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """An epoch's reads as ``SplitData.batches`` orders them: per window (in random order) its sorted zarr rows
    and the zarr rows of its batches (the window's queries shuffled, cut into ``batch``)."""
    wins = windows_of(zrows, window)
    plan = []
    for w in rng.permutation(len(wins)).tolist():
        idx = np.flatnonzero(np.isin(zrows, wins[w]))
        idx = idx[rng.permutation(len(idx))]
        plan.append((wins[w], [zrows[idx[i:i + batch]] for i in range(0, len(idx), batch)]))
    return plan


def read_windows(dense: DenseMaps, plan: list[tuple[np.ndarray, list[np.ndarray]]], keep: int = 0
                 ) -> list[list[Tensor]]:
    """Ours: one :meth:`DenseMaps.read` per window, :meth:`Window.gather` per batch; returns the first ``keep``
    batches' tensors (the rest are dropped as training drops them)."""
    kept: list[list[Tensor]] = []
    for rows, batches in plan:
        win = Window(rows, dense.read(rows))
        for b in batches:
            maps = win.gather(b)
            if len(kept) < keep:
                kept.append(maps)
    return kept


def read_one_by_one(dense: DenseMaps, batches: list[np.ndarray]) -> list[list[Tensor]]:
    """The baseline: :meth:`DenseMaps.read_one` per query (three reads of one image), stacked per batch into the
    same float32 tensors as :meth:`Window.gather`."""
    out = []
    for b in batches:
        one = [dense.read_one(int(r)) for r in b.tolist()]
        out.append([torch.from_numpy(np.concatenate([o[s] for o in one]).astype(np.float32)) for s in STRIDES])
    return out


def bench_dense_read(quick: bool, seed: int) -> BenchResult:
    images, window = (48, 16) if quick else (1024, 512)
    single = 48 if quick else 320  # queries the baseline reads (its cost is linear in them)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="refground-bench-lts-") as d:
        path = Path(d) / "dense" / "bench.zarr"
        write_dense(path, images, seed)
        dense = DenseMaps(path, dense_dataset(images))
        zrows = dense.rows_of(np.repeat(np.arange(images), QUERIES_PER_IMAGE))
        plan = epoch_plan(zrows, window, TRAIN_BATCH, rng)
        all_batches = [b for _, bs in plan for b in bs]
        base_batches, n_base = [], 0
        for b in all_batches:  # the epoch's first batches, up to ``single`` queries
            if n_base >= single:
                break
            base_batches.append(b)
            n_base += len(b)
        ours = read_windows(dense, plan, keep=len(base_batches))
        ref = read_one_by_one(dense, base_batches)
        for n, (a, r) in enumerate(zip(ours, ref)):
            if not all(torch.equal(x, y) for x, y in zip(a, r)):
                raise RuntimeError(f"lts_dense_read: window reads and one-query reads differ in batch {n}")
        t_ours = best_time(lambda: read_windows(dense, plan), repeat=1 if quick else 2, min_time=0.0)
        t_base = best_time(lambda: read_one_by_one(dense, base_batches), repeat=1 if quick else 2, min_time=0.0)
    qps, base_qps = len(zrows) / t_ours, n_base / t_base
    mb = images * sum(CHANNELS * (FRAME // s) ** 2 for s in STRIDES) * 2 / 2**20
    return BenchResult("lts_dense_read", qps, "queries/s", base_qps, qps / base_qps,
                       f"an epoch of training reads: {len(zrows):,} queries ({QUERIES_PER_IMAGE} per image) of "
                       f"{images:,} images' float16 maps (64 ch at 8/16/32 px, {mb:.0f} MB zarr written by "
                       f"write_zarr, page-cached), windows of {window} images (one DenseMaps.read each) and "
                       f"Window.gather per batch of {TRAIN_BATCH}; baseline: DenseMaps.read_one per query "
                       f"({n_base} queries), same tensors bitwise")


# ------------------------------------------------------------------------------------------------- ASPP
def aspp_one_conv(aspp: ASPP, x: Tensor) -> Tensor:
    """``aspp(x)`` with its 1x1 branch and atrous 3x3 branches run as ONE convolution: a (2R/g + 1)-square
    kernel of dilation g (g the rates' gcd, R the largest rate; 7x7 at dilation 4 for rates 4, 8, 12) whose
    output channel block i holds branch i's taps at their offsets and zeros elsewhere; then each branch's
    BatchNorm and ReLU, the pooling branch and the projection as in the module. Same result and gradients,
    one call, but every output channel multiplies all k*k taps. x [B, cin, h, w] -> [B, dim, h, w]."""
    convs = [b[0] for b in aspp.branches]
    rates = [int(c.dilation[0]) for c in convs[1:]]
    step = math.gcd(*rates)
    half = max(rates) // step
    dim = convs[0].out_channels
    weight = x.new_zeros(dim * len(convs), x.shape[1], 2 * half + 1, 2 * half + 1)
    weight[:dim, :, half, half] = convs[0].weight[:, :, 0, 0]
    for i, (conv, r) in enumerate(zip(convs[1:], rates), start=1):
        s = r // step
        weight[i * dim:(i + 1) * dim, :, half - s:half + s + 1:s, half - s:half + s + 1:s] = conv.weight
    y = F.conv2d(x, weight, padding=max(rates), dilation=step)
    outs = [b[2](b[1](part)) for b, part in zip(aspp.branches, y.split(dim, 1))]
    pooled = aspp.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
    return aspp.project(torch.cat([*outs, pooled], dim=1))


def check_aspp(aspp: ASPP, x: Tensor, atol: float = 1e-5) -> float:
    """Largest |difference| between ``aspp(x)`` and :func:`aspp_one_conv` in training and eval mode (on copies, so
    the BatchNorm statistics each updates start equal); RuntimeError above ``atol``."""
    worst = 0.0
    for train in (True, False):
        a, b = copy.deepcopy(aspp).train(train), copy.deepcopy(aspp).train(train)
        with torch.no_grad():
            worst = max(worst, float((a(x) - aspp_one_conv(b, x)).abs().max()))
    if worst > atol:
        raise RuntimeError(f"lts_aspp: the one-convolution ASPP differs from the module (max |diff| {worst:.2e})")
    return worst


def bench_aspp(quick: bool, seed: int) -> BenchResult:
    c = LTSConfig()
    cin, side = 2 * c.level_dim + 1, FRAME // 8  # F_m3 and the sigmoid prior (eq. 10) at stride 8
    batch = 4 if quick else TRAIN_BATCH
    torch.manual_seed(seed)
    aspp = ASPP(cin, c.aspp_dim, c.aspp_rates).train()
    with torch.no_grad():  # BatchNorm at init is the identity: give its affine parameters something to get wrong
        for m in aspp.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, side, side, generator=g)
    diff = check_aspp(aspp, x)
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(batch, c.aspp_dim, side, side, generator=g)

    def step(fn) -> None:
        xg.grad = None
        fn(xg).backward(grad)

    repeat = 1 if quick else 3
    t_ours = best_time(lambda: step(aspp), repeat, min_time=0.0)
    t_one = best_time(lambda: step(lambda v: aspp_one_conv(aspp, v)), repeat, min_time=0.0)
    t_ours = min(t_ours, best_time(lambda: step(aspp), repeat, min_time=0.0))  # both sides before and after
    k = 2 * max(c.aspp_rates) // math.gcd(*c.aspp_rates) + 1
    return BenchResult("lts_aspp", t_ours * 1e3, "ms", t_one * 1e3, t_one / t_ours,
                       f"ASPP forward + backward (training mode, input gradient), batch {batch} x {cin} ch x "
                       f"{side}x{side}, {c.aspp_dim} per branch, rates {c.aspp_rates}: the module's separate "
                       f"convolutions; baseline: all four conv branches as ONE {k}x{k} convolution of dilation "
                       f"{math.gcd(*c.aspp_rates)} (same outputs, max |diff| {diff:.1e}); "
                       f"{torch.get_num_threads()} threads")


# --------------------------------------------------------------------------------------------- training
def bench_train(quick: bool, seed: int) -> BenchResult:
    from refground.features.detector_train import native_bfloat16

    batch = 4 if quick else TRAIN_BATCH
    warmup, steps = (1, 1) if quick else (1, 6)
    precisions = ["float32", "bfloat16"] if native_bfloat16() else ["float32"]
    inputs = [random_batch(batch, seed * 1000 + i) for i in range(warmup + steps)]
    runs = {}
    for p in precisions:  # same initial weights for both
        model = default_model(seed).train()
        runs[p] = (model, torch.optim.Adam(model.parameters(), lr=model.config.lr))
    times = {p: 0.0 for p in precisions}
    losses: list[float] = []

    def step(p: str, maps: list[Tensor], words: Tensor, t4: Tensor, t8: Tensor) -> float:
        model, opt = runs[p]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if p == "bfloat16" else torch.autocast("cpu", enabled=False)
        with ctx:  # as train_lts: the network under autocast, the loss in float32
            out = model(*maps, words)
        loss, _ = lts_loss({k: v.float() for k, v in out.items()}, t4, t8, model.config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for i, args in enumerate(inputs):
        for p in precisions:  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            loss = step(p, *args)
            if i >= warmup:
                times[p] += time.perf_counter() - t0
            losses.append(loss)
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"lts_train: non-finite training loss {losses}")
    qps = {p: batch * steps / t for p, t in times.items()}
    best = qps[precisions[-1]]
    c = runs[precisions[0]][0].config
    note = (f"default LTS (fusion {c.fusion_dim}, levels 2x{c.level_dim}, ASPP {c.aspp_dim} x rates "
            f"{c.aspp_rates}), batch {batch}, {steps} timed step(s) after {warmup} warm-up of forward + lts_loss + "
            f"backward + Adam on random inputs of the default world's shapes; {torch.get_num_threads()} threads; ")
    if len(precisions) == 2:
        return BenchResult("lts_train", best, "queries/s", qps["float32"], best / qps["float32"],
                           note + f"figure: bfloat16 CPU autocast (train_lts's 'auto' here), baseline: float32, "
                           f"steps interleaved; = {SYNTH_TRAIN_QUERIES / best:.0f} s per epoch of the default "
                           f"world's {SYNTH_TRAIN_QUERIES:,} training expressions")
    return BenchResult("lts_train", best, "queries/s", None, None,
                       note + "float32 only: this CPU has no native bfloat16 (native_bfloat16() is False), where "
                       f"train_lts's 'auto' trains in float32; = {SYNTH_TRAIN_QUERIES / best:.0f} s per epoch of "
                       f"the default world's {SYNTH_TRAIN_QUERIES:,} training expressions")


# -------------------------------------------------------------------------------------------- inference
def bench_infer(quick: bool, seed: int) -> BenchResult:
    from refground.methods.lts.run import segment

    batch, single = (8, 4) if quick else (INFER_BATCH, 48)
    model = default_model(seed).eval()
    maps, words, _, _ = random_batch(batch, seed)
    lengths = (words != 0).sum(1).tolist()
    sizes = np.full((batch, 2), FRAME, dtype=np.int64)
    thr = model.config.threshold

    def batched() -> dict:
        return segment(model, maps, words, sizes, thr)

    def one_by_one(n: int) -> list[dict]:
        return [segment(model, [m[i:i + 1] for m in maps], words[i:i + 1, :lengths[i]], sizes[i:i + 1], thr)
                for i in range(n)]

    one_by_one(1)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    res = batched()
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = one_by_one(single)
    t_single = time.perf_counter() - t0
    for i, r in enumerate(ref):
        p, q = res["probs"][i], r["probs"][0]
        far = (q - thr).abs() > 1e-4  # a pixel this close to the threshold may fall either way
        if not torch.allclose(p, q, rtol=0, atol=1e-4) or not torch.equal(res["masks"][i][far], r["masks"][0][far]):
            raise RuntimeError(f"lts_infer: batched and one-query outputs differ for query {i} "
                               f"(max |diff| {float((p - q).abs().max()):.2e})")
    if not quick:
        t_batch = min(t_batch, best_time(batched, repeat=1, min_time=0.0))
        t_single = min(t_single, best_time(lambda: one_by_one(single), repeat=1, min_time=0.0))
    ours, base = t_batch / batch * 1e3, t_single / single * 1e3
    return BenchResult("lts_infer", ours, "ms/query", base, base / ours,
                       f"segment() of the default LTS in eval mode, {batch} queries per call incl. upsampling to "
                       f"{FRAME}x{FRAME} and thresholding; baseline: one query per call ({single} queries); "
                       f"outputs agree to 1e-4; {torch.get_num_threads()} threads")


@register("lts")
def bench_lts(quick: bool, seed: int) -> list[BenchResult]:
    return [bench_dense_read(quick, seed), bench_aspp(quick, seed), bench_train(quick, seed), bench_infer(quick, seed)]
