"""BiCM's query-aware attention maps (refground.features.clip_attention) against slow references on tiny
random CLIP models: the [CLS] attention recomputed by hand, its gradient through a hand-written last block
with the probabilities as a leaf (and finite differences), the map's weighting / head mean / min-max /
bilinear upsampling as loops, P_t's connected component against a BFS, and the non-square geometry against
the image processor's own output."""

from __future__ import annotations

import copy
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_tiny import make_tiny_clip

from refground.errors import UsageError
from refground.features import clip_attention as CA

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BOS, EOS, VOCAB = 48, 49, 50


def _config():
    from transformers import CLIPConfig

    text = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": BOS, "eos_token_id": EOS,
            "pad_token_id": EOS}
    # 2 layers (so the hidden state entering the last one is not the embedding), 4 heads, a 4x4 grid.
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)


def _model(attn: str = "eager", seed: int = 0):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel._from_config(_config(), attn_implementation=attn).eval()  # a fresh config per model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(0, BOS, (3, 6), generator=g)
    ids[:, 0], ids[:, -1] = BOS, EOS
    return pixels, ids, torch.ones_like(ids)


def _last_layer_input(model, pixels: torch.Tensor) -> torch.Tensor:
    """The hidden states entering the vision tower's last encoder layer (a forward pre-hook)."""
    seen = {}
    layer = model.vision_model.encoder.layers[-1]

    def hook(mod, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.vision_model(pixel_values=pixels.to(next(model.parameters()).dtype))
    finally:
        handle.remove()
    return seen["h"]


def _heads(x: torch.Tensor, nh: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, nh, d // nh).transpose(1, 2)  # [B, nh, T, hd]


def _manual_probs(model, h: torch.Tensor) -> torch.Tensor:
    """The last block's full attention probabilities [B, nh, T, T] from its input h, written out."""
    layer = model.vision_model.encoder.layers[-1]
    att, nh = layer.self_attn, layer.self_attn.num_heads
    with torch.no_grad():
        x = layer.layer_norm1(h)
        q, k = _heads(att.q_proj(x), nh), _heads(att.k_proj(x), nh)
        return torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)


def _manual_sim(model, h: torch.Tensor, probs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """S^IQ per row from the last block's input h and explicit attention probabilities (eqs. 1-2 by hand):
    probs @ v, out_proj, residual, MLP, post-layernorm of [CLS], visual projection, cosine with ``text``."""
    layer = model.vision_model.encoder.layers[-1]
    att, nh = layer.self_attn, layer.self_attn.num_heads
    x = layer.layer_norm1(h)
    v = _heads(att.v_proj(x), nh)
    ctx = (probs @ v).transpose(1, 2).reshape(h.shape)
    h1 = h + att.out_proj(ctx)
    h2 = h1 + layer.mlp(layer.layer_norm2(h1))
    f = model.visual_projection(model.vision_model.post_layernorm(h2[:, 0]))
    return F.cosine_similarity(f, text, dim=-1)


def _text(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ----------------------------------------------------------------------------------- (a) attention


def test_att_is_the_last_blocks_cls_attention(model, inputs):
    pixels, ids, mask = inputs
    att, grad, sim = CA.cls_attention_and_grad(model, pixels, ids, mask)
    assert att.shape == grad.shape == (3, 4, 16) and sim.shape == (3,)
    layer = model.vision_model.encoder.layers[-1]
    h = _last_layer_input(model, pixels)
    hd = layer.self_attn.head_dim
    with torch.no_grad():
        x = layer.layer_norm1(h)
        q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
    ref = torch.zeros(3, 4, 16)
    for b in range(3):
        for head in range(4):
            sl = slice(head * hd, (head + 1) * hd)
            logits = torch.stack([q[b, 0, sl] @ k[b, t, sl] / hd ** 0.5 for t in range(17)])
            ref[b, head] = torch.softmax(logits, 0)[1:]  # the [CLS] column is excluded, not renormalised
    torch.testing.assert_close(att, ref, atol=1e-6, rtol=1e-5)
    assert torch.all(att.sum(-1) < 1)  # the [CLS] column's share is missing


# ------------------------------------------------------------------------------------ (b) gradient


def test_grad_matches_a_hand_written_last_block(model, inputs):
    pixels, ids, mask = inputs
    _, grad, sim = CA.cls_attention_and_grad(model, pixels, ids, mask)
    h = _last_layer_input(model, pixels)
    probs = _manual_probs(model, h).requires_grad_(True)
    text = _text(model, ids, mask)
    ref_sim = _manual_sim(model, h, probs, text)
    (ref,) = torch.autograd.grad(ref_sim.sum(), probs)
    torch.testing.assert_close(sim, ref_sim.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref[:, :, 0, 1:], atol=1e-6, rtol=1e-4)
    assert grad.abs().max() > 1e-3 and (grad > 0).any() and (grad < 0).any()  # a real, mixed-sign signal
    # Each row's gradient is that of its own similarity (no cross-talk through sim.sum()).
    (one,) = torch.autograd.grad(_manual_sim(model, h, probs, text)[1], probs)
    torch.testing.assert_close(grad[1], one[1, :, 0, 1:], atol=1e-6, rtol=1e-4)


def test_grad_matches_finite_differences(model, inputs):
    pixels, ids, mask = inputs
    _, grad, _ = CA.cls_attention_and_grad(model, pixels[:1], ids[:1], mask[:1])
    m64 = copy.deepcopy(model).double()
    h = _last_layer_input(m64, pixels[:1].double())
    probs = _manual_probs(m64, h)
    text = _text(m64, ids[:1], mask[:1])
    eps = 1e-6
    for head, u in ((0, 5), (3, 12)):
        plus, minus = probs.clone(), probs.clone()
        plus[0, head, 0, 1 + u] += eps
        minus[0, head, 0, 1 + u] -= eps
        with torch.no_grad():
            fd = (_manual_sim(m64, h, plus, text) - _manual_sim(m64, h, minus, text)) / (2 * eps)
        assert abs(float(fd) - float(grad[0, head, u])) < 1e-5 + 1e-3 * abs(float(fd))


def test_batched_rows_equal_single_pairs_and_the_texts_variant(model, inputs):
    pixels, ids, mask = inputs
    att, grad, sim = CA.cls_attention_and_grad(model, pixels, ids, mask)
    for b in range(3):
        a1, g1, s1 = CA.cls_attention_and_grad(model, pixels[b:b + 1], ids[b:b + 1], mask[b:b + 1])
        torch.testing.assert_close(a1[0], att[b], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g1[0], grad[b], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s1[0], sim[b], atol=1e-6, rtol=1e-5)
    # One image against the three texts: one vision pass, same numbers as three pairs.
    at, gt, st = CA.cls_attention_and_grad_texts(model, pixels[0], ids, mask)
    assert at.shape == (4, 16) and gt.shape == (3, 4, 16) and st.shape == (3,)
    pairs = CA.cls_attention_and_grad(model, pixels[:1].expand(3, -1, -1, -1), ids, mask)
    torch.testing.assert_close(at, pairs[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gt, pairs[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st, pairs[2], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(gt[0], gt[1])  # the query changes the gradient


# ------------------------------------------------------------------ (f) eager only, (g) no .grad


def test_non_eager_model_is_refused():
    with pytest.raises(UsageError, match="attn_implementation=\"eager\".*sdpa"):
        CA.cls_attention_and_grad(_model("sdpa"), torch.zeros(1, 3, 32, 32), torch.tensor([[BOS, 3, EOS]]))


def test_parameters_grad_untouched_and_mode_restored(inputs):
    pixels, ids, mask = inputs
    m = _model(seed=3)
    CA.cls_attention_and_grad(m, pixels, ids, mask)
    CA.cls_attention_and_grad_texts(m, pixels[0], ids, mask)
    assert all(p.grad is None for p in m.parameters())
    # An existing .grad (a training loop's) is left as it was; a model in train mode is run in eval mode
    # (the same numbers) and handed back in train mode.
    w = m.visual_projection.weight
    w.grad = torch.ones_like(w)
    ref = CA.cls_attention_and_grad(m, pixels, ids, mask)
    m.train()
    got = CA.cls_attention_and_grad(m, pixels, ids, mask)
    assert m.training and torch.equal(w.grad, torch.ones_like(w))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)
    # Frozen parameters: the gradient still flows (the pixels are made a leaf).
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    frozen = CA.cls_attention_and_grad(m, pixels, ids, mask)
    torch.testing.assert_close(frozen[1], ref[1])
    with torch.no_grad():  # a caller's no_grad block does not stop it either
        torch.testing.assert_close(CA.cls_attention_and_grad(m, pixels, ids, mask)[1], ref[1])


# ------------------------------------------------------------------------------ (c) map, eqs. 4-5


def _bilinear_ref(grid: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
    """Bilinear upsampling of grid [gh, gw] to [hh, ww], align_corners=False, edges clamped: per pixel."""
    gh, gw = grid.shape
    out = torch.zeros(hh, ww, dtype=torch.float64)
    g = grid.double()
    for y in range(hh):
        sy = min(max((y + 0.5) * gh / hh - 0.5, 0.0), gh - 1)
        y0 = int(np.floor(sy))
        y1, wy = min(y0 + 1, gh - 1), sy - y0
        for x in range(ww):
            sx = min(max((x + 0.5) * gw / ww - 0.5, 0.0), gw - 1)
            x0 = int(np.floor(sx))
            x1, wx = min(x0 + 1, gw - 1), sx - x0
            out[y, x] = ((1 - wy) * ((1 - wx) * g[y0, x0] + wx * g[y0, x1])
                         + wy * ((1 - wx) * g[y1, x0] + wx * g[y1, x1]))
    return out


def _minmax_ref(m: torch.Tensor) -> torch.Tensor:
    lo, hi = float(m.min()), float(m.max())
    return torch.zeros_like(m) if hi == lo else (m - lo) / (hi - lo)


def test_query_attention_map_against_loops():
    g = torch.Generator().manual_seed(5)
    att = torch.rand(2, 3, 12, generator=g)
    grad = torch.randn(2, 3, 12, generator=g)
    a = torch.zeros(2, 12, dtype=torch.float64)
    v = torch.zeros(2, 12, dtype=torch.float64)
    for b in range(2):
        for u in range(12):
            a[b, u] = sum(float(att[b, h, u]) * max(float(grad[b, h, u]), 0.0) for h in range(3)) / 3
            v[b, u] = sum(float(att[b, h, u]) for h in range(3)) / 3
    grid = (3, 4)
    got = CA.query_attention_map(att, grad, grid)
    vanilla = CA.query_attention_map(att, grad, grid, weighted=False)
    up = CA.query_attention_map(att, grad, grid, out_size=(7, 10))
    assert got.shape == (2, 3, 4) and up.shape == (2, 7, 10)
    for b in range(2):
        torch.testing.assert_close(got[b].double(), _minmax_ref(a[b].view(3, 4)), atol=1e-6, rtol=0)
        torch.testing.assert_close(vanilla[b].double(), _minmax_ref(v[b].view(3, 4)), atol=1e-6, rtol=0)
        # Upsample first, normalise after (the paper's order): the map spans exactly [0, 1].
        torch.testing.assert_close(up[b].double(), _minmax_ref(_bilinear_ref(a[b].view(3, 4), 7, 10)),
                                   atol=1e-6, rtol=0)
        assert float(up[b].min()) == 0.0 and float(up[b].max()) == pytest.approx(1.0)
    # ReLU: negative gradients never raise a patch; all-negative gradients give a constant (zero) map.
    zero = CA.query_attention_map(att, -grad.abs(), grid, out_size=(5, 5))
    assert torch.equal(zero, torch.zeros(2, 5, 5))
    assert torch.equal(CA.query_attention_map(torch.full((1, 2, 4), 0.3), None, (2, 2), weighted=False),
                       torch.zeros(1, 2, 2))
    with pytest.raises(UsageError):
        CA.query_attention_map(att, grad, (4, 4))


# ------------------------------------------------------------------------------------ (d) box P_t


def _component_ref(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    comp = np.zeros_like(mask)
    todo = deque([seed])
    comp[seed] = True
    while todo:
        r, c = todo.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not comp[rr, cc]:
                comp[rr, cc] = True
                todo.append((rr, cc))
    return comp


def _box_ref(m: np.ndarray, thr: float) -> list[float]:
    seed = np.unravel_index(int(np.argmax(m)), m.shape)
    mask = m >= min(np.float32(thr), m[seed])
    comp = _component_ref(mask, seed)
    rows, cols = np.nonzero(comp)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_box_from_map_crafted_maps():
    m = torch.zeros(20, 30)
    m[5:10, 3:8] = 0.9
    m[7, 5] = 1.0
    assert CA.box_from_map(m).tolist() == [3, 5, 8, 10]
    # Two blobs: the larger one is above the threshold too, but the maximum sits in the small one.
    m = torch.zeros(40, 50)
    m[0:20, 0:20] = 0.8
    m[30:33, 40:42] = 0.75
    m[31, 41] = 1.0
    assert CA.box_from_map(m).tolist() == [40, 30, 42, 33]
    assert CA.box_from_map(m, threshold=0.9).tolist() == [41, 31, 42, 32]  # only the peak pixel
    # Blobs touching at a corner only are separate (4-connectivity).
    m = torch.zeros(6, 6)
    m[0:2, 0:2], m[2:4, 2:4] = 1.0, 0.8
    assert CA.box_from_map(m).tolist() == [0, 0, 2, 2]
    # A constant map (min-max normalised: all zeros) and any flat map: the whole image.
    assert CA.box_from_map(torch.zeros(9, 13)).tolist() == [0, 0, 13, 9]
    assert CA.box_from_map(torch.full((9, 13), 0.5)).tolist() == [0, 0, 13, 9]
    # The maximum on the border.
    m = torch.zeros(16, 24)
    m[0:4, 21:24] = 0.8
    m[0, 23] = 1.0
    assert CA.box_from_map(m).tolist() == [21, 0, 24, 4]
    # A spiral: one component that turns many times (exercises repeated row / column sweeps); peak P.
    spiral = ["#########",
              "........#",
              "#######.#",
              "#.....#.#",
              "#.#P#.#.#",
              "#.#...#.#",
              "#.#####.#",
              "#.......#",
              "#########"]
    s = np.array([[0.9 if ch == "#" else 1.0 if ch == "P" else 0.0 for ch in row] for row in spiral], np.float32)
    assert CA.box_from_map(torch.from_numpy(s)).tolist() == _box_ref(s, 0.7) == [0, 0, 9, 9]
    s[8, 0] = 0  # cut the outer ring off: the inner turns alone
    assert CA.box_from_map(torch.from_numpy(s)).tolist() == _box_ref(s, 0.7) == [0, 2, 7, 8]


def test_box_from_map_random_against_bfs():
    g = torch.Generator().manual_seed(7)
    for k in range(12):
        m = F.interpolate(torch.rand(1, 1, 6, 8, generator=g), size=(30, 40), mode="bilinear", align_corners=False)
        m = CA.query_attention_map(m.view(1, 1, -1), None, (30, 40), weighted=False)[0]
        thr = (0.4, 0.7, 0.9)[k % 3]
        assert CA.box_from_map(m, thr).tolist() == _box_ref(m.numpy(), thr)


# ---------------------------------------------------------------------- (e) images through HFClip


@pytest.fixture(scope="module")
def hfclip(tmp_path_factory):
    from refground.features.hf import HFClip

    return HFClip(make_tiny_clip(tmp_path_factory.mktemp("qam") / "clip"), batch_size=2)


def _images(seed: int, *shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]


def test_processor_window_matches_the_processor(hfclip):
    ip = hfclip.processor.image_processor
    assert CA.processor_grid(hfclip.model.config) == (4, 4)
    assert CA.processor_grid(hfclip.model.config.vision_config) == (4, 4)
    assert CA.processor_window(ip, 32, 32) == (0, 0, 32, 32)
    assert CA.processor_window(ip, 48, 32) == (0, 8, 32, 40)  # tall: no resize, rows 8..40 kept
    assert CA.processor_window(ip, 64, 128) == (32, 0, 96, 64)  # wide, halved: columns 32..96
    tall, wide = _images(0, (48, 32), (64, 128))
    # The processor's output of the whole image is its output of the window alone.
    torch.testing.assert_close(hfclip._pixels([tall]), hfclip._pixels([tall[8:40]]), atol=0, rtol=0)
    # Halving resamples over a few pixels: the columns whose kernel stays inside the window agree.
    a, b = hfclip._pixels([wide]), hfclip._pixels([wide[:, 32:96]])
    torch.testing.assert_close(a[..., 3:29], b[..., 3:29], atol=1e-6, rtol=0)


def test_maps_at_image_size(hfclip):
    texts = ["red cat", "blue dog", "the ball", "a car"]
    square, square2, tall, wide = _images(1, (32, 32), (64, 64), (48, 32), (32, 56))
    ims = [square, square2, tall, wide]
    maps = CA.query_attention_maps(hfclip, ims, texts)
    assert [tuple(m.shape) for m in maps] == [(32, 32), (64, 64), (48, 32), (32, 56)]
    weighted, vanilla = CA.query_attention_map_pairs(hfclip, ims, texts)
    plain = CA.query_attention_maps(hfclip, ims, texts, weighted=False)
    assert all(torch.equal(a, b) for a, b in zip(weighted, maps))
    assert all(torch.equal(a, b) for a, b in zip(vanilla, plain)) and len(vanilla) == len(plain) == 4
    pixels = hfclip._pixels(ims)
    tok = hfclip.tokens(texts)
    att, grad, _ = CA.cls_attention_and_grad(hfclip.model, pixels, **tok)
    # Square images: the map is the grid upsampled to the image, min-max normalised.
    torch.testing.assert_close(maps[0], CA.query_attention_map(att[:1], grad[:1], (4, 4), (32, 32))[0])
    torch.testing.assert_close(maps[1], CA.query_attention_map(att[1:2], grad[1:2], (4, 4), (64, 64))[0])
    a = CA.head_mean(att, grad)
    # Tall 48x32: rows 8..40 hold the grid upsampled to 32x32, the centre crop's cut rows are 0.
    torch.testing.assert_close(maps[2][8:40].double(), _minmax_ref(_bilinear_ref(a[2].view(4, 4), 32, 32)),
                               atol=1e-6, rtol=0)
    assert torch.equal(maps[2][:8], torch.zeros(8, 32)) and torch.equal(maps[2][40:], torch.zeros(8, 32))
    # Wide 32x56: columns 12..44.
    torch.testing.assert_close(maps[3][:, 12:44].double(), _minmax_ref(_bilinear_ref(a[3].view(4, 4), 32, 32)),
                               atol=1e-6, rtol=0)
    assert not maps[3][:, :12].any() and not maps[3][:, 44:].any()
    # The vanilla map does not depend on the query; the query-aware one does.
    van = CA.query_attention_maps(hfclip, [square, square], ["red cat", "blue dog"], weighted=False)
    torch.testing.assert_close(van[0], van[1])
    qa = CA.query_attention_maps(hfclip, [square, square], ["red cat", "blue dog"])
    assert not torch.allclose(qa[0], qa[1])
    # One image, several queries, one vision pass: the same maps.
    many = CA.image_query_attention_maps(hfclip, tall, texts)
    assert many.shape == (4, 48, 32)
    for t, m in enumerate(CA.query_attention_maps(hfclip, [tall] * 4, texts)):
        torch.testing.assert_close(many[t], m, atol=1e-5, rtol=0)
    assert CA.image_query_attention_maps(hfclip, tall, []).shape == (0, 48, 32)
    box = CA.box_from_map(maps[2])
    assert 8 <= box[1] < box[3] <= 40  # P_t never reaches into the part the model did not see
    assert all(p.grad is None for p in hfclip.model.parameters())
    with pytest.raises(UsageError, match="2 images, 1 texts"):
        CA.query_attention_maps(hfclip, [square, tall], ["a"])
