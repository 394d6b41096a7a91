"""VL-NMS: query-aware proposals (Ref-NMS, AAAI 2021 / VL-NMS journal version; ../shared/papers/vlnms.txt Sec. 3).

A lightweight *relatedness module* scores every detected box against a text query; the score r_i is fused
with the detector's confidence c_i as s_i = r_i * c_i, and s replaces c as the suppression criterion of
NMS, so proposals related to the query survive the filter (:func:`refground.boxes.fused_nms`).

1. :class:`RelatednessFC` (VL-NMS-FC, Sec. 3.2.1): a Bi-GRU gives word features w_j; each box attends over
   the words (eq. 1) and the attended query feature is fused with the box feature into r_i (eq. 2).
2. :class:`RelatednessTrans` (VL-NMS-Trans, Sec. 3.2.2): visual tokens (region feature + 5-d location) and
   text tokens ([CLS] words [SEP]) through a shallow transformer encoder; r_i and box offsets t_i from each
   visual token's output (eq. 3).
3. Training objectives (Sec. 3.4): binary cross-entropy (eq. 4, :func:`bce_loss`), the margin ranking loss
   with sampling-after-splitting (eq. 5, :func:`ranking_pairs`, :func:`ranking_loss`), and smooth-L1 box
   regression on positives (eqs. 6-7, :func:`regression_targets`, :func:`regression_loss`), combined by
   :func:`vlnms_loss`.

Choices where the paper is silent or where this toolkit differs (each one a config field):

* ``gru_hidden`` is the hidden size of *each* GRU direction (the authors' code: ``nn.GRU(300, 256,
  bidirectional=True)``), so word features have q = 2 * gru_hidden dimensions; MLP_a / MLP_b map v -> mlp_dim ->
  q (the authors' code: 2048 -> 1024 -> 512).
* Eq. 1 read literally (a_ij = FC_s([v^a_i; w_j]) with one linear FC_s, as in the authors' code) splits into
  u.v^a_i + u'.w_j + b, and the softmax over the words cancels the box term: alpha_ij is the same for every
  box, and q is one attended query vector per expression. That is the default (``attention_dim=0``): on the
  default world it reaches the same val referent recall@10 as a box-dependent additive attention
  (``attention_dim > 0``: a_ij = u^T tanh(W [v^a_i; w_j] + b_W), the "soft attention" of the cited work;
  94.97% against 95.27% after one epoch with 32 hidden units) and costs half as much per image at inference,
  since the [queries, boxes, words, hidden] attention tensor dominates the cost of applying VL-NMS-FC.
* VL-NMS-Trans: [CLS] and [SEP] are two extra learned token ids (``vocab_size`` and ``vocab_size + 1``), so
  the vocabulary needs no special words; text tokens are LayerNorm(token + position + segment embedding)
  (BERT), visual tokens LayerNorm(W_v v_i + W_l l_i) (ViLBERT's image embedding), one segment only. The
  "two-layer Transformer and co-attention network" is a plain 2-layer self-attention encoder over the joint
  sequence (post-norm, GELU); words must be left-aligned (padding after the last word).
* Region features are standardised per dimension with the training set's mean and standard deviation,
  stored with the weights (:meth:`RelatednessFC.set_feature_stats`), as for CMRIN.
* The regression targets use the R-CNN box coder with weights (10, 10, 5, 5) (``box_coder_weights``), the
  Faster R-CNN normalisation (py-faster-rcnn's BBOX_NORMALIZE_STDS 0.1, 0.1, 0.2, 0.2; torchvision's RoI
  heads): for positives (IoU > 0.5) the raw deltas stay within about +-0.3, where smooth-L1 with beta 1 is
  purely quadratic and its gradient vanishes; scaled deltas reach its linear part. The smooth-L1 of a box
  is summed over its 4 offsets (Fast R-CNN) and averaged over the positive boxes (eq. 7).
* BCE (eq. 4) is averaged over each query's valid boxes, then over the queries.
* CPU-sized defaults, measured on the default world (2 cores; a training batch is 64 queries over all of
  their images' ~81 pre-NMS detections): Bi-GRU 128 per direction (paper 256), mlp_dim 256 (paper code 1024),
  transformer 128-d, 4 heads, 2 layers, FFN 256 (paper 256-d BERT-style), visual_dim 256
  (the built-in detector's features; the paper's 2048-d ResNet head), dropout 0.1. At the paper's GRU size
  VL-NMS-FC costs 180 s per epoch against 62 s, at a 256-d transformer VL-NMS-Trans 1.8 s per step against
  0.42 s. Word embeddings (300, GloVe's size), margin 0.1 and top-h 100 follow the paper. Adam with learning
  rate 1e-3 for 4 epochs, divided by 10 for the last (VL-NMS-FC reaches 95% val referent recall@10 after one
  epoch); the paper's per-module rates (4e-4 head, 2e-6 / 5e-3 rest) apply to its fine-tuned detector head
  and BERT, which this toolkit keeps frozen or does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refground.boxes import BoxCoder, box_area
from refground.errors import UsageError, check_choice, check_known_fields
from refground.grounding.rnn import run_packed

VARIANTS = ("fc", "trans")
LOSSES = ("bce", "rank")
NUM_Q_LEVELS = 6  # q-values 0..5 (eq. 5's "6 subsets")


@dataclass
class VLNMSConfig:
    """Everything that defines a VL-NMS relatedness module and its training (saved as a run's config.json).

    ``regression`` None means "the variant's default": on for ``trans`` (eq. 3's MLP_t), off for ``fc`` (which
    has no regression head); it is resolved in ``__post_init__``, so :meth:`to_dict` stores a bool.
    """

    variant: str = "fc"
    loss: str = "bce"
    vocab_size: int = 2
    visual_dim: int = 256
    # VL-NMS-FC
    word_dim: int = 300
    gru_hidden: int = 128
    mlp_dim: int = 256
    attention_dim: int = 0
    # VL-NMS-Trans
    trans_dim: int = 128
    trans_heads: int = 4
    trans_layers: int = 2
    trans_ff: int = 256
    max_words: int = 40
    regression: bool | None = None
    # objectives
    margin: float = 0.1
    top_h: int = 100
    reg_weight: float = 1.0
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    dropout: float = 0.1
    # optimisation (the learning rate drops 10x after lr_decay_epochs epochs; 0: never)
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    lr_decay_epochs: int = 3

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        check_choice("loss", self.loss, LOSSES)
        if self.regression is None:
            self.regression = self.variant == "trans"
        if self.regression and self.variant != "trans":
            raise UsageError("only the trans variant has a regression head (eq. 3); use regression=False")
        for name in ("vocab_size", "visual_dim", "word_dim", "gru_hidden", "mlp_dim", "trans_dim", "trans_heads",
                     "trans_layers", "trans_ff", "max_words", "top_h", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.attention_dim < 0:
            raise UsageError(f"attention_dim must be >= 0 (0: eq. 1's single FC), got {self.attention_dim}")
        if self.trans_dim % self.trans_heads:
            raise UsageError(f"trans_dim {self.trans_dim} must be a multiple of trans_heads {self.trans_heads}")
        if self.lr_decay_epochs < 0:
            raise UsageError("lr_decay_epochs must be >= 0")
        if not self.lr > 0:
            raise UsageError("lr must be positive")
        if not self.margin >= 0:
            raise UsageError("margin must be >= 0")
        if not self.reg_weight >= 0:
            raise UsageError("reg_weight must be >= 0")
        if not 0 <= self.dropout < 1:
            raise UsageError("dropout must be in [0, 1)")
        self.box_coder_weights = tuple(float(w) for w in self.box_coder_weights)  # type: ignore[assignment]
        if len(self.box_coder_weights) != 4 or not all(w > 0 for w in self.box_coder_weights):
            raise UsageError(f"box_coder_weights must be 4 positive numbers, got {self.box_coder_weights}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box_coder_weights"] = list(self.box_coder_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLNMSConfig:
        check_known_fields(cls, d, "VL-NMS config")
        return cls(**d)


def spatial_vector(boxes: Tensor, image_size: tuple[int, int] | Sequence[float] | Tensor) -> Tensor:
    """The 5-d location of Sec. 3.2.2: [x1/W, y1/H, x2/W, y2/H, area/(W H)].

    boxes: Tensor[..., 4] xyxy pixels; image_size: (height, width), or Tensor[..., 2] of (height, width)
    broadcastable to boxes' leading shape. Returns Tensor[..., 5] (float).
    """
    b = boxes if boxes.is_floating_point() else boxes.float()
    size = torch.as_tensor(image_size, dtype=b.dtype, device=b.device)
    h, w = size[..., 0:1], size[..., 1:2]
    scale = torch.cat([w, h, w, h], dim=-1)
    return torch.cat([b / scale, (box_area(b)[..., None] / (w * h)).to(b.dtype)], dim=-1)


class _Standardise(nn.Module):
    """Per-dimension standardisation of region features with stored training statistics (buffers)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=1e-3))

    def forward(self, features: Tensor, box_mask: Tensor) -> Tensor:
        x = (features - self.feature_mean) / self.feature_std
        # Padded rows may hold anything (even non-finite values): zero them so nothing leaks.
        return torch.where(box_mask[..., None], x, torch.zeros_like(x))


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for n in range(len(dims) - 1):
        layers.append(nn.Linear(dims[n], dims[n + 1]))
        if n < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TextEncoder(nn.Module):
    """e_q of Sec. 3.2.1: word embeddings and a Bi-GRU. forward(words: LongTensor[B, T] (0 = padding)) ->
    w: Tensor[B, T, 2 * gru_hidden] word features (zero at padding)."""

    def __init__(self, vocab_size: int, word_dim: int, gru_hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, gru_hidden, batch_first=True, bidirectional=True)

    def forward(self, words: Tensor) -> Tensor:
        return run_packed(self.gru, self.embed(words), words)[0]


class RelatednessFC(nn.Module):
    """VL-NMS-FC (eqs. 1-2).

    v^a_i = MLP_a(v_i);  a_ij = FC_s([v^a_i; w_j]);  alpha_ij = softmax_j(a_ij);  q_i = sum_j alpha_ij w_j   (eq. 1)
    (with ``attention_dim=0``, the literal single-layer FC_s, the v^a_i term cancels in the softmax: alpha and
    q are computed once per query from the word half of FC_s, and MLP_a is not built)
    v^b_i = MLP_b(v_i);  m_i = L2Norm(v^b_i * q_i);  r_i = sigmoid(FC_r(m_i))                               (eq. 2)

    forward(words: LongTensor[B, T] (0 = padding, left-aligned), features: Tensor[B, K, D] region features,
    spatial: Tensor[B, K, 5] (unused by this variant; the common signature), box_mask: BoolTensor[B, K]) ->
    dict with ``logits`` Tensor[B, K] (pre-sigmoid FC_r output; 0 at padding), ``scores`` Tensor[B, K]
    (sigmoid; 0 at padding) and ``attention`` alpha Tensor[B, K, T] (0 at padded words and boxes).
    """

    def __init__(self, config: VLNMSConfig):
        super().__init__()
        self.config = c = config
        q = 2 * c.gru_hidden
        self.standardise = _Standardise(c.visual_dim)
        self.text = TextEncoder(c.vocab_size, c.word_dim, c.gru_hidden)
        self.mlp_b = _mlp([c.visual_dim, c.mlp_dim, q])                                   # MLP_b
        if c.attention_dim:
            self.mlp_a = _mlp([c.visual_dim, c.mlp_dim, q])                               # MLP_a
            self.fc_s = nn.Linear(2 * q, c.attention_dim)                                 # FC_s: W, then u
            # No bias on the last layer (nor on the single FC below): softmax_j cancels it.
            self.fc_u = nn.Linear(c.attention_dim, 1, bias=False)
        else:
            # Eq. 1 literally: FC_s([v^a_i; w_j]) = u_v . v^a_i + u_w . w_j, and softmax over j cancels the
            # first term, so neither MLP_a nor u_v can change alpha; only the word half of FC_s is built.
            self.mlp_a = None
            self.fc_s = nn.Linear(q, 1, bias=False)
            self.fc_u = None
        self.fc_r = nn.Linear(q, 1)                                                       # FC_r
        self.drop = nn.Dropout(c.dropout)

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Per-dimension standardisation of the region features (from the training boxes)."""
        self.standardise.set_feature_stats(mean, std)

    def encode_boxes(self, features: Tensor, box_mask: Tensor) -> dict[str, Tensor]:
        """The query-independent half: v^b = MLP_b(v) and, with the additive attention, v^a = MLP_a(v),
        Tensor[B, K, q] each (keys "vb", "va"). Queries on the
        same image share it (:meth:`score_boxes` takes it indexed by query), which is what makes applying
        VL-NMS to all the queries of an image cost little more than one."""
        x = self.drop(self.standardise(features, box_mask))
        out = {"vb": self.mlp_b(x)}
        if self.mlp_a is not None:
            out["va"] = self.mlp_a(x)
        return out

    def score_boxes(self, words: Tensor, boxes: dict[str, Tensor], box_mask: Tensor) -> dict[str, Tensor]:
        """Eqs. 1-2 for encoded boxes (:meth:`encode_boxes`, one row per query)."""
        q_dim = 2 * self.config.gru_hidden
        word_mask = words != 0
        # A query without words attends uniformly over zero vectors (q_i = 0) instead of a 0/0 softmax.
        word_mask = word_mask | ~word_mask.any(1, keepdim=True)
        w = self.text(words)                                                              # [B, T, q]
        if self.fc_u is None:
            # The box-independent attention of the literal eq. 1: one alpha and one q per query.
            a = (w @ self.fc_s.weight.T).squeeze(-1).masked_fill(~word_mask, float("-inf"))  # [B, T]
            alpha_q = torch.softmax(a, dim=-1)                                            # eq. 1
            q = torch.bmm(alpha_q[:, None, :], w)                                         # [B, 1, q]
            alpha = alpha_q[:, None, :] * box_mask[..., None].to(alpha_q.dtype)           # [B, K, T]
        else:
            va = boxes["va"]                                                              # [B, K, q]
            # FC_s on [v^a_i; w_j] without materialising the concatenation: W [v; w] = W_v v + W_w w.
            wv, ww = self.fc_s.weight[:, :q_dim], self.fc_s.weight[:, q_dim:]
            pre = (va @ wv.T)[:, :, None, :] + (w @ ww.T)[:, None, :, :] + self.fc_s.bias  # [B, K, T, A]
            a = self.fc_u(torch.tanh(pre)).squeeze(-1)                                    # [B, K, T]
            a = a.masked_fill(~word_mask[:, None, :], float("-inf"))
            alpha = torch.softmax(a, dim=-1)                                              # eq. 1
            alpha = alpha * box_mask[..., None].to(alpha.dtype)
            q = alpha @ w                                                                 # [B, K, q]
        m = F.normalize(boxes["vb"] * q, dim=-1)                                          # eq. 2
        logits = self.fc_r(self.drop(m)).squeeze(-1)
        logits = torch.where(box_mask, logits, torch.zeros_like(logits))
        scores = torch.sigmoid(logits) * box_mask.to(logits.dtype)
        return {"logits": logits, "scores": scores, "attention": alpha}

    def forward(self, words: Tensor, features: Tensor, spatial: Tensor, box_mask: Tensor) -> dict[str, Tensor]:
        return self.score_boxes(words, self.encode_boxes(features, box_mask), box_mask)


class RelatednessTrans(nn.Module):
    """VL-NMS-Trans (eq. 3): a shallow transformer over visual and text tokens.

    visual token i: LayerNorm(W_v v_i + W_l l_i) with l_i the 5-d location (:func:`spatial_vector`);
    text tokens [CLS] w_1 .. w_|Q| [SEP]: LayerNorm(token + position + segment embedding). The sequence
    {v_1..v_K, [CLS], w_1..w_|Q|, [SEP]} goes through ``trans_layers`` transformer encoder layers (padded boxes
    and words masked as keys); r_i = sigmoid(FC(h_v_i)), t_i = MLP_t(h_v_i) (two ReLU layers and a linear).

    forward(words: LongTensor[B, T] (0 = padding, left-aligned, T <= max_words), features: Tensor[B, K, D],
    spatial: Tensor[B, K, 5], box_mask: BoolTensor[B, K]) -> dict with ``logits`` Tensor[B, K] (0 at padding),
    ``scores`` Tensor[B, K] (sigmoid; 0 at padding) and, with regression, ``deltas`` Tensor[B, K, 4] (R-CNN
    offsets (t_x, t_y, t_w, t_h) in the coder's scaled units, see :func:`regression_targets`; 0 at padding).
    """

    def __init__(self, config: VLNMSConfig):
        super().__init__()
        self.config = c = config
        d = c.trans_dim
        self.cls_id, self.sep_id = c.vocab_size, c.vocab_size + 1
        self.standardise = _Standardise(c.visual_dim)
        self.visual_proj = nn.Linear(c.visual_dim, d)
        self.location_proj = nn.Linear(5, d)
        self.visual_norm = nn.LayerNorm(d)
        self.token_embed = nn.Embedding(c.vocab_size + 2, d, padding_idx=0)
        self.position_embed = nn.Embedding(c.max_words + 2, d)
        self.segment_embed = nn.Embedding(1, d)
        self.text_norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, c.trans_heads, c.trans_ff, c.dropout, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.trans_layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d, 1)                                                         # FC of eq. 3
        self.mlp_t = _mlp([d, d, d, 4]) if c.regression else None                         # MLP_t of eq. 3
        self.drop = nn.Dropout(c.dropout)

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Per-dimension standardisation of the region features (from the training boxes)."""
        self.standardise.set_feature_stats(mean, std)

    def text_ids(self, words: Tensor) -> Tensor:
        """LongTensor[B, T] words -> LongTensor[B, T + 2]: [CLS] w_1 .. w_n [SEP] then padding (0)."""
        b, t = words.shape
        if t > self.config.max_words:
            raise ValueError(f"queries have {t} word slots, more than max_words={self.config.max_words}")
        lengths = (words != 0).sum(1)
        ids = torch.cat([words.new_full((b, 1), self.cls_id), words, words.new_zeros(b, 1)], dim=1)
        return ids.scatter(1, (lengths + 1)[:, None], self.sep_id)

    def forward(self, words: Tensor, features: Tensor, spatial: Tensor, box_mask: Tensor) -> dict[str, Tensor]:
        ids = self.text_ids(words)
        text_mask = ids != 0
        pos = torch.arange(ids.shape[1], device=ids.device)
        text = self.token_embed(ids) + self.position_embed(pos)[None] + self.segment_embed.weight[0]
        text = self.drop(self.text_norm(text))
        x = self.standardise(features, box_mask)
        loc = torch.where(box_mask[..., None], spatial.to(x.dtype), torch.zeros_like(spatial, dtype=x.dtype))
        vis = self.drop(self.visual_norm(self.visual_proj(x) + self.location_proj(loc)))
        k = vis.shape[1]
        pad = ~torch.cat([box_mask, text_mask], dim=1)
        h = self.encoder(torch.cat([vis, text], dim=1), src_key_padding_mask=pad)
        hv = h[:, :k]
        logits = self.fc(hv).squeeze(-1)
        logits = torch.where(box_mask, logits, torch.zeros_like(logits))
        out = {"logits": logits, "scores": torch.sigmoid(logits) * box_mask.to(logits.dtype)}
        if self.mlp_t is not None:
            deltas = self.mlp_t(hv)
            out["deltas"] = torch.where(box_mask[..., None], deltas, torch.zeros_like(deltas))
        return out


def build_relatedness(config: VLNMSConfig) -> RelatednessFC | RelatednessTrans:
    """The relatedness module of ``config.variant`` ("fc" -> :class:`RelatednessFC`, "trans" ->
    :class:`RelatednessTrans`)."""
    return RelatednessFC(config) if config.variant == "fc" else RelatednessTrans(config)


# ------------------------------------------------------------------------------------------------ objectives


def bce_loss(logits: Tensor, labels: Tensor, box_mask: Tensor) -> Tensor:
    """Eq. 4: binary cross-entropy of r_i = sigmoid(logits) against r*_i, averaged over each query's valid
    boxes, then over the queries that have at least one valid box (0 when none has).

    logits: Tensor[B, K]; labels: Tensor[B, K] r* in {0, 1} (or soft); box_mask: BoolTensor[B, K].
    """
    per_box = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    m = box_mask.to(logits.dtype)
    count = m.sum(1)
    per_query = (torch.where(box_mask, per_box, torch.zeros_like(per_box))).sum(1) / count.clamp(min=1)
    has = count > 0
    if not bool(has.any()):
        return logits.sum() * 0
    return per_query[has].mean()


# q-values are computed in float64 and snapped to a 1e-4 grid, so an IoU of 0.6 stored in float32
# (0.60000002) falls in bin 1, not 2; the snap is far below any IoU difference that matters.
_Q_TOLERANCE = 1e-4


def q_values(rho: Tensor) -> Tensor:
    """Quantised IoU of eq. 5: q = ceil(max(0, rho - 0.5) / 0.1), in 0..5.

    rho: Tensor[...] the largest IoU of each box with the foreground boxes. Boundaries are inclusive on the
    upper side: 0.6 -> 1, 0.7 -> 2, ..., 1.0 -> 5; every rho > 0.5 (a positive) gets at least 1.
    Returns LongTensor[...] like rho.
    """
    r = rho.double()
    x = (r - 0.5) / 0.1
    q = torch.ceil(x - _Q_TOLERANCE).clamp(0, NUM_Q_LEVELS - 1).long()
    return torch.where(r > 0.5, q.clamp(min=1), torch.zeros_like(q))


def ranking_pairs(scores: Tensor, rho: Tensor, box_mask: Tensor, top_h: int = 100
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Sampling-after-splitting pos-neg pairs of eq. 5.

    Positives are the valid boxes with rho > 0.5. For each positive i, the candidate negatives are the same
    query's valid boxes j with q_j < q_i (:func:`q_values`), ranked by predicted score (descending; equal
    scores: lower index first), and the first ``top_h`` of them are its negatives.

    scores: Tensor[B, K] predicted relatedness (only their order matters; not differentiated);
    rho: Tensor[B, K]; box_mask: BoolTensor[B, K]. Returns (query_idx, pos_idx, neg_idx), each LongTensor[N],
    ordered by query, then positive box index, then the negative's rank.

    Vectorised over queries, positives and boxes: one stable sort per query, and one rank table per q-level
    (5 levels) from a cumulative sum over the sorted boxes.
    """
    if top_h < 1:
        raise ValueError(f"top_h must be at least 1, got {top_h}")
    b, k = scores.shape
    device = scores.device
    q = q_values(rho)
    valid = box_mask.bool()
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices          # [B, K]
    q_sorted = q.gather(1, order)
    valid_sorted = valid.gather(1, order)
    levels = torch.arange(1, NUM_Q_LEVELS, device=device)                                     # 1..5
    cand = valid_sorted[None] & (q_sorted[None] < levels[:, None, None])                      # [5, B, K]
    chosen = cand & (cand.cumsum(2) <= top_h)                                                 # first top_h
    pos_q, pos_i = torch.nonzero(valid & (q > 0), as_tuple=True)                               # row-major
    sel = chosen[q[pos_q, pos_i] - 1, pos_q]                                                  # [P, K] sorted
    p, s = torch.nonzero(sel, as_tuple=True)
    query_idx = pos_q[p]
    return query_idx, pos_i[p], order[query_idx, s]


def ranking_loss(scores: Tensor, rho: Tensor, box_mask: Tensor, margin: float = 0.1, top_h: int = 100) -> Tensor:
    """Eq. 5: (1/N) sum over the N pairs of :func:`ranking_pairs` of max(0, r_neg - r_pos + margin); 0 (still
    connected to the graph) when there are no pairs.

    scores: Tensor[B, K] sigmoid relatedness r; rho: Tensor[B, K]; box_mask: BoolTensor[B, K].
    """
    qi, pi, ni = ranking_pairs(scores, rho, box_mask, top_h)
    if qi.numel() == 0:
        return scores.sum() * 0
    return (scores[qi, ni] - scores[qi, pi] + margin).clamp(min=0).mean()


def regression_targets(boxes: Tensor, gt_boxes: Tensor,
                       weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> Tensor:
    """The scale-invariant targets t-hat of eq. 6: R-CNN deltas turning ``boxes`` into ``gt_boxes``
    (:class:`refground.boxes.BoxCoder` with ``weights``, the config's ``box_coder_weights``).

    boxes, gt_boxes: Tensor[..., 4] xyxy pixels (same shape; boxes with positive width and height where the
    target is used). Returns Tensor[..., 4] (t_x, t_y, t_w, t_h); rows with degenerate boxes are non-finite
    and must be left out of the loss (:func:`regression_loss` only reads positives).
    """
    coder = BoxCoder(weights)
    shape = boxes.shape
    b = boxes.reshape(-1, 4)
    g = gt_boxes.reshape(-1, 4).to(b.dtype)
    return coder.encode(g, b).reshape(shape)


def decode_deltas(deltas: Tensor, boxes: Tensor, weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> Tensor:
    """Refined boxes from eq. 3's offsets t_i: Tensor[..., 4] deltas, Tensor[..., 4] xyxy boxes -> Tensor[..., 4]
    xyxy (inverse of :func:`regression_targets`)."""
    coder = BoxCoder(weights)
    return coder.decode(deltas.reshape(-1, 4), boxes.reshape(-1, 4)).reshape(deltas.shape)


def regression_loss(deltas: Tensor, targets: Tensor, positive: Tensor, beta: float = 1.0) -> Tensor:
    """Eqs. 6-7: smooth-L1 (``beta``) of the predicted offsets against the targets, summed over the 4 offsets
    of a box and averaged over the positive boxes; 0 (connected to the graph) without positives.

    deltas, targets: Tensor[..., 4]; positive: BoolTensor[...] (other rows may hold non-finite targets).
    """
    pos = positive.bool()
    if not bool(pos.any()):
        return deltas.sum() * 0
    d, t = deltas[pos], targets[pos].to(deltas.dtype)
    return F.smooth_l1_loss(d, t, reduction="none", beta=beta).sum(-1).mean()


def vlnms_loss(out: dict[str, Tensor], labels: Tensor, rho: Tensor, targets: Tensor | None, box_mask: Tensor,
               config: VLNMSConfig, reg_mask: Tensor | None = None) -> dict[str, Tensor]:
    """The training objective of Sec. 3.4.3: the classification loss of ``config.loss`` (eq. 4 on
    ``out["logits"]``, or eq. 5 on ``out["scores"]``) plus ``reg_weight`` x the regression loss (eq. 7) when
    the model predicts ``deltas``.

    out: a relatedness module's output; labels: Tensor[B, K] r* (1 for boxes with IoU > 0.5 with a foreground
    box); rho: Tensor[B, K] each box's largest IoU with the foreground; targets: Tensor[B, K, 4]
    (:func:`regression_targets` against the matched foreground box; may be None without regression);
    box_mask: BoolTensor[B, K]; reg_mask: BoolTensor[B, K] the boxes the regression learns from (default:
    positives, labels > 0.5; leave out boxes matched to pseudo ground truth, Sec. 3.4.3).
    Returns a dict: ``loss`` (the total), ``cls``, and ``reg`` when there is regression.
    """
    if config.loss == "bce":
        cls = bce_loss(out["logits"], labels, box_mask)
    else:
        cls = ranking_loss(out["scores"], rho, box_mask, config.margin, config.top_h)
    result = {"cls": cls, "loss": cls}
    if "deltas" in out:
        if targets is None:
            raise ValueError("the model predicts box offsets: regression targets are required")
        positive = (labels > 0.5) & box_mask if reg_mask is None else reg_mask.bool() & box_mask
        reg = regression_loss(out["deltas"], targets, positive)
        result["reg"] = reg
        result["loss"] = cls + config.reg_weight * reg
    return result


__all__ = ["LOSSES", "NUM_Q_LEVELS", "RelatednessFC", "RelatednessTrans", "TextEncoder", "VARIANTS", "VLNMSConfig",
           "bce_loss", "build_relatedness", "decode_deltas", "q_values", "ranking_loss",
           "ranking_pairs", "regression_loss", "regression_targets", "spatial_vector", "vlnms_loss"]
