"""LTS (refground.methods.lts): every variant's shapes and gradients, the modules against slow references
(eqs. 3, 8, 11-13, the area-averaged targets, the heatmap's point, inference thresholding), training on the
tiny fixture world (cache hit, bit-identical resume, predictions), the CLI end to end and one-line errors
for bad input (no dense maps, no masks, unknown variant)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fail, run_json

from refground import masks as rmasks
from refground import progress
from refground.errors import DataError, UsageError
from refground.methods.lts.data import mask_targets, referent_masks
from refground.methods.lts.model import (
    ASPP,
    LTS,
    VARIANTS,
    LanguageEncoder,
    LTSConfig,
    MultiLevelFusion,
    RelevanceFilter,
    SegmentationModule,
    TransformerLocalizer,
    downsample_masks,
    heatmap_points,
    lts_loss,
    masks_from_logits,
    pixel_bce,
    sine_positions,
    variant_config,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Tiny sizes: every module runs, in milliseconds. batch_size 16: the fixture world's 121 training expressions
# then end in a batch of 9 (see test_train_with_a_final_batch_of_one for a batch of 1).
TINY = {"batch_size": 16, "gru_dim": 8, "fusion_dim": 8, "level_dim": 4, "aspp_dim": 4, "word_dim": 8,
        "trans_heads": 2, "trans_ffn": 8}
VOCAB = 20
DIMS = [6, 5, 4]  # channels of F_v1, F_v2, F_v3 (distinct, so a mixed-up level fails loudly)


def tiny_config(variant: str, **kw) -> LTSConfig:
    return variant_config(variant, **{**TINY, "epochs": 1, "vocab_size": VOCAB, "visual_dims": DIMS, **kw})


def random_words(b: int = 3, t: int = 5, seed: int = 0) -> torch.Tensor:
    """Right-padded word ids LongTensor[b, t] (0 = padding), lengths t, t - 2, 1, ..."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(1, VOCAB, (b, t), generator=g)
    for i, n in enumerate([t, max(1, t - 2), 1] * b):
        if i < b:
            words[i, n:] = 0
    return words


def random_maps(b: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """F_v1 [b, 6, 2, 2], F_v2 [b, 5, 4, 4], F_v3 [b, 4, 8, 8] (a 64-pixel frame)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, s, s, generator=g) for c, s in zip(DIMS, (2, 4, 8))]


# ============================================================================================ shapes, gradients
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_shapes_loss_and_gradients(variant):
    torch.manual_seed(0)
    cfg = tiny_config(variant)
    model = LTS(cfg)
    b = 3
    out = model(*random_maps(b), random_words(b))
    side = 16 if cfg.seg else 8
    assert out["mask"].shape == (b, 1, side, side)
    n = 0
    if cfg.localization == "filter":
        n = 1 if cfg.word_filter else cfg.num_filters
    elif cfg.localization == "transformer":
        n = 1
    if n:
        assert out["heatmaps"].shape == (b, n, 8, 8)
        assert torch.allclose(out["heatmap"], out["heatmaps"].mean(1))
    else:
        assert "heatmaps" not in out
    targets4 = torch.rand(b, 16, 16)
    targets8 = downsample_masks(targets4, (8, 8))
    loss, parts = lts_loss(out, targets4, targets8, cfg)
    assert loss.dim() == 0 and torch.isfinite(loss) and "seg" in parts
    assert ("loc" in parts) == bool(cfg.seg and cfg.loc_weight and n)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{variant}: parameter {name} is unused"
        assert torch.isfinite(p.grad).all(), f"{variant}: non-finite gradient in {name}"
    assert any(bool(p.grad.abs().sum() > 0) for p in model.parameters())
    # Inference: eval mode, a batch of one (BatchNorm's running statistics), probabilities to the image.
    model.eval()
    with torch.no_grad():
        one = model(*[m[:1] for m in random_maps(b)], random_words(b)[:1])
    assert one["mask"].shape == (1, 1, side, side)
    assert masks_from_logits(one["mask"], (64, 48)).shape == (1, 64, 48)
    # Every variant gives a map for the point of `predict` and the figure (run.segment reads out["heatmap"]).
    assert "heatmap" in out, f"{variant}: no 'heatmap' in the output"
    assert out["heatmap"].dim() == 3 and out["heatmap"].shape[0] == b


def test_variant_config_rows():
    assert LTSConfig().threshold == 0.25 and LTSConfig().loc_weight == 0.1
    assert variant_config("lts-n3").num_filters == 3 and variant_config("lts-trans").localization == "transformer"
    assert variant_config("filter").fusion is False and variant_config("fusion").localization == "none"
    assert variant_config("lts", epochs=3).epochs == 3
    with pytest.raises(UsageError, match="fusion-filter-seg"):
        variant_config("nope")
    with pytest.raises(UsageError, match="num_filters"):
        LTSConfig(num_filters=0)
    with pytest.raises(UsageError):
        LTSConfig.from_dict({"no_such_field": 1})


def test_language_encoder_h_t_and_f_text_mean():
    torch.manual_seed(0)
    enc = LanguageEncoder(VOCAB, word_dim=7, gru_dim=5)
    words = random_words(3, 6)
    h, f_text = enc(words)
    assert h.shape == (3, 6, 10) and f_text.shape == (3, 10)
    for i in range(3):
        n = int((words[i] != 0).sum())
        # The bi-GRU on the unpadded words alone (the packing must not let padding in, in either direction).
        ref, _ = enc.gru(enc.embed(words[i:i + 1, :n]))
        assert torch.allclose(h[i, :n], ref[0], atol=1e-6)
        assert torch.all(h[i, n:] == 0)
        assert torch.allclose(f_text[i], h[i, :n].mean(0), atol=1e-6)  # eq. 3


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, -1).repeat_interleave(2, -2)


def _conv1x1(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]


def slow_spatial_map(h: int, w: int) -> torch.Tensor:
    """Hu et al.'s 8-d map cell by cell: x_min, x_max, x_centre, y_min, y_max, y_centre in [-1, 1], 1/w, 1/h."""
    out = torch.zeros(8, h, w)
    for r in range(h):
        for c in range(w):
            x0, x1, y0, y1 = -1 + 2 * c / w, -1 + 2 * (c + 1) / w, -1 + 2 * r / h, -1 + 2 * (r + 1) / h
            out[:, r, c] = torch.tensor([x0, x1, (x0 + x1) / 2, y0, y1, (y0 + y1) / 2, 1 / w, 1 / h])
    return out


def test_spatial_map_against_a_loop():
    from refground.methods.lts.model import spatial_map

    assert torch.allclose(spatial_map(3, 5), slow_spatial_map(3, 5), atol=1e-6)


@pytest.mark.parametrize("fusion,coords", [(True, False), (False, False), (True, True)])
def test_multi_level_fusion_eqs_5_to_7(fusion, coords):
    torch.manual_seed(0)
    kw = {"coords": True} if coords else {}
    mod = MultiLevelFusion(DIMS, text_dim=6, fusion_dim=8, level_dim=3, fusion=fusion, **kw)
    f_v1, f_v2, f_v3 = random_maps(2)
    f_text = torch.randn(2, 6)
    out = mod(f_v1, f_v2, f_v3, f_text)
    assert out.shape == (2, 6, 8, 8)
    lrelu = lambda x: F.leaky_relu(x, 0.1)
    inputs = (f_v1, f_v2, f_v3)
    if coords:  # the spatial map appended to every level before W_v
        f_v1, f_v2, f_v3 = (torch.cat([f, slow_spatial_map(*f.shape[-2:])[None].expand(2, -1, -1, -1)], 1)
                            for f in (f_v1, f_v2, f_v3))
    f_m1 = lrelu(_conv1x1(mod.w_v1, f_v1))
    if fusion:
        f_m1 = f_m1 * lrelu(f_text @ mod.w_t.weight.T + mod.w_t.bias)[:, :, None, None]
    f_m2 = torch.cat([lrelu(_conv1x1(mod.w_m1, _up(f_m1))), lrelu(_conv1x1(mod.w_v2, f_v2))], 1)
    f_m3 = torch.cat([lrelu(_conv1x1(mod.w_m2, _up(f_m2))), lrelu(_conv1x1(mod.w_v3, f_v3))], 1)
    assert torch.allclose(out, f_m3, atol=1e-5)
    other = mod(*inputs, torch.randn(2, 6))
    assert torch.equal(out, other) != fusion  # the sentence enters eq. 5 exactly when fusion is on


def filter_bias(rf: RelevanceFilter) -> torch.Tensor | None:
    """The learned scalar per kernel added to the responses (a convolution's bias), None without one."""
    return getattr(rf, "bias", None)


@pytest.mark.parametrize("num_filters", [1, 3])
def test_relevance_filter_is_a_per_sample_1x1_conv(num_filters):
    torch.manual_seed(0)
    d, b = 4, 3
    rf = RelevanceFilter(text_dim=6, d_k=d, num_filters=num_filters)
    f_m3, f_text = torch.randn(b, d, 5, 7), torch.randn(b, 6)
    words = random_words(b, 4)
    h = torch.randn(b, 4, 6)
    out = rf(f_m3, f_text, h, words)
    assert out.shape == (b, num_filters, 5, 7)
    for i in range(b):
        kernel = rf.w_k(f_text[i]).reshape(num_filters, d, 1, 1)  # eq. 8: K = f_text W_k
        ref = F.conv2d(f_m3[i:i + 1], kernel, filter_bias(rf))[0]
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_word_filter_is_the_mean_of_per_word_convs():
    torch.manual_seed(0)
    d, b = 4, 3
    rf = RelevanceFilter(text_dim=6, d_k=d, num_filters=3, word_filter=True)
    assert rf.num_filters == 1
    f_m3, f_text = torch.randn(b, d, 5, 7), torch.randn(b, 6)
    words = random_words(b, 4)
    h = torch.randn(b, 4, 6)
    out = rf(f_m3, f_text, h, words)
    assert out.shape == (b, 1, 5, 7)
    for i in range(b):
        resp = [F.conv2d(f_m3[i:i + 1], rf.w_k(h[i, t]).reshape(1, d, 1, 1))[0, 0]
                for t in range(4) if words[i, t] != 0]
        bias = filter_bias(rf)
        assert torch.allclose(out[i, 0], torch.stack(resp).mean(0) + (0 if bias is None else bias[0]), atol=1e-5)


def test_sine_positions():
    enc = sine_positions(3, 5, 8)
    assert enc.shape == (15, 8)
    rows = {tuple(r) for r in enc.round(decimals=5).tolist()}
    assert len(rows) == 15  # every cell its own encoding
    grid = enc.reshape(3, 5, 8)  # row-major like flatten(2)
    assert torch.allclose(grid[:, :1, :4].expand(3, 5, 4), grid[:, :, :4])  # y half: one per row
    assert torch.allclose(grid[:1, :, 4:].expand(3, 5, 4), grid[:, :, 4:])  # x half: one per column
    assert not torch.allclose(grid[0, 0, :4], grid[1, 0, :4]) and not torch.allclose(grid[0, 0, 4:], grid[0, 1, 4:])
    with pytest.raises(ValueError):
        sine_positions(2, 2, 6)


@pytest.mark.parametrize("pool", [1, 2])
def test_transformer_localizer(pool):
    torch.manual_seed(0)
    mod = TransformerLocalizer(d=8, text_dim=6, heads=2, ffn=8, dropout=0.1, pool=pool).eval()
    f_m3, f_text = torch.randn(3, 8, 4, 6), torch.randn(3, 6)
    with torch.no_grad():
        out = mod(f_m3, f_text)
        assert out.shape == (3, 1, 4, 6)  # back on F_m3's grid whatever the pooling
        assert torch.allclose(mod(f_m3[1:2], f_text[1:2])[0], out[1], atol=1e-5)  # samples do not mix
        # Attention and per-token maps commute with a permutation of the cells (here a left-right flip); the
        # fixed sine encodings are what tells the cells apart (eq. 9).
        flipped = mod(f_m3.flip(-1), f_text).flip(-1)
        assert not torch.allclose(flipped, out, atol=1e-4)
        mod._pos = {key: torch.zeros_like(v) for key, v in mod._pos.items()}
        assert torch.allclose(mod(f_m3.flip(-1), f_text).flip(-1), mod(f_m3, f_text), atol=1e-5)
    with pytest.raises(UsageError, match="heads"):
        TransformerLocalizer(d=6, text_dim=6, heads=4, ffn=8, dropout=0.0)


def test_aspp_and_segmentation_module_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 8)
    aspp = ASPP(5, 4, [1, 2, 3])
    assert len(aspp.branches) == 4 and aspp(x).shape == (2, 4, 8, 8)
    seg = SegmentationModule(5, 4, [4, 8, 12])
    assert seg(x).shape == (2, 1, 16, 16)  # eq. 10: stride 8 -> stride 4
    seg.eval()
    assert seg(x[:1]).shape == (1, 1, 16, 16)


# ============================================================================================ slow references
def slow_bce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Eqs. 11-12 by hand: -sum over the pixels of y log p + (1 - y) log(1 - p), averaged over the batch."""
    total = 0.0
    for x_map, y_map in zip(logits.tolist(), targets.tolist()):
        for x_row, y_row in zip(x_map, y_map):
            for x, y in zip(x_row, y_row):
                p = 1.0 / (1.0 + math.exp(-x))
                total -= y * math.log(p) + (1.0 - y) * math.log(1.0 - p)
    return total / len(logits)


def test_pixel_bce_against_a_loop():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.rand(3, 4, 5, generator=g) * 8 - 4, torch.rand(3, 4, 5, generator=g)
    assert float(pixel_bce(logits, targets)) == pytest.approx(slow_bce(logits, targets), rel=1e-5)


@pytest.mark.parametrize("variant", ["lts", "lts-n3", "fusion-filter-seg", "fusion-seg", "filter", "fusion"])
def test_lts_loss_against_a_loop(variant):
    cfg = variant_config(variant)
    g = torch.Generator().manual_seed(1)
    b = 2
    t4 = torch.rand(b, 8, 8, generator=g)
    t8 = downsample_masks(t4, (4, 4))
    n = cfg.prior_channels
    out = {"mask": torch.randn(b, 1, 8, 8, generator=g) if cfg.seg else torch.randn(b, 1, 4, 4, generator=g)}
    if n:
        out["heatmaps"] = torch.randn(b, n, 4, 4, generator=g)
    loss, parts = lts_loss(out, t4, t8, cfg)
    seg = slow_bce(out["mask"][:, 0], t4 if cfg.seg else t8)  # without Seg the stride-8 map at weight 1
    expected = seg
    if cfg.seg and cfg.loc_weight and n:
        loc = sum(slow_bce(out["heatmaps"][:, i], t8) for i in range(n)) / n  # mean over the n filters
        expected += 0.1 * loc  # eq. 13, lambda = 0.1
        assert parts["loc"] == pytest.approx(loc, rel=1e-5)
    else:
        assert "loc" not in parts
    assert parts["seg"] == pytest.approx(seg, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_downsample_masks_is_the_block_average():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 16, 24, generator=g) > 0.6
    for stride in (4, 8):
        h, w = 16 // stride, 24 // stride
        out = downsample_masks(masks, (h, w))
        assert out.shape == (2, h, w) and out.dtype == torch.float32
        for b in range(2):
            for r in range(h):
                for c in range(w):
                    block = masks[b, r * stride:(r + 1) * stride, c * stride:(c + 1) * stride]
                    assert float(out[b, r, c]) == pytest.approx(block.float().sum().item() / stride ** 2)


def test_heatmap_points_centre_of_the_argmax_cell():
    g = torch.Generator().manual_seed(0)
    heat = torch.randn(3, 6, 10, generator=g)
    heat[2] = 0.0
    heat[2, 4, 1] = heat[2, 2, 7] = 1.0  # a tie: the first cell in row-major order wins
    size = (96, 160)  # (height, width)
    pts = heatmap_points(heat, size)
    assert pts.shape == (3, 2)
    for b in range(3):
        best, where = -math.inf, None
        for r in range(6):
            for c in range(10):
                if heat[b, r, c] > best:
                    best, where = float(heat[b, r, c]), (r, c)
        r, c = where
        assert pts[b].tolist() == pytest.approx([(c + 0.5) * 160 / 10, (r + 0.5) * 96 / 6])
    assert pts[2].tolist() == pytest.approx([7 * 16 + 8, 2 * 16 + 8])


def slow_bilinear(p: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Bilinear resampling with half-pixel centres (align_corners False), source coordinates clamped at 0."""
    in_h, in_w = len(p), len(p[0])

    def src(i: int, n_out: int, n_in: int) -> tuple[int, int, float]:
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(math.floor(s), n_in - 1)
        return lo, min(lo + 1, n_in - 1), s - lo

    res = []
    for i in range(out_h):
        y0, y1, fy = src(i, out_h, in_h)
        row = []
        for j in range(out_w):
            x0, x1, fx = src(j, out_w, in_w)
            top = p[y0][x0] * (1 - fx) + p[y0][x1] * fx
            bottom = p[y1][x0] * (1 - fx) + p[y1][x1] * fx
            row.append(top * (1 - fy) + bottom * fy)
        res.append(row)
    return res


def test_masks_from_logits_threshold_after_sigmoid_and_bilinear():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, generator=g) * 2
    size = (16, 12)
    masks = masks_from_logits(logits, size)
    assert masks.shape == (2, 16, 12) and masks.dtype == torch.bool
    for b in range(2):
        probs = slow_bilinear([[1 / (1 + math.exp(-x)) for x in row] for row in logits[b, 0].tolist()], *size)
        for i in range(16):
            for j in range(12):
                if abs(probs[i][j] - 0.25) > 1e-5:
                    assert bool(masks[b, i, j]) == (probs[i][j] > 0.25), (b, i, j, probs[i][j])
    logit = lambda p: math.log(p / (1 - p))
    assert masks_from_logits(torch.full((1, 1, 2, 2), logit(0.26)), (8, 8)).all()
    assert not masks_from_logits(torch.full((1, 1, 2, 2), logit(0.24)), (8, 8)).any()
    assert masks_from_logits(torch.full((1, 1, 2, 2), logit(0.4)), (8, 8), threshold=0.5).sum() == 0


def test_mask_targets_area_average_times_255():
    rng = np.random.default_rng(0)
    frame = 32
    masks = [rmasks.encode(rng.random((32, 32)) > 0.5) for _ in range(3)]
    mixed = [rmasks.encode(rng.random((64, 64)) > 0.3), rmasks.encode(rng.random((32, 32)) > 0.7)]
    for group, batch in ((masks, 2), (mixed, 512)):  # batch 2: the loop over blocks of masks; mixed: one at a time
        out = mask_targets(group, frame, batch=batch)
        assert set(out) == {4, 8}
        for s in (4, 8):
            side = frame // s
            assert out[s].shape == (len(group), side, side) and out[s].dtype == np.uint8
            for q, rle in enumerate(group):
                dense = rmasks.decode(rle).astype(np.float64)
                k = dense.shape[0] // side
                for r in range(side):
                    for c in range(side):
                        share = dense[r * k:(r + 1) * k, c * k:(c + 1) * k].mean()
                        assert out[s][q, r, c] == round(share * 255), (s, q, r, c)


def test_referent_masks_union_of_the_referent_objects(synth_ds):
    ds = synth_ds
    rows = ds.query_rows("val", "expression")
    got = referent_masks(ds, rows)
    assert len(got) == len(rows)
    for k, rle in zip(rows.tolist(), got):
        q = ds.query(int(ds.query_ids[k]))
        img = ds.image(q.image_id)
        assert list(rle["size"]) == [img.height, img.width]
        ref = next(m.object_ids for m in q.mentions if m.role == "referent")
        union = np.any([rmasks.decode(ds.object(int(o)).mask) for o in ref], axis=0)
        assert np.array_equal(rmasks.decode(rle), union)


def maskless_copy(synth_cache: Path, root: Path) -> None:
    """Rewrite ``root``'s dataset "synth" as the fixture world with every instance mask removed (its images
    stay in ``synth_cache``, which is never written)."""
    from refground.data.store import dataset_dir, load_named, save_dataset

    ds = load_named("synth", synth_cache)  # a fresh object: the session's synth_ds is shared
    ds.object_masks = [""] * ds.num_objects
    save_dataset(ds, dataset_dir("synth", root))


def test_referent_masks_refuses_a_dataset_without_masks(synth_cache, tmp_path):
    from refground.data.store import load_named

    maskless_copy(synth_cache, tmp_path)
    ds = load_named("synth", tmp_path)
    rows = ds.query_rows("train", "expression")[:3]
    with pytest.raises(DataError, match="no instance mask") as exc:
        referent_masks(ds, rows)
    assert "refground train lts" in str(exc.value) and len(str(exc.value).splitlines()) == 1
    with pytest.raises(DataError, match="refground show --method lts"):
        referent_masks(ds, rows, "refground show --method lts")


# ============================================================================================ training on the cache
@pytest.fixture(scope="module")
def cache(lts_cache, tmp_path_factory) -> Path:
    """A copy of lts_cache that this module's training tests write their runs into."""
    return Path(shutil.copytree(lts_cache, tmp_path_factory.mktemp("ltsrun") / "cache"))


def interrupt_in_epoch(epoch: int):
    """A progress tracker that raises KeyboardInterrupt (a stand-in for kill -9) at the start of ``epoch``,
    after the previous epoch's checkpoint."""
    def tracker(iterable, total, description):
        for item in iterable:
            if f"epoch {epoch}/" in description:
                raise KeyboardInterrupt
            yield item
    return tracker


def test_train_writes_a_run_hits_and_predicts(cache, monkeypatch):
    from refground.data.store import load_named
    from refground.methods.lts.run import (
        explain_query,
        predict_lts_many,
        run_dir,
        train_lts,
    )

    cfg = variant_config("lts", **TINY, epochs=1)
    res = train_lts("synth", cache, "tiny", cfg, seed=0)
    run = run_dir("synth", cache, "tiny")
    assert Path(res["run"]) == run and run == cache / "synth" / "runs" / "lts" / "tiny"
    assert res["cache_hit"] is False and res["best_epoch"] == 1
    for f in ("config.json", "vocab.json", "checkpoint.pt", "model.pt", "curve.json", "metrics.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "manifest.json").read_text())["complete"] is True
    m = res["metrics"]
    assert 0 <= m["overall_iou"] <= 1 and 0 <= m["mean_iou"] <= 1 and 0 <= m["loc_acc"] <= 1
    saved = json.loads((run / "config.json").read_text())
    assert saved["visual_dims"] == [16, 16, 16] and saved["vocab_size"] > 2  # set from the data
    again = train_lts("synth", cache, "tiny", variant_config("lts", **TINY, epochs=1), seed=0)
    assert again["cache_hit"] is True and again["metrics"] == res["metrics"]

    ds = load_named("synth", cache)
    first = predict_lts_many("synth", cache, "tiny", ["val"])[0]
    assert first["status"] == "written" and Path(first["path"]).is_file()
    lines = [json.loads(line) for line in Path(first["path"]).read_text().splitlines()]
    val = ds.query_rows("val", "expression")
    assert sorted(p["query_id"] for p in lines) == sorted(int(ds.query_ids[k]) for k in val)
    for p in lines:
        img = ds.image(ds.query(p["query_id"]).image_id)
        assert list(p["mask"]["size"]) == [img.height, img.width]
        x, y = p["point"]
        assert 0 <= x <= img.width and 0 <= y <= img.height
        mask = rmasks.decode(p["mask"])
        assert ("box" in p) == bool(mask.any())
        if mask.any():
            assert p["box"] == pytest.approx(list(rmasks.to_bbox(p["mask"])))
    assert predict_lts_many("synth", cache, "tiny", ["val"])[0]["status"] == "hit"

    # A one-epoch model may predict empty masks only: with each mask cut at its probability map's 90th
    # percentile instead, every line has a mask with foreground, and so a box (the mask's tight box).
    import refground.methods.lts.run as R

    real_segment = R.segment

    def top_decile(*args, **kw):
        res = real_segment(*args, **kw)
        res["masks"] = [p > torch.quantile(p.flatten(), 0.9) if p.max() > p.min() else p >= p.min()
                        for p in res["probs"]]
        return res

    monkeypatch.setattr(R, "segment", top_decile)
    boxed = predict_lts_many("synth", cache, "tiny", ["testA"])[0]
    monkeypatch.setattr(R, "segment", real_segment)
    some = [json.loads(line) for line in Path(boxed["path"]).read_text().splitlines()]
    assert some and all("box" in p for p in some)
    for p in some:
        mask = rmasks.decode(p["mask"])
        ys, xs = np.nonzero(mask)
        assert p["box"] == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])

    # explain_query (the figure's data) agrees with the predictions file.
    p = lines[0]
    ex = explain_query("synth", cache, "tiny", p["query_id"])
    assert np.array_equal(ex["mask"], rmasks.decode(p["mask"]))
    assert list(ex["point"]) == pytest.approx(p["point"], abs=1e-3)
    assert ex["heatmap"].shape == (16, 16) and 0 <= ex["heatmap"].min() and ex["heatmap"].max() <= 1
    assert ex["probs"].shape == ex["gt"].shape == ex["mask"].shape and ex["gt"].any()
    assert ex["threshold"] == 0.25


def test_resume_is_bit_identical(cache):
    from refground.methods.lts.run import run_dir, train_lts
    from refground.train import CHECKPOINT_FILE, MODEL_FILE, load_weights

    # LTS-Trans: its dropout draws from the global generator, which the checkpoint must carry over too.
    cfg = dict(TINY, epochs=2)
    a = train_lts("synth", cache, "A", variant_config("lts-trans", **cfg), seed=3)
    progress.set_tracker(interrupt_in_epoch(2))
    try:
        with pytest.raises(KeyboardInterrupt):
            train_lts("synth", cache, "B", variant_config("lts-trans", **cfg), seed=3)
    finally:
        progress.set_tracker(None)
    assert json.loads((run_dir("synth", cache, "B") / "manifest.json").read_text())["complete"] is False
    torch.manual_seed(123)  # the resuming process has drawn other numbers before
    b = train_lts("synth", cache, "B", variant_config("lts-trans", **cfg), seed=3)
    assert b["resumed_from"] == 1 and b["epochs_trained_now"] == 1
    wa = load_weights(Path(a["run"]) / CHECKPOINT_FILE)["model"]
    wb = load_weights(Path(b["run"]) / CHECKPOINT_FILE)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (Path(a["run"]) / MODEL_FILE).read_bytes() == (Path(b["run"]) / MODEL_FILE).read_bytes()
    assert a["metrics"] == b["metrics"]
    assert [e["loss"] for e in a["curve"]["epochs"]] == [e["loss"] for e in b["curve"]["epochs"]]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("lts", "lts-trans")])  # those two: above
def test_every_variant_trains_and_predicts(cache, variant):
    from refground.methods.lts.run import predict_lts_many, train_lts

    res = train_lts("synth", cache, variant, variant_config(variant, **TINY, epochs=1), seed=0)
    assert res["cache_hit"] is False and 0 <= res["metrics"]["overall_iou"] <= 1
    pred = predict_lts_many("synth", cache, variant, ["testB"])[0]
    lines = [json.loads(line) for line in Path(pred["path"]).read_text().splitlines()]
    assert lines and all("mask" in p and len(p["point"]) == 2 for p in lines)


def test_train_with_a_final_batch_of_one(cache):
    from refground.data.store import load_named
    from refground.methods.lts.run import train_lts

    n = len(load_named("synth", cache).query_rows("train", "expression"))
    cfg = variant_config("lts", **{**TINY, "epochs": 1, "batch_size": n - 1})  # batches of n - 1 and 1
    assert train_lts("synth", cache, "one", cfg, seed=0)["cache_hit"] is False


# ============================================================================================ CLI
def test_cli_train_eval_show_report(lts_cache, tmp_path, capsys):
    from refground.cli.main import main

    from refground.data.store import load_named

    cache = Path(shutil.copytree(lts_cache, tmp_path / "cache"))
    c = ("--cache", str(cache))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    res = run_json(capsys, "train", "lts", *c, "--epochs", "1", "--config", str(cfg), "--threads", "1")
    assert res["cache_hit"] is False and Path(res["run"]) == cache / "synth" / "runs" / "lts" / "lts"
    assert 0 <= res["metrics"]["overall_iou"] <= 1
    saved = json.loads((Path(res["run"]) / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["gru_dim"] == 8 and saved["lr_decay_epochs"] == 1  # 2/3 of 1, at least 1
    again = run_json(capsys, "train", "lts", *c, "--epochs", "1", "--config", str(cfg), "--threads", "1")
    assert again["cache_hit"] is True

    ev = run_json(capsys, "eval", "--method", "lts", "--split", "val", *c, "--threads", "1")
    seg = ev["segmentation"]["all"]
    assert 0 <= seg["overall_iou"] <= 1 and seg["scored"] == seg["queries"] > 0
    lines = [json.loads(line) for line in Path(ev["predictions"]).read_text().splitlines()]
    assert ("comprehension" in ev) == any("box" in p for p in lines)  # the masks' boxes, where there are any

    qid = load_named("synth", cache).queries("val", "expression")[0].id
    png = tmp_path / "x.png"
    assert main(["show", "--method", "lts", "--query", str(qid), "--out", str(png), *c]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rep = run_json(capsys, "report", "lts", *c, "--out", str(tmp_path / "r.md"))
    assert rep and (tmp_path / "r.md").is_file()


# ============================================================================================ bad input
def test_train_without_dense_maps_names_the_extract_step(pipeline_cache, tmp_path, capsys):
    cache = Path(shutil.copytree(pipeline_cache, tmp_path / "cache"))
    err = fail(capsys, "train", "lts", "--cache", str(cache), "--epochs", "1")
    assert "refground extract" in err and "--dense" in err
    assert not (cache / "synth" / "runs" / "lts").exists()


def test_train_with_unknown_dense_maps_names_them(cache, capsys):
    err = fail(capsys, "train", "lts", "--cache", str(cache), "--dense", "nope")
    assert "refground extract" in err and "--name nope" in err and "--dense" in err


def test_train_without_masks_fails_in_one_line(lts_cache, synth_cache, tmp_path, capsys):
    from refground.features.pipeline import extract_dataset

    cache = Path(shutil.copytree(lts_cache, tmp_path / "cache"))
    maskless_copy(synth_cache, cache)
    # The dataset changed, so its dense maps are stale first: the message names the command that renews them.
    err = fail(capsys, "train", "lts", "--cache", str(cache), "--epochs", "1")
    assert "stale" in err and "refground extract" in err and "--dense" in err
    extract_dataset("synth", cache, dense=True, max_proposals=20)
    err = fail(capsys, "train", "lts", "--cache", str(cache), "--epochs", "1")
    assert "no instance mask" in err and "refground train lts" in err


def test_train_unknown_variant_lists_the_variants(cache, capsys):
    err = fail(capsys, "train", "lts", "--cache", str(cache), "--variant", "nope")
    assert all(v in err for v in VARIANTS)


# ============================================================================================ report placement
def test_report_places_runs_by_config_not_name():
    from refground.methods.lts.report import main_run, row_label, variant_of_config

    for v in VARIANTS:  # every variant is recovered from its own config, whatever its sizes and schedule
        assert variant_of_config(variant_config(v).to_dict()) == v
        assert variant_of_config(tiny_config(v, lr=5e-4, coords=False, pooled_fine=False, trans_pool=1,
                                             loc_weight=0.5 if v.startswith("lts") else 0.0).to_dict()) == v
    assert variant_of_config({"seg": False, "loc_weight": 0}) == "fusion-filter"  # missing fields: the defaults
    assert variant_of_config({"localization": "none", "loc_weight": 0.1}) is None  # no variant: L_loc without a module
    assert variant_of_config({"loc_weight": "x"}) is None and variant_of_config(None) is None

    st = {"run": "lts-e3", "trained": True, "variant": "lts"}
    assert row_label(st) == "LTS (Fusion + Filter + Seg + L_loc) (lts-e3)"
    assert row_label({**st, "run": "lts"}) == "LTS (Fusion + Filter + Seg + L_loc)"
    assert row_label({"run": "x", "trained": False, "variant": None}) == "x (not trained)"
    status = {"fusion-e3": {"trained": True, "variant": "fusion"}, "a": {"trained": False, "variant": "lts"},
              "b": {"trained": True, "variant": "lts"}}
    assert main_run(status) == "b"
    assert main_run({**status, "lts": {"trained": True, "variant": "lts-n2"}}) == "lts"
    assert main_run({"fusion-e3": status["fusion-e3"]}) == "fusion-e3" and main_run({}) is None
