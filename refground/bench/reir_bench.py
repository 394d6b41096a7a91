"""Benchmarks of ReIR (:mod:`refground.methods.reir`): training throughput, inference, the batched matching head
and the padded proposal table.

``refground bench reir`` measures four rows:

- ``reir_train``: captions/s of one training step (forward, :func:`reir_loss` with L_reg on, backward, Adam) of
  the default full model (:class:`ReIRConfig` sizes: d = 256, K = 5, TSD + STR + VOGN&RC) on random batches of
  the default world's shapes (32 captions of up to 20 words, up to 4 phrases, 50 proposals of 256-d features,
  8 detector classes, 3 captions per image, parsed relations between neighbouring phrases). The note gives the
  seconds per epoch this implies for the default world's training captions. No baseline.
- ``reir_infer``: ms per caption of inference (eval mode, ``torch.no_grad``, eq. 11's argmax and its refined
  box) on batches of 128 captions against one caption per forward (each trimmed to its own words, phrases and
  proposals, as :meth:`CaptionTable.batch` trims a batch of one); both must choose the same boxes (else
  RuntimeError).
- ``reir_matching``: ms of the coarse level's matching head (eq. 2: F_cls and F_reg of every phrase-proposal
  pair, :class:`MatchingHead` on broadcast [B, N, 1, d] x [B, 1, M, d]) against
  :func:`matching_head_reference`, a Python loop over (caption, phrase, proposal) computing each pair's F_cls
  and F_reg from the head's weight matrices; same numbers to 1e-5 (else RuntimeError). The loop runs on the
  first captions of the batch (its cost is linear in them).
- ``reir_proposals``: captions/s of an epoch's proposal reads the way :func:`train_reir` reads them
  (:meth:`ProposalTable.read` of the features artifact once: one contiguous read per field, padded to
  M = 50 per image; then :meth:`CaptionTable.batch` per batch of 32) against reading each caption's image from
  the HDF5 file on its own (:meth:`RaggedH5.image` per field, file kept open) and padding per batch; the same
  tensors bitwise (else RuntimeError). The artifact is written with the toolkit's writer
  (:func:`refground.cache.write_h5`) in a temporary folder: random float16 features of the first-stage
  proposals' shapes; it is freshly written, so both sides read it from the page cache.

Absolute figures on a shared CPU are noisy; the ratios are measured side by side. ``quick``: tiny sizes, a few
seconds in all.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from refground.bench import BenchResult, best_time, register
from refground.methods.reir.data import CaptionTable, CaptionView, ProposalTable
from refground.methods.reir.model import (
    MatchingHead,
    ReIR,
    ReIRBatch,
    ReIRConfig,
    reir_loss,
)

TRAIN_BATCH = 32          # ReIRConfig().batch_size
INFER_BATCH = 128         # refground.methods.reir.run.EVAL_BATCH
PHRASES = 4               # phrases per caption, at most (the synthetic world's captions hold 2-4)
PROPOSALS = 50            # ReIRConfig().max_proposals
FEATURE_DIM = 256         # the built-in detector's fc7
WORDS = 20                # words per caption, at most
CLASSES = 8               # the synthetic world's categories (the detector's classes)
RELATIONS = 8             # kept relation classes C_r
VOCAB = 64                # about the default world's caption vocabulary (random word ids)
CAPTIONS_PER_IMAGE = 3
IMAGE_SIZE = 256          # the default world's images (square)
# About: 5,000 images x 3 captions x 70% training images (README, "The synthetic world").
SYNTH_TRAIN_CAPTIONS = 10_500


# ------------------------------------------------------------------------------------------- random inputs
def random_batch(batch: int, seed: int, phrases: int = PHRASES, proposals: int = PROPOSALS,
                 feature_dim: int = FEATURE_DIM, words: int = WORDS, classes: int = CLASSES) -> ReIRBatch:
    """A :class:`ReIRBatch` of ``batch`` random captions shaped like the default world's, trimmed as
    :meth:`CaptionTable.batch` trims (words, phrases and proposals to the batch's longest): 12-``words`` words
    (0 = padding), 2-``phrases`` phrases of 2-4 words each (disjoint spans, in order), ``CAPTIONS_PER_IMAGE``
    captions per image sharing its proposals (40-``proposals`` per image, the first image full): boxes xyxy in
    a 256-pixel image, ReLU'd normal float32 features, classes in [0, ``classes``), phrase-class similarities
    in [0, 1); a parsed relation between neighbouring phrases with probability 1/2, label in [0, C_r]."""
    g = torch.Generator().manual_seed(int(seed))
    n_img = -(-batch // CAPTIONS_PER_IMAGE)
    image_index = torch.arange(batch) // CAPTIONS_PER_IMAGE
    counts = torch.randint(min(40, proposals), proposals + 1, (n_img,), generator=g)
    counts[0] = proposals
    slot = torch.arange(proposals)
    img_mask = slot[None, :] < counts[:, None]
    xy = torch.rand(n_img, proposals, 2, generator=g) * (IMAGE_SIZE - 16)
    wh = 8 + torch.rand(n_img, proposals, 2, generator=g) * (IMAGE_SIZE / 2)
    img_boxes = torch.cat([xy, (xy + wh).clamp(max=IMAGE_SIZE)], dim=-1) * img_mask[..., None]
    img_feats = torch.relu(torch.randn(n_img, proposals, feature_dim, generator=g)) * img_mask[..., None]
    img_classes = torch.randint(0, classes, (n_img, proposals), generator=g) * img_mask

    lengths = torch.randint(12, words + 1, (batch,), generator=g)
    n_ph = torch.randint(2, phrases + 1, (batch,), generator=g)
    ids = torch.randint(1, VOCAB, (batch, words), generator=g)
    ids[torch.arange(words)[None, :] >= lengths[:, None]] = 0
    spans = torch.zeros(batch, phrases, 2, dtype=torch.long)
    phrase_words = torch.zeros(batch, phrases, 4, dtype=torch.long)
    plen = torch.randint(2, 5, (batch, phrases), generator=g)
    edges, labels = [], []
    rel = torch.rand(batch, phrases, generator=g)
    rel_label = torch.randint(0, RELATIONS + 1, (batch, phrases), generator=g)
    for b in range(batch):
        seg = int(lengths[b]) // int(n_ph[b])  # >= 3: each phrase inside its own segment of the caption
        for i in range(int(n_ph[b])):
            a = i * seg + 1
            e = min(a + int(plen[b, i]), (i + 1) * seg)
            spans[b, i] = torch.tensor([a, e])
            phrase_words[b, i, :e - a] = ids[b, a:e]
            if i and float(rel[b, i]) < 0.5:
                edges.append((b, i - 1, i))
                labels.append(int(rel_label[b, i]))
    t, n = int(lengths.max()), int(n_ph.max())
    m = int(counts.max())
    pw = phrase_words[:, :n]
    length = max(1, int((pw != 0).sum(-1).max()))
    return ReIRBatch(
        words=ids[:, :t], spans=spans[:, :n], phrase_words=pw[..., :length],
        phrase_mask=torch.arange(n)[None, :] < n_ph[:, None], feats=img_feats[image_index, :m],
        boxes=img_boxes[image_index, :m], prop_mask=img_mask[image_index, :m],
        sizes=torch.full((batch, 2), float(IMAGE_SIZE)), classes=img_classes[image_index, :m],
        class_sim=torch.rand(batch, n, classes, generator=g), image_index=image_index,
        edges=torch.tensor(edges, dtype=torch.long).reshape(-1, 3),
        edge_labels=torch.tensor(labels, dtype=torch.long))


def caption_batch(b: ReIRBatch, i: int) -> ReIRBatch:
    """Caption ``i`` of ``b`` as a batch of one, trimmed to its own words, phrases and proposals (what
    :meth:`CaptionTable.batch` gives for that caption alone); its relations re-indexed to caption 0."""
    t = max(1, int((b.words[i] != 0).sum()))
    n = max(1, int(b.phrase_mask[i].sum()))
    m = max(1, int(b.prop_mask[i].sum()))
    pw = b.phrase_words[i:i + 1, :n]
    length = max(1, int((pw != 0).sum(-1).max()))
    own = b.edges[:, 0] == i
    edges = b.edges[own].clone()
    edges[:, 0] = 0
    return ReIRBatch(
        words=b.words[i:i + 1, :t], spans=b.spans[i:i + 1, :n], phrase_words=pw[..., :length],
        phrase_mask=b.phrase_mask[i:i + 1, :n], feats=b.feats[i:i + 1, :m], boxes=b.boxes[i:i + 1, :m],
        prop_mask=b.prop_mask[i:i + 1, :m], sizes=b.sizes[i:i + 1], classes=b.classes[i:i + 1, :m],
        class_sim=b.class_sim[i:i + 1, :n], image_index=b.image_index[i:i + 1], edges=edges,
        edge_labels=b.edge_labels[own])


def default_model(seed: int, feature_dim: int = FEATURE_DIM) -> ReIR:
    """The default full ReIR (ReIRConfig sizes) for :data:`VOCAB` words, ``feature_dim``-d features and
    :data:`RELATIONS` relation classes, freshly initialised."""
    torch.manual_seed(seed)
    return ReIR(ReIRConfig(vocab_size=VOCAB, visual_dim=feature_dim, num_relations=RELATIONS))


# --------------------------------------------------------------------------------------------- training
def bench_train(quick: bool, seed: int) -> BenchResult:
    batch, proposals = (8, 20) if quick else (TRAIN_BATCH, PROPOSALS)
    warmup, steps = (1, 1) if quick else (1, 6)
    inputs = [random_batch(batch, seed * 1000 + i, proposals=proposals) for i in range(warmup + steps)]
    model = default_model(seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=model.config.lr)
    elapsed, losses = 0.0, []
    for i, b in enumerate(inputs):
        t0 = time.perf_counter()
        loss, _ = reir_loss(model, model(b), b, regression_on=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            elapsed += time.perf_counter() - t0
        losses.append(float(loss.detach()))
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"reir_train: non-finite training loss {losses}")
    cps = batch * steps / elapsed
    c = model.config
    return BenchResult("reir_train", cps, "captions/s", None, None,
                       f"default ReIR (d = {c.dim}, K = {c.top_k}, TSD + STR + VOGN&RC, L_reg on), batch {batch} "
                       f"captions x <= {PHRASES} phrases x {proposals} proposals of {FEATURE_DIM}-d features, "
                       f"{steps} timed step(s) after {warmup} warm-up of forward + reir_loss + backward + Adam on "
                       f"random inputs of the default world's shapes; {torch.get_num_threads()} threads; = "
                       f"{SYNTH_TRAIN_CAPTIONS / cps:.0f} s per epoch of the default world's ~"
                       f"{SYNTH_TRAIN_CAPTIONS:,} training captions")


# -------------------------------------------------------------------------------------------- inference
def bench_infer(quick: bool, seed: int) -> BenchResult:
    batch, single, proposals = (8, 4, 20) if quick else (INFER_BATCH, 32, PROPOSALS)
    model = default_model(seed).eval()
    b = random_batch(batch, seed, proposals=proposals)
    ones = [caption_batch(b, i) for i in range(single)]

    @torch.no_grad()
    def batched() -> Tensor:
        return model(b)["pred_boxes"]

    @torch.no_grad()
    def one_by_one() -> list[Tensor]:
        return [model(o)["pred_boxes"][0] for o in ones]

    one_by_one()  # warm-up: first-call allocations
    t0 = time.perf_counter()
    res = batched()
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = one_by_one()
    t_single = time.perf_counter() - t0
    for i, r in enumerate(ref):
        n = r.shape[0]
        if not torch.allclose(res[i, :n], r, rtol=0, atol=1e-3):
            raise RuntimeError(f"reir_infer: batched and one-caption boxes differ for caption {i} "
                               f"(max |diff| {float((res[i, :n] - r).abs().max()):.2e} pixels)")
    if not quick:
        t_batch = min(t_batch, best_time(batched, repeat=2, min_time=0.0))
        t_single = min(t_single, best_time(one_by_one, repeat=1, min_time=0.0))
    ours, base = t_batch / batch * 1e3, t_single / single * 1e3
    return BenchResult("reir_infer", ours, "ms/caption", base, base / ours,
                       f"the default ReIR in eval mode, {batch} captions per forward (eq. 11's argmax and its "
                       f"refined box); baseline: one caption per forward, trimmed to its own words, phrases and "
                       f"proposals ({single} captions); same boxes; {torch.get_num_threads()} threads")


# --------------------------------------------------------------------------------------------- matching
def matching_head_reference(head: MatchingHead, xq: Tensor, xo: Tensor) -> tuple[Tensor, Tensor | None]:
    """Eq. 2 pair by pair: for every caption b, phrase i and proposal m, F_cls(x_q, x_o) = sigmoid(w^T
    ReLU(W_q x_q * W_o x_o) + b) and F_reg(x_q, x_o) = W_4 ReLU(U_q x_q * U_o x_o + U x_o) (W_4 ReLU(U x_o)
    without x_q) from the head's weight matrices, one pair at a time. xq Tensor[B, N, d], xo Tensor[B, M, d] ->
    (s^hat Tensor[B, N, M], delta Tensor[B, N, M, 4] or None)."""
    bsz, n, _ = xq.shape
    m = xo.shape[1]
    s_hat = xq.new_zeros(bsz, n, m)
    delta = xq.new_zeros(bsz, n, m, 4) if head.regression else None
    w_q, b_q = head.cls_q.weight, head.cls_q.bias
    w_o, b_o = head.cls_o.weight, head.cls_o.bias
    w, b0 = head.cls_out.weight[0], head.cls_out.bias[0]
    for b in range(bsz):
        for i in range(n):
            q = xq[b, i]
            for k in range(m):
                o = xo[b, k]
                h = torch.relu((w_q @ q + b_q) * (w_o @ o + b_o))
                s_hat[b, i, k] = torch.sigmoid(w @ h + b0)
                if delta is not None:
                    r = head.reg_o.weight @ o + head.reg_o.bias
                    if head.reg_q is not None and head.reg_qo is not None:
                        r = r + (head.reg_q.weight @ q) * (head.reg_qo.weight @ o)
                    delta[b, i, k] = head.reg_out.weight @ torch.relu(r) + head.reg_out.bias
    return s_hat, delta


def bench_matching(quick: bool, seed: int) -> BenchResult:
    c = ReIRConfig()
    batch, proposals, loop = (2, 10, 1) if quick else (TRAIN_BATCH, PROPOSALS, 4)
    torch.manual_seed(seed)
    head = MatchingHead(c.dim, c.hidden_dim, regression=True, reg_query=True)
    with torch.no_grad():  # the regression output starts at zero (identity transform): give it something to get wrong
        head.reg_out.weight.normal_(0.0, 0.05)
        head.reg_out.bias.normal_(0.0, 0.05)
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(batch, PHRASES, c.dim, generator=g)
    xo = torch.randn(batch, proposals, c.dim, generator=g)

    @torch.no_grad()
    def batched() -> tuple[Tensor, Tensor | None]:
        return head(xq[:, :, None, :], xo[:, None, :, :])

    @torch.no_grad()
    def looped() -> tuple[Tensor, Tensor | None]:
        return matching_head_reference(head, xq[:loop], xo[:loop])

    s_b, d_b = batched()
    s_r, d_r = looped()
    worst = max(float((s_b[:loop] - s_r).abs().max()), float((d_b[:loop] - d_r).abs().max()))
    if worst > 1e-5:
        raise RuntimeError(f"reir_matching: the batched head differs from the pair loop (max |diff| {worst:.2e})")
    t_batch = best_time(batched, repeat=1 if quick else 3, min_time=0.0)
    t_loop = best_time(looped, repeat=1, min_time=0.0) * batch / loop  # linear in the captions
    return BenchResult("reir_matching", t_batch * 1e3, "ms", t_loop * 1e3, t_loop / t_batch,
                       f"the coarse level's F_cls and F_reg (eq. 2) of {batch} captions x {PHRASES} phrases x "
                       f"{proposals} proposals, d = {c.dim}, hidden {c.hidden_dim}: MatchingHead on broadcast "
                       f"pairs; baseline: a Python loop over (caption, phrase, proposal) from the weight matrices, "
                       f"run on {loop} caption(s) and scaled to {batch} (same numbers, max |diff| {worst:.1e}); "
                       f"{torch.get_num_threads()} threads")


# ------------------------------------------------------------------------------------------ proposal reads
def write_features(path: Path, images: int, seed: int, proposals: int = PROPOSALS,
                   feature_dim: int = FEATURE_DIM) -> None:
    """A features artifact at ``path`` in the layout :meth:`ProposalTable.read` reads (``images/ids`` 1..
    ``images``, ragged ``proposals/{boxes,features,labels,scores}`` with 40-``proposals`` per image, float16
    features, ``class_names``), written by :func:`refground.cache.write_h5` as one chunk."""
    from refground.cache.h5store import write_h5

    rng = np.random.default_rng(seed)
    counts = rng.integers(min(40, proposals), proposals + 1, size=images).astype(np.int64)
    rows = int(counts.sum())
    xy = rng.uniform(0, IMAGE_SIZE - 16, size=(rows, 2))
    boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(8, IMAGE_SIZE / 2, size=(rows, 2)), IMAGE_SIZE)], 1)
    chunk = {"images.ids": np.arange(1, images + 1, dtype=np.int64), "proposals.counts": counts,
             "proposals.boxes": boxes.astype(np.float32),
             "proposals.features": np.maximum(rng.standard_normal((rows, feature_dim), dtype=np.float32),
                                              0).astype(np.float16),
             "proposals.labels": rng.integers(0, CLASSES, size=rows).astype(np.int32),
             "proposals.scores": rng.uniform(0, 1, size=rows).astype(np.float32)}
    write_h5(path, [chunk], {"format": "refground-features", "class_names": json.dumps([f"c{k}" for k in
                                                                                          range(CLASSES)])})


def caption_table(images: int, seed: int) -> CaptionTable:
    """A :class:`CaptionTable` of ``CAPTIONS_PER_IMAGE`` captions per image of 6 words and one phrase each
    (the proposal benchmark reads only its image rows; the words make CaptionTable.batch's own work real)."""
    rng = np.random.default_rng(seed)
    q = images * CAPTIONS_PER_IMAGE
    words = rng.integers(1, VOCAB, size=(q, 6)).astype(np.int64)
    spans = np.tile(np.array([[[1, 3]]], np.int64), (q, 1, 1))
    return CaptionTable(np.arange(q, dtype=np.int64), np.repeat(np.arange(images, dtype=np.int64),
                                                                CAPTIONS_PER_IMAGE), words, spans, words[:, None, 1:3],
                        np.ones((q, 1), bool), np.ones(q, np.int64), rng.random((q, 1, CLASSES), np.float32),
                        np.zeros(q + 1, np.int64), np.zeros((0, 2), np.int64), np.zeros(0, np.int64))


def read_padded(path: Path, view: CaptionView, table: CaptionTable, batches: list[np.ndarray], keep: int = 0
                ) -> list[ReIRBatch]:
    """Ours: :meth:`ProposalTable.read` once, :meth:`CaptionTable.batch` per batch; returns the first ``keep``
    batches."""
    props = ProposalTable.read(path, view, PROPOSALS)
    out = []
    for b in batches:
        res = table.batch(props, b)
        if len(out) < keep:
            out.append(res)
    return out


def read_per_caption(path: Path, image_rows: np.ndarray, batches: list[np.ndarray]
                     ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The baseline: per caption, its image's proposals read from the HDF5 file on their own (one slice read per
    field, the file kept open), cut to M and padded per batch into (feats float32, boxes, mask, classes)."""
    from refground.cache import RaggedH5

    out = []
    with RaggedH5(path) as f:
        for b in batches:
            got = []
            for row in image_rows[b].tolist():
                got.append(tuple(f.image("proposals", k, row)[:PROPOSALS] for k in ("boxes", "features", "labels")))
            m = max(1, max(len(g[0]) for g in got))
            boxes = np.zeros((len(b), m, 4), np.float32)
            feats = np.zeros((len(b), m, got[0][1].shape[1]), np.float32)
            classes = np.zeros((len(b), m), np.int64)
            mask = np.zeros((len(b), m), bool)
            for k, (bx, ft, lb) in enumerate(got):
                boxes[k, :len(bx)], feats[k, :len(bx)], classes[k, :len(bx)], mask[k, :len(bx)] = bx, ft, lb, True
            out.append((torch.from_numpy(feats), torch.from_numpy(boxes), torch.from_numpy(mask),
                        torch.from_numpy(classes)))
    return out


def bench_proposals(quick: bool, seed: int) -> BenchResult:
    images = 60 if quick else 2000
    single = 64 if quick else 640  # captions the baseline reads (its cost is linear in them)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="refground-bench-reir-") as d:
        path = Path(d) / "features" / "bench.h5"
        write_features(path, images, seed)
        ids = np.arange(1, images + 1, dtype=np.int64)
        size = np.full(images, IMAGE_SIZE, np.int64)
        view = CaptionView("bench", [f"c{k}" for k in range(CLASSES)],
                           {"image_ids": ids, "image_height": size, "image_width": size})
        table = caption_table(images, seed)
        batches = table.batches(TRAIN_BATCH, rng)
        n_base = 0
        base_batches = []
        for b in batches:  # the epoch's first batches, up to ``single`` captions
            if n_base >= single:
                break
            base_batches.append(b)
            n_base += len(b)
        ours = read_padded(path, view, table, batches, keep=len(base_batches))
        ref = read_per_caption(path, table.image_rows, base_batches)
        for n, (a, (feats, boxes, mask, classes)) in enumerate(zip(ours, ref)):
            if not (torch.equal(a.feats, feats) and torch.equal(a.boxes, boxes) and torch.equal(a.prop_mask, mask)
                    and torch.equal(a.classes, classes)):
                raise RuntimeError(f"reir_proposals: padded-table and per-caption reads differ in batch {n}")
        t_ours = best_time(lambda: read_padded(path, view, table, batches), repeat=1 if quick else 2, min_time=0.0)
        t_base = best_time(lambda: read_per_caption(path, table.image_rows, base_batches), repeat=1 if quick else 2,
                           min_time=0.0)
    cps, base_cps = len(table) / t_ours, n_base / t_base
    mb = images * PROPOSALS * FEATURE_DIM * 2 / 2**20
    return BenchResult("reir_proposals", cps, "captions/s", base_cps, cps / base_cps,
                       f"an epoch's proposal reads: {len(table):,} captions ({CAPTIONS_PER_IMAGE} per image) of "
                       f"{images:,} images' 40-{PROPOSALS} proposals (~{mb:.0f} MB of float16 {FEATURE_DIM}-d "
                       f"features in an HDF5 file by write_h5, page-cached): ProposalTable.read once + "
                       f"CaptionTable.batch per batch of {TRAIN_BATCH}; baseline: RaggedH5.image per field per "
                       f"caption, padded per batch ({n_base} captions); same tensors bitwise")


@register("reir")
def bench_reir(quick: bool, seed: int) -> list[BenchResult]:
    return [bench_train(quick, seed), bench_infer(quick, seed), bench_matching(quick, seed),
            bench_proposals(quick, seed)]
