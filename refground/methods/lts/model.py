"""LTS: Locate then Segment (Jing, Kong, Wang, Wang, Li, Tan, CVPR 2021; ../shared/papers/lts.txt, Sec. 3).

The network maps an image's multi-level visual features and a referring expression to a mask:

1. Visual features F_v1, F_v2, F_v3 at strides 32, 16, 8 (Sec. 3.1): the cached dense maps of
   ``refground extract`` (``dense/<name>.zarr``; the built-in detector's frozen FPN plays the paper's
   detection-pretrained Darknet53, any ``--backbone hf:PATH`` maps work the same way).
2. :class:`LanguageEncoder` -- word embeddings (initialised from word vectors, the paper's GloVe), a
   bidirectional GRU (eqs. 1-2, 4) and f_text their average over the words (eq. 3).
3. :class:`MultiLevelFusion` -- F_m1 = g(F_v1 W_v1) * g(f_text W_t) (eq. 5), then twice
   F_mi = concat(g(Up(F_m(i-1)) W_m(i-1)), g(F_vi W_vi)) with x2 nearest upsampling (eqs. 6-7); g = LeakyReLU.
4. Localisation, the position prior H_mask at stride 8: :class:`RelevanceFilter` (the sentence as a 1x1 kernel
   K = f_text W_k over F_m3, eq. 8) or :class:`TransformerLocalizer` (one decoder layer over the flattened
   F_m3 with f_text as the encoder output and fixed sine positional encodings, eq. 9; LTS-Trans).
5. :class:`SegmentationModule` -- ASPP on concat(F_m3, H_mask) and a x2 deconvolution to stride 4 (eq. 10).
6. :func:`lts_loss` -- L = L_seg + lambda L_loc, both pixel-wise BCE against the ground-truth mask downsampled
   to stride 4 and 8 (eqs. 11-13, lambda = 0.1). Inference (:func:`masks_from_logits`): sigmoid, upsample to the
   image, threshold 0.25.

The paper's ablation rows are configurations of this one model (:data:`VARIANTS`, :func:`variant_config`):

===================  ======  ==============  =====  ======  =========================================
variant              fusion  localisation    seg    L_loc   paper
===================  ======  ==============  =====  ======  =========================================
fusion               yes     none            no     --      Table 2 "Fusion"
filter               no      filter          no     --      Table 2 "Filter"
fusion-filter        yes     filter          no     --      Table 2 "Fusion + Filter"
fusion-seg           yes     none            yes    0       Table 2 "Fusion + Seg"
filter-seg           no      filter          yes    0       Table 2 "Filter + Seg"
fusion-filter-seg    yes     filter          yes    0       Table 2 "Fusion + Filter + Seg"
lts                  yes     filter          yes    0.1     Table 2 full model; Tables 4-5 "LTS", n = 1
lts-trans            yes     transformer     yes    0.1     Table 4 "LTS-Trans"
lts-n2, lts-n3       yes     filter x n      yes    0.1     Table 5, n = 2, 3
lts-wordfilter       yes     word filters    yes    0.1     Table 5 "LTS-WordFilter"
===================  ======  ==============  =====  ======  =========================================

Choices where the paper is silent (each one a config field where it can be one):

* Sizes for a CPU (the paper: 300-d GloVe, a 1024-d bi-GRU, d_k = 1024, 45 epochs): embeddings ``word_dim``
  100 (the toolkit's word vectors; their SVD keeps 81 dimensions on the default world), GRU 128 per direction,
  F_m1 ``fusion_dim`` 128 channels, each half of the concat of eq. 7 ``level_dim`` 32 channels (F_m2, F_m3: 64),
  d_k = the channels of F_m3 (the kernel must match them), ASPP ``aspp_dim`` 32 channels per branch, 7 epochs
  (the x0.1 step after 5). The budget is 15 minutes of training on two cores: 48 channels for both train 1.55x
  slower per query, and their 6 epochs (18.5 minutes) reached 53.3% val overall IoU.
* F_v1 and F_v2 also get F_v3 average-pooled to their strides (``pooled_fine``). The paper's three Darknet53
  levels are all semantic (YOLOv3 detects at each); the built-in detector supervises only its stride-8 level
  (its dense head and RoIAlign read P3), and its coarser FPN levels carry little: linear probes on the default
  world's val objects (the cell at the object's centre, 600 images) find the category at 75% from the stride-8
  map, 43% from stride 16 and 19% from stride 32 (chance 12.5%), the colour at 98%, 22% and 13%. Eq. 5 fuses the
  sentence with the coarsest level, so without this the text meets features that barely know what is where.
  Off for a backbone whose levels are all semantic (``--backbone hf:PATH``).
* Each F_v gets the 8-d spatial map of Hu et al. [11] (the paper's first referring segmentation model, and the
  MCN code LTS builds on) appended before W_v (``coords``): per cell its x and y extent and centre in [-1, 1]
  and 1/w, 1/h. Convolutions are translation-equivariant, so without it "the left square" and "the circle
  above ..." have no absolute position to read except the zero padding at the borders.
* W_v, W_t, W_m are 1x1 convolutions (linear maps per cell) with a bias; Up is nearest-neighbour x2.
* "Without Fusion" (rows Filter, Filter + Seg) keeps the multi-level path but drops the text from it: eq. 5
  becomes F_m1 = g(F_v1 W_v1), so the sentence enters only through the relevance filter's kernel.
* "Without localisation" (rows Fusion, Fusion + Seg): no H_mask. Fusion alone predicts the mask with one
  learned 1x1 convolution on F_m3 (no text-made kernel); Fusion + Seg runs the segmentation module on F_m3 alone.
* "Without Seg" (rows Fusion, Filter, Fusion + Filter): the stride-8 map (H_mask, or the 1x1 output) is the
  prediction, trained with the BCE of eq. 12 at weight 1 and upsampled to the image at inference like P_mask.
* H_mask enters the concat of eq. 10 after a sigmoid (it is trained as a probability by eq. 12; the raw
  response is unbounded), as one extra channel.
* n relevance filters (Table 5): n kernels K_i = f_text W_k^i from one f_text; their n sigmoid maps are n
  channels of the concat of eq. 10 and L_loc is the mean of their n BCE terms; the reported heatmap (and the
  localisation accuracy) is the mean of the n maps.
* The relevance filter's response has a learned scalar bias per kernel (a convolution's bias; eq. 8 is silent).
  Every map trained by BCE starts from the prior logit -4.2 (:data:`PRIOR_LOGIT`).
* WordFilter (Table 5, DMN's kernels): one kernel per word, K_t = h_t W_k; H_mask is the mean over the words of
  the responses conv(K_t, F_m3).
* Transformer (eq. 9): tgt = F_m3 flattened to HW/64 tokens of d channels, memory = f_text projected to d (one
  token); post-norm layer (self-attention, cross-attention, feed-forward of ``trans_ffn`` units, ``trans_heads``
  heads, dropout 0.1), fixed 2-D sine encodings (DETR's) added to the queries and keys of both attention blocks;
  a linear map of each output token gives H_mask. For a CPU the tokens are F_m3 average-pooled 2x2
  (``trans_pool``; 256 tokens instead of 1024) and H_mask is upsampled back to stride 8 bilinearly: self-attention
  over all 1024 stride-8 cells trained at 2-8 queries/s on two cores (measured), 20x slower than the rest of the
  model. ``trans_pool=1`` is the paper's full resolution. With a single memory token the cross-attention weight is 1,
  so it adds one text-made vector at every position; the spatial reasoning is the self-attention's.
* ASPP (DeepLab v3): a 1x1 branch, three 3x3 atrous branches at ``aspp_rates`` (4, 8, 12): DeepLab's (6, 12, 18)
  for output stride 16 scaled to our 32-cell maps, each conv + BatchNorm + ReLU, and an image-pooling branch
  (conv + ReLU: no BatchNorm on a 1x1 map, which a batch of one query cannot normalise); concat, 1x1 projection + BN + ReLU, then a ConvTranspose2d (kernel 4, stride 2) to one channel at stride 4.
* The BCE sums run over the pixels as in eqs. 11-12 and are averaged over the queries of a batch. The
  downsampled ground truth is the area average of the full-resolution mask (a soft target in [0, 1]): at
  stride 4 the default world's smallest objects are 5 pixels wide, where nearest sampling would drop or
  double boundary rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refground.errors import UsageError, check_choice, check_known_fields
from refground.grounding.rnn import run_packed

LOCALIZATIONS = ("filter", "transformer", "none")
VARIANTS = ("fusion", "filter", "fusion-filter", "fusion-seg", "filter-seg", "fusion-filter-seg", "lts",
            "lts-trans", "lts-n2", "lts-n3", "lts-wordfilter")
# Variant -> the fields it sets (everything else is the LTSConfig default, the full model).
_VARIANT_FIELDS: dict[str, dict[str, Any]] = {
    "fusion": {"localization": "none", "seg": False, "loc_weight": 0.0},
    "filter": {"fusion": False, "seg": False, "loc_weight": 0.0},
    "fusion-filter": {"seg": False, "loc_weight": 0.0},
    "fusion-seg": {"localization": "none", "loc_weight": 0.0},
    "filter-seg": {"fusion": False, "loc_weight": 0.0},
    "fusion-filter-seg": {"loc_weight": 0.0},
    "lts": {},
    "lts-trans": {"localization": "transformer"},
    "lts-n2": {"num_filters": 2},
    "lts-n3": {"num_filters": 3},
    "lts-wordfilter": {"word_filter": True},
}
LEAKY_SLOPE = 0.1  # LeakyReLU slope of g (Darknet's)
# Initial bias of every map that BCE trains (filter, transformer output, deconvolution, plain classifier): the
# logit of a 1.5% foreground share, a referent's typical share of the default world's images (RetinaNet's prior
# initialisation). From 0 the first epoch goes to learning that most pixels are background (summed BCE of 2840
# per query at the start instead of about 300).
PRIOR_LOGIT = -4.2


@dataclass
class LTSConfig:
    """LTS hyper-parameters (module docstring: what each choice is and why). ``vocab_size`` and ``visual_dims``
    are set from the data by the trainer."""

    vocab_size: int = 0
    visual_dims: list[int] = field(default_factory=lambda: [64, 64, 64])  # channels of F_v1, F_v2, F_v3
    word_dim: int = 100
    gru_dim: int = 128  # per direction (h_t is 2 * gru_dim)
    fusion_dim: int = 128  # channels of F_m1 (eq. 5)
    level_dim: int = 32  # channels of each half of eq. 7's concat (F_m2, F_m3 have 2 * level_dim)
    fusion: bool = True  # eq. 5 multiplies by g(f_text W_t); off: Table 2's rows without Fusion
    coords: bool = True  # the 8-d spatial map of [11] appended to each F_v (module docstring)
    pooled_fine: bool = True  # F_v1, F_v2 also get F_v3 average-pooled to their stride (module docstring)
    localization: str = "filter"  # "filter" (eq. 8), "transformer" (eq. 9) or "none"
    num_filters: int = 1  # n of Table 5
    word_filter: bool = False  # one kernel per word (Table 5 WordFilter)
    trans_heads: int = 4
    trans_ffn: int = 256
    trans_dropout: float = 0.1
    trans_pool: int = 2  # F_m3 average-pooled by this factor into the decoder's tokens (1: the paper's stride 8)
    seg: bool = True  # the segmentation module (eq. 10); off: the stride-8 map is the prediction
    aspp_dim: int = 32
    aspp_rates: list[int] = field(default_factory=lambda: [4, 8, 12])
    loc_weight: float = 0.1  # lambda of eq. 13
    threshold: float = 0.25  # inference binarisation of the upsampled probability
    # ------------------------------------------------------------------------------------- training
    epochs: int = 7
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay_epochs: int = 5  # x0.1 from this epoch on (the paper's 30 of 45 epochs: 2/3 of them)
    min_word_count: int = 1
    window_images: int = 1024  # images whose dense maps one read brings in (training batches mix their queries)
    # The network under CPU autocast while training: "bfloat16", "float32", or "auto" (bfloat16 where the CPU
    # has native bfloat16 instructions, as the detector's); weights, optimizer and losses stay float32.
    train_precision: str = "auto"

    def __post_init__(self) -> None:
        check_choice("localization", self.localization, LOCALIZATIONS)
        check_choice("train_precision", self.train_precision, ("auto", "float32", "bfloat16"))
        if self.num_filters < 1:
            raise UsageError(f"num_filters must be at least 1, got {self.num_filters}")
        if len(self.visual_dims) != 3:
            raise UsageError(f"visual_dims must give the channels of 3 levels, got {self.visual_dims}")
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"threshold must be in (0, 1), got {self.threshold}")
        if not self.seg and self.localization == "none" and self.loc_weight:
            raise UsageError("loc_weight needs a localisation module (localization filter or transformer)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LTSConfig:
        check_known_fields(cls, d, "LTS config")
        return cls(**d)

    @property
    def has_localization(self) -> bool:
        return self.localization != "none"

    @property
    def prior_channels(self) -> int:
        """Channels the position prior adds to the segmentation input (eq. 10)."""
        if self.localization == "none":
            return 0
        return self.num_filters if self.localization == "filter" and not self.word_filter else 1


def variant_config(variant: str, **overrides: Any) -> LTSConfig:
    """The config of a Table 2 / 4 / 5 row (:data:`VARIANTS`) with ``overrides`` (config fields) on top."""
    check_choice("--variant", variant, VARIANTS)
    return LTSConfig.from_dict({**_VARIANT_FIELDS[variant], **overrides})


def g(x: Tensor) -> Tensor:
    """The paper's g: LeakyReLU."""
    return F.leaky_relu(x, LEAKY_SLOPE)


class LanguageEncoder(nn.Module):
    """Word embeddings -> bi-GRU (eqs. 1-2, 4) -> h_t Tensor[B, T, 2 * gru_dim] (zeros at padding) and
    f_text Tensor[B, 2 * gru_dim], the mean of h_t over the words (eq. 3)."""

    def __init__(self, vocab_size: int, word_dim: int, gru_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(max(1, vocab_size), word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, gru_dim, batch_first=True, bidirectional=True)

    def forward(self, words: Tensor) -> tuple[Tensor, Tensor]:
        h, _ = run_packed(self.gru, self.embed(words), words)
        mask = (words != 0).to(h.dtype)
        f_text = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return h, f_text


SPATIAL_CHANNELS = 8


def spatial_map(h: int, w: int) -> Tensor:
    """The 8-d spatial map of Hu et al. [11] on an h x w grid, Tensor[8, h, w]: each cell's x_min, x_max,
    x_centre, y_min, y_max, y_centre in [-1, 1] (image left/top = -1) and 1/w, 1/h."""
    xs = torch.linspace(-1.0, 1.0, w + 1)
    ys = torch.linspace(-1.0, 1.0, h + 1)
    x0, x1 = xs[:-1][None, :].expand(h, w), xs[1:][None, :].expand(h, w)
    y0, y1 = ys[:-1][:, None].expand(h, w), ys[1:][:, None].expand(h, w)
    return torch.stack([x0, x1, (x0 + x1) / 2, y0, y1, (y0 + y1) / 2,
                        torch.full((h, w), 1.0 / w), torch.full((h, w), 1.0 / h)])


def with_spatial_map(f: Tensor) -> Tensor:
    """Visual features [B, C, h, w] -> [B, C + 8, h, w] with :func:`spatial_map` appended."""
    b, _, h, w = f.shape
    return torch.cat([f, spatial_map(h, w).to(f.dtype)[None].expand(b, -1, -1, -1)], dim=1)


class MultiLevelFusion(nn.Module):
    """Eqs. 5-7: F_v1 [B, d1, h/4, w/4], F_v2 [B, d2, h/2, w/2], F_v3 [B, d3, h, w] and f_text [B, D] -> F_m3
    [B, 2 * level_dim, h, w] (h, w: the stride-8 grid). ``fusion`` False drops the text factor of eq. 5."""

    def __init__(self, visual_dims: list[int], text_dim: int, fusion_dim: int, level_dim: int, fusion: bool,
                 coords: bool = False, pooled_fine: bool = False) -> None:
        super().__init__()
        self.fusion = fusion
        self.coords = coords
        self.pooled_fine = pooled_fine
        extra = SPATIAL_CHANNELS if coords else 0
        fine = visual_dims[2] if pooled_fine else 0
        visual_dims = [visual_dims[0] + fine + extra, visual_dims[1] + fine + extra, visual_dims[2] + extra]
        self.w_v1 = nn.Conv2d(visual_dims[0], fusion_dim, 1)
        self.w_t = nn.Linear(text_dim, fusion_dim) if fusion else None
        self.w_m1 = nn.Conv2d(fusion_dim, level_dim, 1)
        self.w_v2 = nn.Conv2d(visual_dims[1], level_dim, 1)
        self.w_m2 = nn.Conv2d(2 * level_dim, level_dim, 1)
        self.w_v3 = nn.Conv2d(visual_dims[2], level_dim, 1)

    @staticmethod
    def upsample(x: Tensor, like: Tensor) -> Tensor:
        """Eq. 6: x2 nearest upsampling (to ``like``'s grid, which is exactly twice x's for square maps)."""
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    def forward(self, f_v1: Tensor, f_v2: Tensor, f_v3: Tensor, f_text: Tensor) -> Tensor:
        if self.pooled_fine:
            f_v1 = torch.cat([f_v1, F.adaptive_avg_pool2d(f_v3, f_v1.shape[-2:])], dim=1)
            f_v2 = torch.cat([f_v2, F.adaptive_avg_pool2d(f_v3, f_v2.shape[-2:])], dim=1)
        if self.coords:
            f_v1, f_v2, f_v3 = (with_spatial_map(f) for f in (f_v1, f_v2, f_v3))
        f_m1 = g(self.w_v1(f_v1))  # eq. 5
        if self.w_t is not None:
            f_m1 = f_m1 * g(self.w_t(f_text))[:, :, None, None]
        f_m2 = torch.cat([g(self.w_m1(self.upsample(f_m1, f_v2))), g(self.w_v2(f_v2))], dim=1)  # eqs. 6-7, i = 2
        return torch.cat([g(self.w_m2(self.upsample(f_m2, f_v3))), g(self.w_v3(f_v3))], dim=1)  # i = 3


class RelevanceFilter(nn.Module):
    """Eq. 8: H = conv(K, F_m3) with the language-made 1x1 kernel K = f_text W_k (``num_filters`` kernels,
    Table 5), or one kernel per word K_t = h_t W_k averaged over the words (``word_filter``, DMN's).

    F_m3 [B, d, h, w], f_text [B, D], h_t [B, T, D], words [B, T] -> responses [B, n, h, w] (n = 1 for words).
    """

    def __init__(self, text_dim: int, d_k: int, num_filters: int = 1, word_filter: bool = False) -> None:
        super().__init__()
        self.word_filter = word_filter
        self.num_filters = 1 if word_filter else num_filters
        self.w_k = nn.Linear(text_dim, d_k * self.num_filters)
        self.bias = nn.Parameter(torch.full((self.num_filters,), PRIOR_LOGIT))  # the convolution's bias

    def forward(self, f_m3: Tensor, f_text: Tensor, h: Tensor, words: Tensor) -> Tensor:
        b, d = f_m3.shape[:2]
        if self.word_filter:
            kernels = self.w_k(h)  # [B, T, d]
            resp = torch.einsum("btd,bdhw->bthw", kernels, f_m3)
            mask = (words != 0).to(resp.dtype)[:, :, None, None]
            return ((resp * mask).sum(1) / mask.sum(1).clamp(min=1.0))[:, None] + self.bias[:, None, None]
        kernels = self.w_k(f_text).view(b, self.num_filters, d)
        # A batched 1x1 convolution with a per-sample kernel is an inner product at every cell. Unscaled, as eq. 8
        # is written: a 1/sqrt(d_k) factor (attention's) learned slower here (val localisation 26% against 29%
        # after 3 epochs on 6,000 training queries).
        return torch.einsum("bnd,bdhw->bnhw", kernels, f_m3) + self.bias[:, None, None]


def sine_positions(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's fixed 2-D sine positional encoding, Tensor[h * w, dim] (dim even; half for y, half for x), row-major
    over the grid like ``flatten(2)``."""
    if dim % 4:
        raise ValueError(f"the positional encoding needs a dimension divisible by 4, got {dim}")
    quarter = dim // 4
    freq = temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py, px = ys[:, None] / freq, xs[:, None] / freq  # [h, q], [w, q]
    enc_y = torch.cat([py.sin(), py.cos()], 1)[:, None, :].expand(h, w, 2 * quarter)
    enc_x = torch.cat([px.sin(), px.cos()], 1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([enc_y, enc_x], dim=2).reshape(h * w, dim)


class TransformerLocalizer(nn.Module):
    """Eq. 9: one transformer decoder layer, tgt = F_m3 as HW tokens, memory = f_text (one token), fixed sine
    positional encodings added to the queries and keys of each attention block; a linear map per token gives
    H_mask. F_m3 [B, d, h, w], f_text [B, D] -> [B, 1, h, w]."""

    def __init__(self, d: int, text_dim: int, heads: int, ffn: int, dropout: float, pool: int = 1) -> None:
        super().__init__()
        self.pool = max(1, int(pool))
        if d % heads:
            raise UsageError(f"transformer: {d} channels do not split into {heads} heads")
        self.memory = nn.Linear(text_dim, d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(3)])
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d, 1)
        nn.init.constant_(self.out.bias, PRIOR_LOGIT)
        self._pos: dict[tuple[int, int], Tensor] = {}

    def positions(self, h: int, w: int, d: int) -> Tensor:
        if (h, w) not in self._pos:
            self._pos[(h, w)] = sine_positions(h, w, d)
        return self._pos[(h, w)]

    def forward(self, f_m3: Tensor, f_text: Tensor) -> Tensor:
        size = f_m3.shape[-2:]
        if self.pool > 1:
            f_m3 = F.avg_pool2d(f_m3, self.pool, ceil_mode=True)
        b, d, h, w = f_m3.shape
        tgt = f_m3.flatten(2).transpose(1, 2)  # [B, HW, d]
        pos = self.positions(h, w, d).to(tgt.dtype)[None]
        mem = self.memory(f_text)[:, None]  # [B, 1, d]
        q = tgt + pos
        tgt = self.norms[0](tgt + self.drop(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norms[1](tgt + self.drop(self.cross_attn(tgt + pos, mem, mem, need_weights=False)[0]))
        tgt = self.norms[2](tgt + self.drop(self.ffn(tgt)))
        heat = self.out(tgt).transpose(1, 2).reshape(b, 1, h, w)
        return heat if self.pool == 1 else F.interpolate(heat, size=size, mode="bilinear", align_corners=False)


def _conv_bn(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3): a 1x1 branch, 3x3 branches at ``rates``, an image-pooling
    branch, concatenated and projected. x [B, cin, h, w] -> [B, dim, h, w]."""

    def __init__(self, cin: int, dim: int, rates: list[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn(cin, dim), *[_conv_bn(cin, dim, 3, r) for r in rates]])
        # No BatchNorm on the pooled 1x1 map: a batch of one query has one value per channel there.
        self.pool = nn.Sequential(nn.Conv2d(cin, dim, 1), nn.ReLU())
        self.project = _conv_bn(dim * (len(rates) + 2), dim)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([*(b(x) for b in self.branches), pooled], dim=1))


class SegmentationModule(nn.Module):
    """Eq. 10: P_mask = Seg(concat(F_m3, H_mask)): ASPP, then a x2 deconvolution to one channel.
    x [B, cin, h, w] -> logits [B, 1, 2h, 2w] (stride 4)."""

    def __init__(self, cin: int, dim: int, rates: list[int]) -> None:
        super().__init__()
        self.aspp = ASPP(cin, dim, rates)
        self.deconv = nn.ConvTranspose2d(dim, 1, kernel_size=4, stride=2, padding=1)
        nn.init.constant_(self.deconv.bias, PRIOR_LOGIT)

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv(self.aspp(x))


class LTS(nn.Module):
    """The whole network (module docstring). ``forward(f_v1, f_v2, f_v3, words)`` with the dense maps
    Tensor[B, d_i, S/32, S/32], [B, d_i, S/16, S/16], [B, d_i, S/8, S/8] and words LongTensor[B, T] (0 = padding)
    returns ``{"mask": logits at stride 4 [B, 1, S/4, S/4] (with Seg) or stride 8 (without), "heatmaps": the
    localisation responses [B, n, S/8, S/8] (absent without localisation), "heatmap": their mean [B, S/8, S/8]
    (the output map's logits without localisation)}``."""

    def __init__(self, config: LTSConfig) -> None:
        super().__init__()
        self.config = c = config
        text_dim = 2 * c.gru_dim
        d = 2 * c.level_dim
        self.language = LanguageEncoder(c.vocab_size, c.word_dim, c.gru_dim)
        self.fusion = MultiLevelFusion(c.visual_dims, text_dim, c.fusion_dim, c.level_dim, c.fusion, c.coords,
                                       c.pooled_fine)
        self.filter = RelevanceFilter(text_dim, d, c.num_filters, c.word_filter) if c.localization == "filter" else None
        self.transformer = TransformerLocalizer(d, text_dim, c.trans_heads, c.trans_ffn, c.trans_dropout,
                                                c.trans_pool) \
            if c.localization == "transformer" else None
        self.seg = SegmentationModule(d + c.prior_channels, c.aspp_dim, c.aspp_rates) if c.seg else None
        # Fusion without localisation or Seg: a plain learned 1x1 classifier on F_m3.
        self.plain = nn.Conv2d(d, 1, 1) if not c.seg and not c.has_localization else None
        if self.plain is not None:
            nn.init.constant_(self.plain.bias, PRIOR_LOGIT)

    def load_word_vectors(self, matrix: Tensor) -> None:
        """Initialise the embeddings (Tensor[vocab_size, word_dim]; the padding row is kept at zero)."""
        with torch.no_grad():
            self.language.embed.weight.copy_(matrix)
            self.language.embed.weight[0].zero_()

    def forward(self, f_v1: Tensor, f_v2: Tensor, f_v3: Tensor, words: Tensor) -> dict[str, Tensor]:
        h, f_text = self.language(words)
        f_m3 = self.fusion(f_v1, f_v2, f_v3, f_text)
        out: dict[str, Tensor] = {}
        if self.filter is not None:
            heat = self.filter(f_m3, f_text, h, words)
        elif self.transformer is not None:
            heat = self.transformer(f_m3, f_text)
        else:
            heat = None
        if heat is not None:
            out["heatmaps"] = heat
            out["heatmap"] = heat.mean(1)
        if self.seg is not None:
            x = f_m3 if heat is None else torch.cat([f_m3, torch.sigmoid(heat)], dim=1)
            out["mask"] = self.seg(x)
            if heat is None:  # Fusion + Seg: the output map stands in for the heatmap (shown, localisation accuracy)
                out["heatmap"] = F.avg_pool2d(out["mask"], 2)[:, 0]
        elif heat is not None:
            out["mask"] = heat.mean(1, keepdim=True)
        else:
            out["mask"] = self.plain(f_m3)
            out["heatmap"] = out["mask"][:, 0]
        return out


def downsample_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Ground-truth masks [B, H, W] (bool or float) -> soft targets [B, h, w] in [0, 1]: the share of each cell
    covered (area average)."""
    return F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0]


def pixel_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Eqs. 11-12 for a batch: the BCE summed over the pixels of each map, averaged over the batch.
    logits, targets: [B, h, w]."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).sum(1).mean()


def lts_loss(out: dict[str, Tensor], target4: Tensor, target8: Tensor, config: LTSConfig
             ) -> tuple[Tensor, dict[str, float]]:
    """Eq. 13, L = L_seg + lambda L_loc, against the ground-truth mask downsampled to stride 4 (``target4``
    [B, S/4, S/4]) and stride 8 (``target8`` [B, S/8, S/8]), soft targets in [0, 1] (:func:`downsample_masks`).
    L_seg (eq. 11) is at stride 4 with Seg; without Seg the stride-8 map is the output and carries the loss at
    weight 1. L_loc (eq. 12) is the mean over the n responses. Returns (loss, {"seg", "loc"} floats)."""
    mask = out["mask"][:, 0]
    loss_seg = pixel_bce(mask, target4 if config.seg else target8)
    loss, parts = loss_seg, {"seg": float(loss_seg.detach())}
    if config.seg and config.loc_weight and "heatmaps" in out:
        heat = out["heatmaps"]
        loss_loc = torch.stack([pixel_bce(heat[:, i], target8) for i in range(heat.shape[1])]).mean()
        loss = loss + config.loc_weight * loss_loc
        parts["loc"] = float(loss_loc.detach())
    return loss, parts


def upsample_probabilities(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask logits [B, 1, h, w] -> probabilities [B, H, W] at ``size`` (sigmoid, then bilinear upsampling)."""
    return F.interpolate(torch.sigmoid(logits), size=size, mode="bilinear", align_corners=False)[:, 0]


def masks_from_logits(logits: Tensor, size: tuple[int, int], threshold: float = 0.25) -> Tensor:
    """Inference (Sec. 3.4): sigmoid, upsample to the image ``size`` (height, width), binarise at ``threshold``.
    logits [B, 1, h, w] -> bool [B, H, W]."""
    return upsample_probabilities(logits, size) > threshold


def heatmap_points(heatmap: Tensor, size: tuple[int, int]) -> Tensor:
    """The heatmap's maximum as an image point: heatmap [B, h, w] -> float [B, 2] (x, y) pixels of ``size``
    (height, width), the centre of the arg-max cell (the first one in row-major order on ties)."""
    h, w = heatmap.shape[-2:]
    idx = heatmap.flatten(1).argmax(1)
    rows, cols = idx // w, idx % w
    return torch.stack([(cols.float() + 0.5) * size[1] / w, (rows.float() + 0.5) * size[0] / h], dim=1)


__all__ = [
    "ASPP",
    "LTS",
    "VARIANTS",
    "LTSConfig",
    "LanguageEncoder",
    "MultiLevelFusion",
    "RelevanceFilter",
    "SegmentationModule",
    "TransformerLocalizer",
    "downsample_masks",
    "heatmap_points",
    "lts_loss",
    "masks_from_logits",
    "pixel_bce",
    "sine_positions",
    "upsample_probabilities",
    "variant_config",
]
