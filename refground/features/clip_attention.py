"""Query-aware attention maps from a transformers CLIP (BiCM's QAM module, Sec. 3.2, eqs. 1-5).

For an image ``I`` and a query ``Q``:

* ``att[h, u]`` (eq. 1): the last ViT block's attention of the [CLS] token over image patch ``u`` in head
  ``h`` -- row 0 of the block's softmax probabilities, without the [CLS] column;
* ``S^IQ`` (eq. 2): cosine of the projected image embedding (``visual_projection(post_layernorm(CLS))``)
  and the projected query embedding (``get_text_features``);
* ``alpha[h, u] = dS^IQ / d att[h, u]`` (eq. 3): the gradient with respect to those probabilities,
  taken with :func:`torch.autograd.grad` (the model's parameters' ``.grad`` are never touched);
* ``att~ = att * ReLU(alpha)`` (eq. 4) and ``a_u = mean_h att~[h, u]`` (eq. 5);
* the map ``A``: ``a`` on the patch grid, upsampled bilinearly to the image and min-max normalised to
  [0, 1]; ``weighted=False`` gives the paper's vanilla visual attention map (Table 5: ``mean_h att``).

Pieces: :func:`cls_attention_and_grad` (one image-text pair per row) and
:func:`cls_attention_and_grad_texts` (one image, several texts: one vision pass);
:func:`query_attention_map` (eqs. 4-5 on the patch grid, optional upsampling); :func:`query_attention_maps`
/ :func:`query_attention_map_pairs` / :func:`image_query_attention_maps` (raw images and texts through an
:class:`~refground.features.hf.HFClip`, maps at each image's own size); :func:`box_from_map` (``P_t``);
:func:`processor_grid` and :func:`processor_window` (geometry).

The model must run eager attention (``attn_implementation="eager"``, as :class:`HFClip` loads it): SDPA
and flash attention return no attention probabilities to read or differentiate. The model must have a
[CLS] token (CLIP and its ViT relatives; SigLIP pools with an attention head instead and is refused).

Image geometry: the CLIP image processor resizes the shortest edge to ``size["shortest_edge"]`` (the long
edge to ``int(short * long / short_side)``) and centre-crops ``crop_size`` (top/left offsets
``(resized - crop) // 2``), so for a non-square image the model sees a centred square window of it
(:func:`processor_window`). A map at image size samples the patch grid bilinearly at each pixel centre
inside that window (the same sampling as ``F.interpolate(..., mode="bilinear", align_corners=False)``,
which it equals for a square image), min-max normalises over the window, and gives the pixels outside it
(the ends the centre crop cut off, which the model never saw) 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from refground.errors import UsageError
from refground.features.hf import HFClip, _check_images

DEFAULT_THRESHOLD = 0.7  # Thr_a of box_from_map when not given


# ------------------------------------------------------------------------------------------ helpers


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output with the projection in ``pooler_output``; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _size_value(size: Any, key: str) -> Any:
    """``size[key]`` of an image processor's size (a dict, or transformers 5's SizeDict), None if unset."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block (attention dropout off, so the probabilities read are the ones used)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _check_model(model: Any) -> None:
    """UsageError unless ``model`` is a CLIP-like dual encoder whose vision tower runs eager attention."""
    vision = getattr(model, "vision_model", None)
    if vision is None or not hasattr(model, "visual_projection") or not hasattr(model, "get_text_features"):
        raise UsageError(f"{type(model).__name__} is not a transformers CLIP model (needs vision_model, "
                         "visual_projection and get_text_features)")
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    attn = getattr(layers[-1], "self_attn", None) if layers else None
    # The last layer's own config decides (a config object shared between models can be changed under
    # a model by loading another one with a different attn_implementation).
    impl = getattr(getattr(attn, "config", None) or vision.config, "_attn_implementation", None)
    if impl != "eager":
        raise UsageError(f"query attention maps need the CLIP model loaded with attn_implementation=\"eager\" "
                         f"(it runs {impl!r}, which returns no attention weights)")


def _text_embeddings(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Tensor[T, E] float32 L2-normalised projected text embeddings (no graph: only the image side is
    differentiated)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        mask = None if attention_mask is None else attention_mask.to(device)
        t = _pooled(model.get_text_features(input_ids=input_ids.to(device), attention_mask=mask))
    return F.normalize(t.float(), dim=-1)


def _vision_pass(model: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings Tensor[B, E] float32 L2-normalised, last-block probabilities Tensor[B, H, T, T]),
    both in one autograd graph. Must run under grad mode."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # A leaf that requires grad: the graph is built even when the parameters are frozen (requires_grad
    # False); autograd.grad below only walks the path to the probabilities.
    pixels = pixel_values.detach().to(device=device, dtype=dtype).requires_grad_(True)
    out = model.vision_model(pixel_values=pixels, output_attentions=True, return_dict=True)
    if not out.attentions:
        raise UsageError(f"{type(model).__name__}: the vision model returned no attention weights; load it with "
                         "attn_implementation=\"eager\"")
    probs = out.attentions[-1]
    grid = probs.shape[-1] - 1
    side = int(pixels.shape[-2]) // _patch(model), int(pixels.shape[-1]) // _patch(model)
    if grid != side[0] * side[1]:
        raise UsageError(f"{type(model).__name__}: {probs.shape[-1]} tokens for a {side[0]}x{side[1]} patch grid; "
                         "query attention maps need a [CLS] token followed by the patches")
    f = F.normalize(_pooled(model.visual_projection(out.pooler_output)).float(), dim=-1)
    return f, probs


def _patch(model: Any) -> int:
    return int(model.config.vision_config.patch_size) if hasattr(model.config, "vision_config") \
        else int(model.config.patch_size)


# ------------------------------------------------------------------------------------- eqs. 1 - 3


def cls_attention_and_grad(model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last ViT block's [CLS] attention over the patches, its gradient, and the image-text cosine.

    Args:
        model: a ``transformers.CLIPModel`` (or a CLIP-like model with ``vision_model``,
            ``visual_projection``, ``get_text_features`` and a [CLS] token) loaded with
            ``attn_implementation="eager"``; run in eval mode (restored afterwards).
        pixel_values: Tensor[B, 3, S, S], the image processor's output.
        input_ids: Tensor[B, L] token ids, row b the query of image b.
        attention_mask: Tensor[B, L] or None.

    Returns:
        ``att`` Tensor[B, H, U] float32 (eq. 1: ``attentions[-1][:, :, 0, 1:]``, H heads, U = gh * gw patches
        in row-major grid order), ``grad`` Tensor[B, H, U] float32 (eq. 3: dS^IQ_b / d att_b, through the
        rest of the last block, the post-layernorm and the projection), ``sim`` Tensor[B] float32 (eq. 2).
        All detached, on the model's device. Rows are independent (eval mode): ``grad`` is that of
        ``sim.sum()``. The parameters' ``.grad`` are left as they were.
    """
    _check_model(model)
    if pixel_values.ndim != 4 or input_ids.ndim != 2 or len(pixel_values) != len(input_ids):
        raise UsageError(f"pixel_values [B, 3, S, S] and input_ids [B, L] with one row per pair, got "
                         f"{tuple(pixel_values.shape)} and {tuple(input_ids.shape)}")
    with _eval_mode(model), torch.enable_grad():
        text = _text_embeddings(model, input_ids, attention_mask)
        f, probs = _vision_pass(model, pixel_values)
        sim = (f * text).sum(-1)
        (g,) = torch.autograd.grad(sim.sum(), probs)
    return probs[:, :, 0, 1:].detach().float(), g[:, :, 0, 1:].float(), sim.detach()


def cls_attention_and_grad_texts(model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                                 attention_mask: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image against T texts with one vision pass: ``att`` Tensor[H, U], ``grad`` Tensor[T, H, U],
    ``sim`` Tensor[T] (float32, detached), each text's row equal to :func:`cls_attention_and_grad` of the pair.

    ``pixel_values``: Tensor[1, 3, S, S] (or [3, S, S]); ``input_ids``: Tensor[T, L]. The vision graph is
    kept for T backward passes that each walk only the last block's path from the probabilities to the
    embedding (far cheaper than T vision passes)."""
    _check_model(model)
    if pixel_values.ndim == 3:
        pixel_values = pixel_values[None]
    if pixel_values.ndim != 4 or len(pixel_values) != 1 or input_ids.ndim != 2:
        raise UsageError(f"one image [1, 3, S, S] and input_ids [T, L], got {tuple(pixel_values.shape)} and "
                         f"{tuple(input_ids.shape)}")
    with _eval_mode(model), torch.enable_grad():
        text = _text_embeddings(model, input_ids, attention_mask)
        f, probs = _vision_pass(model, pixel_values)
        sims = (f * text).sum(-1)  # [T]
        grads = [torch.autograd.grad(sims[t], probs, retain_graph=t + 1 < len(sims))[0][0, :, 0, 1:]
                 for t in range(len(sims))]
    h, u = probs.shape[1], probs.shape[-1] - 1
    g = torch.stack(grads).float() if grads else probs.new_zeros(0, h, u, dtype=torch.float32)
    return probs[0, :, 0, 1:].detach().float(), g, sims.detach()


# ------------------------------------------------------------------------------------- eqs. 4 - 5


def _minmax(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-map min-max normalisation of Tensor[B, H, W] to [0, 1] over ``mask`` (Tensor[B, H, W] bool or
    None: everywhere); a constant map gives zeros (no division by zero); outside ``mask`` 0."""
    flat = x.flatten(1)
    m = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.flatten(1)
    lo = torch.where(m, flat, torch.inf).amin(1, keepdim=True)
    hi = torch.where(m, flat, -torch.inf).amax(1, keepdim=True)
    span = hi - lo
    # A constant map upsampled in float32 varies in its last bit (1e-7 relative): that is no signal to stretch
    ok = span > 1e-6 * torch.maximum(lo.abs(), hi.abs())
    out = torch.where(ok, (flat - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(flat))
    return torch.where(m, out, torch.zeros_like(out)).view_as(x)


def head_mean(att: torch.Tensor, grad: torch.Tensor | None, weighted: bool = True) -> torch.Tensor:
    """``a`` Tensor[B, U] (eq. 5): mean over heads of ``att * ReLU(grad)`` (eq. 4), or of ``att`` when
    ``weighted`` is False (the vanilla visual attention). att, grad: Tensor[B, H, U]."""
    if weighted:
        if grad is None or grad.shape != att.shape:
            raise UsageError(f"weighted maps need grad of att's shape {tuple(att.shape)}")
        return (att * grad.clamp_min(0)).mean(1)
    return att.mean(1)


def query_attention_map(att: torch.Tensor, grad: torch.Tensor | None, grid: tuple[int, int],
                        out_size: tuple[int, int] | None = None, weighted: bool = True) -> torch.Tensor:
    """The attention map ``A`` of eqs. 4-5: Tensor[B, gh, gw] or, with ``out_size`` (H, W), Tensor[B, H, W].

    ``att``, ``grad``: Tensor[B, heads, U] with U = gh * gw patches in row-major order
    (:func:`cls_attention_and_grad`); ``grid``: (gh, gw). The head mean (:func:`head_mean`) is upsampled
    bilinearly (``align_corners=False``) to ``out_size``, then min-max normalised per map to [0, 1] (a
    constant map gives zeros). This covers the pixel_values square; for a map in the coordinates of the
    original (possibly non-square) image use :func:`query_attention_maps`."""
    gh, gw = int(grid[0]), int(grid[1])
    if att.ndim != 3 or att.shape[-1] != gh * gw:
        raise UsageError(f"att must be [B, heads, {gh * gw}] for a {gh}x{gw} grid, got {tuple(att.shape)}")
    a = head_mean(att.float(), None if grad is None else grad.float(), weighted).view(-1, 1, gh, gw)
    if out_size is not None:
        a = F.interpolate(a, size=(int(out_size[0]), int(out_size[1])), mode="bilinear", align_corners=False)
    return _minmax(a[:, 0])


# ------------------------------------------------------------------------------------ geometry


def processor_grid(model_config: Any) -> tuple[int, int]:
    """(gh, gw): the patch grid of the vision tower, ``image_size // patch_size`` per side, from a CLIP config
    (its ``vision_config``) or a vision config; ``image_size`` may be an int or (height, width)."""
    vc = getattr(model_config, "vision_config", None) or model_config
    size, patch = vc.image_size, vc.patch_size
    sh, sw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    return sh // ph, sw // pw


def processor_window(image_processor: Any, height: int, width: int) -> tuple[float, float, float, float]:
    """The part of a ``height`` x ``width`` image that the CLIP image processor's output shows: (x1, y1, x2,
    y2) in the image's pixels (continuous, may reach beyond the image where the processor pads).

    Resize: ``size={"shortest_edge": s}`` scales the short side to s and the long side to
    ``int(s * long / short)``; ``size={"height", "width"}`` to that size; ``do_resize=False`` keeps it.
    Centre crop (``do_center_crop``): ``crop_size`` at top/left ``(resized - crop) // 2``. UsageError for
    other size conventions (``longest_edge``, ``max_height``)."""
    h, w = int(height), int(width)
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_resize", True):
        short = _size_value(size, "shortest_edge")
        if short and not _size_value(size, "longest_edge"):
            s = int(short)
            nh, nw = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
        elif _size_value(size, "height") and _size_value(size, "width"):
            nh, nw = int(_size_value(size, "height")), int(_size_value(size, "width"))
        else:
            raise UsageError(f"{type(image_processor).__name__}: unsupported resize size {size!r} for query "
                             "attention maps (shortest_edge, or height and width)")
    else:
        nh, nw = h, w
    top, left, ch, cw = 0, 0, nh, nw
    if getattr(image_processor, "do_center_crop", False):
        crop = getattr(image_processor, "crop_size", None)
        ch, cw = int(_size_value(crop, "height")), int(_size_value(crop, "width"))
        top, left = (nh - ch) // 2, (nw - cw) // 2
    sy, sx = h / nh, w / nw
    return left * sx, top * sy, (left + cw) * sx, (top + ch) * sy


def grid_to_image_pair(a: torch.Tensor, size: tuple[int, int], window: tuple[float, float, float, float]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grid_to_image` raw and normalised from one bilinear sampling: (raw Tensor[H, W], normalised
    Tensor[H, W]) (BiCM reads both: S^TD the raw map, P_t the normalised one)."""
    hh, ww = int(size[0]), int(size[1])
    x1, y1, x2, y2 = (float(v) for v in window)
    xs = torch.arange(ww, dtype=torch.float32, device=a.device) + 0.5
    ys = torch.arange(hh, dtype=torch.float32, device=a.device) + 0.5
    u = (xs - x1) / (x2 - x1)  # position in the window, [0, 1) inside
    v = (ys - y1) / (y2 - y1)
    gx, gy = (2 * u - 1).view(1, ww).expand(hh, ww), (2 * v - 1).view(hh, 1).expand(hh, ww)
    sampled = F.grid_sample(a.float()[None, None], torch.stack([gx, gy], -1)[None], mode="bilinear",
                            padding_mode="border", align_corners=False)[0, 0]
    inside = ((v >= 0) & (v < 1)).view(hh, 1) & ((u >= 0) & (u < 1)).view(1, ww)
    raw = torch.where(inside, sampled, torch.zeros_like(sampled))
    return raw, _minmax(sampled[None], inside[None])[0]


def grid_to_image(a: torch.Tensor, size: tuple[int, int], window: tuple[float, float, float, float],
                  normalise: bool = True) -> torch.Tensor:
    """Patch-grid values ``a`` Tensor[gh, gw] (unnormalised) as a map Tensor[H, W] of the image of ``size``
    (H, W) whose ``window`` (x1, y1, x2, y2 pixels, :func:`processor_window`) the grid covers: bilinear
    samples at the pixel centres inside the window (``align_corners=False`` convention, edge values
    repeated at the window's border), min-max normalised over them (``normalise=False``: the raw samples,
    the scale BiCM's S^TD reads); 0 outside the window."""
    raw, normalised = grid_to_image_pair(a, size, window)
    return normalised if normalise else raw


# ------------------------------------------------------------------------------- raw images + texts


def _maps(clip: HFClip, images: Sequence[np.ndarray], texts: Sequence[str],
          modes: tuple[bool, ...]) -> list[list[torch.Tensor]]:
    """Per mode (True: query-aware, False: vanilla) the maps of every (image, text) pair, all from one
    forward and backward pass per batch (see :func:`query_attention_maps`)."""
    if len(images) != len(texts):
        raise UsageError(f"query_attention_maps pairs images and texts: {len(images)} images, {len(texts)} texts")
    _check_images(images)
    model, patch = clip.model, _patch(clip.model)
    out: list[list[torch.Tensor]] = [[] for _ in modes]
    for k in range(0, len(images), clip.batch_size):
        ims, txt = list(images[k:k + clip.batch_size]), list(texts[k:k + clip.batch_size])
        pixels = clip._pixels(ims)
        att, grad, _ = cls_attention_and_grad(model, pixels, **clip.tokens(txt))
        grid = int(pixels.shape[-2]) // patch, int(pixels.shape[-1]) // patch
        windows = [processor_window(clip.processor.image_processor, *im.shape[:2]) for im in ims]
        for maps, weighted in zip(out, modes):
            a = head_mean(att, grad, weighted).view(-1, *grid).cpu()
            maps.extend(grid_to_image(ab, im.shape[:2], w) for im, ab, w in zip(ims, a, windows))
    return out


def query_attention_maps(clip: HFClip, images: Sequence[np.ndarray], texts: Sequence[str],
                         weighted: bool = True) -> list[torch.Tensor]:
    """The query-aware attention map of each (image, text) pair at the image's own size.

    ``images``: uint8[H_i, W_i, 3] RGB; ``texts``: one query per image. Returns per pair Tensor[H_i, W_i]
    float32 CPU in [0, 1] (:func:`grid_to_image`: min-max over the part the processor's centre crop keeps, 0
    outside it). ``weighted=False``: the vanilla visual attention map (the texts are still encoded, unused
    by the map). Batched by ``clip.batch_size`` pairs; tokenised as :meth:`HFClip.embed_texts` does."""
    return _maps(clip, images, texts, (weighted,))[0]


def query_attention_map_pairs(clip: HFClip, images: Sequence[np.ndarray], texts: Sequence[str]
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(query-aware maps, vanilla maps) of :func:`query_attention_maps`, both from the same passes (half the
    work of asking for each)."""
    weighted, vanilla = _maps(clip, images, texts, (True, False))
    return weighted, vanilla


def image_query_attention_maps(clip: HFClip, image: np.ndarray, texts: Sequence[str],
                               weighted: bool = True) -> torch.Tensor:
    """The maps of one image for several queries with one vision pass (:func:`cls_attention_and_grad_texts`):
    Tensor[T, H, W] float32 CPU, row t equal to :func:`query_attention_maps` of (image, texts[t])."""
    _check_images([image])
    model, patch = clip.model, _patch(clip.model)
    hh, ww = image.shape[:2]
    if not len(texts):
        return torch.zeros(0, hh, ww)
    pixels = clip._pixels([image])
    grid = int(pixels.shape[-2]) // patch, int(pixels.shape[-1]) // patch
    window = processor_window(clip.processor.image_processor, hh, ww)
    maps = []
    for k in range(0, len(texts), clip.batch_size):
        att, grad, _ = cls_attention_and_grad_texts(model, pixels, **clip.tokens(texts[k:k + clip.batch_size]))
        a = head_mean(att.expand_as(grad), grad, weighted).view(-1, *grid).cpu()
        maps.extend(grid_to_image(ab, (hh, ww), window) for ab in a)
    return torch.stack(maps)


# ------------------------------------------------------------------------------------------- P_t


def _component(mask: torch.Tensor, seed: tuple[int, int]) -> torch.Tensor:
    """The 4-connected component of ``mask`` (Tensor[H, W] bool) holding pixel ``seed`` (row, col).

    Vectorised: alternate sweeps along rows and along columns; a sweep marks every run (maximal stretch of
    mask pixels in one row, or column) that touches the component. Each pass costs O(H W); the number of
    passes is the number of turns along the component's paths, not its length (a plain 3x3 dilation
    would need as many passes as the component is long)."""
    comp = torch.zeros_like(mask)
    comp[seed] = True

    def sweep(m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        hh, ww = m.shape
        prev = torch.zeros_like(m)
        prev[:, 1:] = m[:, :-1]
        start = (m & ~prev).flatten()  # a run starts where the left neighbour (or the row start) is off
        run = torch.cumsum(start.long(), 0) - 1
        mf, cf = m.flatten(), c.flatten()
        hit = torch.zeros(int(start.sum()) + 1, dtype=torch.bool, device=m.device)
        hit[run[mf & cf]] = True
        return (mf & hit[run.clamp_min(0)]).view(hh, ww)

    while True:
        new = sweep(mask, comp)
        new = sweep(mask.T.contiguous(), new.T.contiguous()).T
        if torch.equal(new, comp):
            return comp
        comp = new


def box_from_map(attention_map: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """``P_t``: the tight box of the map's region at or above ``threshold`` around its maximum.

    ``attention_map``: Tensor[H, W] (a min-max normalised map, :func:`query_attention_maps`). The region is
    the 4-connected component of ``map >= threshold`` containing the maximum (its first pixel in row-major
    order when tied), not all pixels above the threshold: a second, separate blob above ``threshold``
    (another salient object) would otherwise stretch the box across the gap between them. When no pixel
    reaches ``threshold`` (a constant map normalises to all zeros) the region is the component of the
    pixels equal to the maximum (for a constant map: the whole image).

    Returns Tensor[4] float32 xyxy in pixels with pixel edges as coordinates (a single pixel (r, c) is
    ``[c, r, c + 1, r + 1]``), so the box of the whole map is ``[0, 0, W, H]``."""
    m = attention_map.detach()
    if m.ndim != 2 or m.numel() == 0:
        raise UsageError(f"box_from_map needs a non-empty [H, W] map, got {tuple(m.shape)}")
    if torch.isnan(m).any():
        raise UsageError("box_from_map: the map has NaN values")
    flat = int(torch.argmax(m))
    seed = (flat // m.shape[1], flat % m.shape[1])
    mask = m >= min(float(threshold), float(m[seed]))
    comp = _component(mask, seed)
    rows = torch.nonzero(comp.any(1)).flatten()
    cols = torch.nonzero(comp.any(0)).flatten()
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
