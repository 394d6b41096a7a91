"""ReIR: Relation-aware Instance Refinement for weakly supervised phrase grounding (Liu, Wan, Ma, He, CVPR 2021;
../shared/papers/reir.txt, Sec. 3-4).

Given an image's M proposals (boxes, region features, detector class labels) and a caption with N noun phrases,
the network scores every phrase-proposal pair at two levels and refines the boxes, trained from image-caption
pairs alone (no phrase-to-box link, no box of the caption's image):

1. Backbone (Sec. 3.2.1): :class:`VisualEncoder` embeds each proposal's region feature fused with its 5-d spatial
   feature to x_o in R^d; :class:`LanguageEncoder` runs an LSTM over the caption's words, x_q = the mean of
   h_t over the phrase's words (eq. 1).
2. Coarse-level matching (Sec. 3.2.2): s^hat = F_cls(x_q, x_o), delta^c = F_reg(x_q, x_o) (eq. 2), the
   phrase-to-class similarity s^a = <E_ext(q), E_ext(c_m)> from word vectors (eq. 3, computed by the data
   loader), s^c = s^hat * s^a and alpha^c = Softmax_m(s^c) (eq. 4); the top K proposals by s^c, their boxes
   refined by delta^c, form V_i.
3. Visual object graph (Sec. 3.2.3, :class:`VisualObjectGraph`): one node per phrase, z_i = sum_k alpha^c_ik x_o
   (eq. 5), an edge where the parser found a relation between two phrases, z'_i = z_i + sum_j w_ij F_M(z_j)
   (eq. 6) with w_ij = Softmax_j(F_M(z_i)^T F_M(z_j)) (eq. 7; uniform 1/|N(i)| for the "w/o attention" row),
   and x'_o = x_o + alpha^c_ik z'_i (eq. 8).
4. Fine-level matching (Sec. 3.2.4): s^f = F_cls(x_q, x'_o) * s^a, alpha^f = Softmax_k(s^f) (eq. 9),
   delta^f = F_reg(x_q, x'_o) (eq. 10). Inference: s = s^c * s^f (eq. 11), the argmax's box refined by
   delta^c then delta^f.
5. Losses (Sec. 3.3, :func:`reir_loss`): L = L_rec + lambda_1 L_reg + lambda_2 L_rel + lambda_3 L_rank (eq. 12),
   (lambda_1, lambda_2, lambda_3) = (0.1, 1, 1).

The ablation rows (Table 2, 3) are configurations of this one model (:data:`VARIANTS`, :func:`variant_config`):

==============  ===  ===  ============  =========  =====================================================
variant         TSD  STR  F_reg input   VOGN & RC  paper
==============  ===  ===  ============  =========  =====================================================
baseline        --   --   --            --         Table 2 "baseline" (coarse level only, L_rec + L_rank)
tsd             yes  --   --            --         "+TSD"
tsd-str-noq     yes  yes  x_o only      --         "+TSD +STR (w/o x_q)"
tsd-str         yes  yes  x_q, x_o      --         "+TSD +STR"
tsd-vogn        yes  --   --            yes        "+TSD +VOGN&RC"
uniform         yes  yes  x_q, x_o      uniform w  "all, w/o attention" (eq. 7 replaced by 1/|N(i)|)
reir            yes  yes  x_q, x_o      yes        "ours", K = 5 (Table 3's middle column)
reir-k3, -k10   yes  yes  x_q, x_o      yes        Table 3, K = 3 and 10
upper-bound     yes  yes  x_q, x_o      yes        not in the paper: the same network plus a cross-entropy on
                                                   the proposal that best covers the true box (supervised)
==============  ===  ===  ============  =========  =====================================================

Choices where the paper is silent (each one a config field where it can be one):

* Sizes for a CPU (the paper: ResNet-101 C4 features, d = 2048, batch 40, 80k SGD iterations at 1e-3): d =
  ``dim`` 256 (the built-in detector's fc7 width), a bidirectional LSTM of 128 per direction (h_t in R^d), Adam
  at 1e-3 for ``epochs`` epochs with a x0.1 step at ``lr_decay_epochs`` (the paper's steps at 32k and 40k of
  80k iterations sit at 40-50%); SGD at 1e-3 needs the paper's 80k steps.
* x_o = W_2 ReLU(LN(W_f f_o) + LN(W_p p_o)) with f_o the region feature, p_o the 5-d spatial feature [x, y, w, h,
  wh] (design.md) and LN a layer norm without affine parameters. The detector's fc7 vectors have norms near 35,
  the spatial feature near 1: concatenated into one layer (W_1 [f_o; p_o], the first try) the position was drowned
  and the relation classifier of eq. 16 stayed at chance (L_rel 2.68 after 8 epochs against 2.77 for uniform
  guesses), while every relation word of the synthetic world is about position. F_cls(x_q, x_o) = w^T ReLU(W_q x_q * W_o x_o) + b: a two-layer network whose
  first layer is a low-rank bilinear map of the pair (MLB-style: each phrase and proposal is projected once and a
  pair costs one element-wise product; a first layer on the concatenated or multiplied d-vectors costs a d x h
  product per pair, 50 x N per caption). F_reg(x_q, x_o) = W_4 ReLU(U_q x_q * U_o x_o + U x_o) -> (dx, dy, dw,
  dh) in the R-CNN parameterisation of :func:`refground.boxes.encode_boxes`; without x_q (Table 2's "w/o x_q")
  W_4 ReLU(U x_o). The coarse and fine levels have their own F_cls and F_reg (the fine level reads
  context-enriched features).
* s^hat = sigmoid(F_cls) and s^a = max(cos, 0), so s^c = s^hat * s^a lies in [0, 1] and is high only where both
  agree (the raw product of an unbounded logit and a cosine would rank a proposal with s^a = 0 above every
  proposal with a negative logit); the softmax of eq. 4 and 9 reads ``score_scale`` * s (a fixed inverse
  temperature, 10: a softmax over values in [0, 1] is otherwise nearly uniform).
* E_ext (eq. 3): the word vectors (the toolkit's own, or ``--word-vectors`` GloVe) of the phrase's head noun
  (:func:`refground.text.nouns.extract_nouns`, its last noun; plurals mapped to the singular) against those of
  the detector's class name of each proposal; the mean of the phrase's words where no noun is found.
* Top-K selection uses s^c, without gradient; alpha^c restricted to V_i is renormalised over the K (eq. 5 sums
  over K, and weights that sum to the coarse mass of V_i would shrink z_i for a phrase with a spread-out
  attention). The fine level re-embeds the K refined boxes: x_o of a selected proposal is computed with the
  spatial feature of its refined box (the region feature is the cached one: the toolkit keeps no feature map to
  re-pool from), so delta^c changes what the fine level sees, and the fine level's boxes are delta^f applied to
  the coarse-refined boxes.
* Graph edges are the parsed relations (``refground pseudo reir``) between two phrases of the caption, both
  directions, whatever the relation's class (an unkept predicate still connects); a node without neighbours
  keeps z'_i = z_i. F_M is a two-layer MLP (d -> d -> d, ReLU). F_rel (eq. 16) is a two-layer MLP on
  [z^f_i; z^f_j] over the C_r kept classes.
* L_rec (eqs. 13-14): one LSTM decoder (hidden ``decoder_dim``) shared by both levels reads [z; word embedding of
  the previous word] (a learned start vector first) and predicts each word of the phrase; L_log is the summed
  negative log-likelihood of the phrase's words; eq. 14's sum runs over a caption's phrases and the batch loss
  is the mean over captions (as for every term).
* L_reg (eq. 15): per phrase the most confident proposal is the argmax of s^c (coarse; boxes: the proposals) and
  of s^f (fine; boxes: the coarse-refined V_i, detached); every box with IoU > tau (0.6) to it regresses towards
  it (target offsets :func:`refground.boxes.encode_boxes`, the target box detached), the others have target =
  prediction (zero loss); smooth L1 (beta 1/9, detectron2's) summed over coordinates and boxes. On from epoch
  ``reg_warmup_epochs`` (the paper: after 7.5k of 80k iterations); before it the regressors are not trained.
* L_rank, the image-caption ranking loss "in the manner of Align2Ground" (the paper leaves its form to the
  supplement): Align2Ground's local matching in the shared embedding, phrase i of caption D attending over image
  I's proposals with alpha = Softmax_m(score_scale cos(x_qi, x_om)), z_i(I) = sum_m alpha_m x_om, and the
  caption-image score S(I, D) = (1/N) sum_i cos(x_qi, z_i(I)). With the batch's other images and captions as
  negatives (pairs of the same image are not negatives), L_rank = (1/B) sum over the B positive pairs of
  sum_{I'} [m - S(I, D) + S(I', D)]_+ + sum_{D'} [m - S(I, D) + S(I, D')]_+, margin ``rank_margin`` 0.2 (VSE's
  hinge triplet form summed over negatives). It trains the encoders that F_cls reads (x_q, x_o); scoring every
  caption against every image with F_cls itself would cost B times the batch's coarse level.
* The upper bound adds, per phrase whose true box (the union box of several) some proposal covers at IoU >= 0.5,
  the cross-entropy of the coarse logits score_scale * s^c over the M proposals towards the best-covering one,
  and of the fine logits over the K towards it where it is in V_i; everything else is the full model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refground.boxes import clip_boxes_to_sizes, decode_boxes, elementwise_box_iou, encode_boxes, spatial_feature
from refground.errors import UsageError, check_choice, check_known_fields
from refground.grounding.rnn import run_packed

VARIANTS = ("baseline", "tsd", "tsd-str-noq", "tsd-str", "tsd-vogn", "uniform", "reir", "reir-k3", "reir-k10",
            "upper-bound")
# Variant -> the fields it sets (everything else is the ReIRConfig default, the full model).
_VARIANT_FIELDS: dict[str, dict[str, Any]] = {
    "baseline": {"two_stage": False, "regression": False, "graph": False},
    "tsd": {"regression": False, "graph": False},
    "tsd-str-noq": {"graph": False, "reg_query": False},
    "tsd-str": {"graph": False},
    "tsd-vogn": {"regression": False},
    "uniform": {"graph_attention": False},
    "reir": {},
    "reir-k3": {"top_k": 3},
    "reir-k10": {"top_k": 10},
    "upper-bound": {"supervised": True},
}
SMOOTH_L1_BETA = 1.0 / 9.0
NEG = -1e4  # masked logits (finite: a row of all-masked entries still has a defined softmax)


@dataclass
class ReIRConfig:
    """ReIR hyper-parameters (module docstring: what each choice is and why). ``vocab_size``, ``visual_dim`` and
    ``num_relations`` are set from the data by the trainer."""

    vocab_size: int = 0
    visual_dim: int = 256  # region feature width (the detector's fc7)
    num_relations: int = 0  # C_r, the kept relation classes of `refground pseudo reir`
    word_dim: int = 100
    dim: int = 256  # d of x_o, x_q (the LSTM's two directions of d / 2), z
    hidden_dim: int = 256  # hidden layer of F_cls, F_reg, F_M, F_rel
    decoder_dim: int = 256
    score_scale: float = 10.0  # inverse temperature of the softmax of eqs. 4 and 9
    top_k: int = 5  # K
    two_stage: bool = True  # TSD: top-K selection and the fine level
    regression: bool = True  # STR: F_reg and L_reg
    reg_query: bool = True  # F_reg reads x_q (Table 2's "w/o x_q" row: False)
    graph: bool = True  # VOGN & RC: the visual object graph and L_rel
    graph_attention: bool = True  # eq. 7 (False: uniform weights, Table 2's "w/o attention")
    supervised: bool = False  # the upper bound: a cross-entropy on the best-covering proposal too
    tau: float = 0.6  # IoU threshold of self-taught regression
    reg_weight: float = 0.1  # lambda_1
    rel_weight: float = 1.0  # lambda_2
    rank_weight: float = 1.0  # lambda_3
    rank_margin: float = 0.2
    sup_weight: float = 1.0  # the upper bound's cross-entropy
    # ------------------------------------------------------------------------------------- training
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay_epochs: int = 6  # x0.1 from this epoch on
    reg_warmup_epochs: int = 1  # L_reg from this epoch on (0-based count of finished epochs)
    min_word_count: int = 1
    max_proposals: int = 50  # M

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {self.top_k}")
        if not 0.0 < self.tau < 1.0:
            raise UsageError(f"tau must be in (0, 1), got {self.tau}")
        if self.dim % 2:
            raise UsageError(f"dim must be even (the bidirectional LSTM's two halves), got {self.dim}")
        if self.graph and not self.two_stage:
            raise UsageError("graph (VOGN & RC) needs two_stage: the graph's nodes are the top-K sets")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReIRConfig:
        check_known_fields(cls, d, "ReIR config")
        return cls(**d)


def variant_config(variant: str, **overrides: Any) -> ReIRConfig:
    """The config of a Table 2 / 3 row (:data:`VARIANTS`) with ``overrides`` (config fields) on top."""
    check_choice("--variant", variant, VARIANTS)
    return ReIRConfig.from_dict({**_VARIANT_FIELDS[variant], **overrides})


def variant_of_config(config: dict[str, Any]) -> str | None:
    """The variant whose fields ``config`` (a config.json dict) has, ignoring sizes and schedule; None if none."""
    base = ReIRConfig().to_dict()
    keys = {k for fields in _VARIANT_FIELDS.values() for k in fields}
    for name, fields in _VARIANT_FIELDS.items():
        want = {k: fields.get(k, base[k]) for k in keys}
        if all(config.get(k, base[k]) == v for k, v in want.items()):
            return name
    return None


# ------------------------------------------------------------------------------------------- modules
def mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, cout))


class LanguageEncoder(nn.Module):
    """Word embeddings -> bidirectional LSTM over the caption, H = {h_t} Tensor[B, T, d] (eq. 1)."""

    def __init__(self, vocab_size: int, word_dim: int, lstm_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(max(2, vocab_size), word_dim, padding_idx=0)
        self.lstm = nn.LSTM(word_dim, lstm_dim, batch_first=True, bidirectional=True)

    def forward(self, words: Tensor, spans: Tensor) -> Tensor:
        """words LongTensor[B, T] (0 = padding); spans LongTensor[B, N, 2] phrase token spans [start, end) (an
        empty span for a padded phrase). Returns x_q Tensor[B, N, d], the mean of h_t over each phrase (zeros
        for an empty span)."""
        h, _ = run_packed(self.lstm, self.embed(words), words)
        t = torch.arange(words.shape[1], device=words.device)
        inside = (t[None, None, :] >= spans[..., :1]) & (t[None, None, :] < spans[..., 1:])  # [B, N, T]
        w = inside.to(h.dtype)
        return torch.einsum("bnt,btd->bnd", w, h) / w.sum(-1, keepdim=True).clamp(min=1.0)


class VisualEncoder(nn.Module):
    """x_o = W_2 ReLU(LN(W_f f_o) + LN(W_p p_o)): region feature Tensor[..., D] and box Tensor[..., 4] (xyxy pixels)
    of an image of size Tensor[..., 2] (height, width) -> Tensor[..., d]. The appearance and the 5-d spatial feature
    are embedded and layer-normalised apart before they are summed, so the box's position weighs as much as its
    appearance from the first step (module docstring)."""

    def __init__(self, visual_dim: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.appearance = nn.Sequential(nn.Linear(visual_dim, hidden), nn.LayerNorm(hidden, elementwise_affine=False))
        self.position = nn.Sequential(nn.Linear(5, hidden), nn.LayerNorm(hidden, elementwise_affine=False))
        self.out = nn.Linear(hidden, dim)

    def forward(self, feats: Tensor, boxes: Tensor, sizes: Tensor) -> Tensor:
        p = spatial_feature(boxes, sizes).to(feats.dtype)
        return self.out(F.relu(self.appearance(feats) + self.position(p)))


class MatchingHead(nn.Module):
    """F_cls and F_reg of one level (eqs. 2, 9, 10): phrase x_q Tensor[..., d] and proposal x_o Tensor[..., d]
    (broadcastable) -> (s^hat Tensor[...] in (0, 1), delta Tensor[..., 4] or None without regression).

    F_cls = w^T ReLU(W_q x_q * W_o x_o) + b and F_reg = W_4 ReLU(U_q x_q * U_o x_o + U x_o) (without x_q:
    W_4 ReLU(U x_o)): two-layer networks whose first layer is a low-rank bilinear map of the pair, so a phrase
    and a proposal are each projected once and a pair costs one element-wise product (module docstring)."""

    def __init__(self, dim: int, hidden: int, regression: bool, reg_query: bool) -> None:
        super().__init__()
        self.cls_q, self.cls_o = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.cls_out = nn.Linear(hidden, 1)
        self.regression, self.reg_query = regression, reg_query
        if regression:
            self.reg_o = nn.Linear(dim, hidden)
            self.reg_q = nn.Linear(dim, hidden, bias=False) if reg_query else None
            self.reg_qo = nn.Linear(dim, hidden, bias=False) if reg_query else None
            self.reg_out = nn.Linear(hidden, 4)
            # start from the identity transform: no offset before L_reg trains it
            nn.init.zeros_(self.reg_out.weight)
            nn.init.zeros_(self.reg_out.bias)

    def forward(self, xq: Tensor, xo: Tensor) -> tuple[Tensor, Tensor | None]:
        s_hat = torch.sigmoid(self.cls_out(F.relu(self.cls_q(xq) * self.cls_o(xo))).squeeze(-1))
        if not self.regression:
            return s_hat, None
        h = self.reg_o(xo)
        if self.reg_q is not None and self.reg_qo is not None:
            h = h + self.reg_q(xq) * self.reg_qo(xo)
        return s_hat, self.reg_out(F.relu(h)).expand(*s_hat.shape, 4)


class VisualObjectGraph(nn.Module):
    """Eqs. 6-7: nodes z Tensor[B, N, d], adjacency Bool[B, N, N] (symmetric, no self loops) -> z' Tensor[B, N, d]
    and the weights w Tensor[B, N, N] (rows of nodes without neighbours are zero)."""

    def __init__(self, dim: int, hidden: int, attention: bool) -> None:
        super().__init__()
        self.message = mlp(dim, hidden, dim)  # F_M
        self.attention = attention

    def forward(self, z: Tensor, adjacency: Tensor) -> tuple[Tensor, Tensor]:
        m = self.message(z)
        has = adjacency.any(-1, keepdim=True)
        if self.attention:
            logits = (m @ m.transpose(1, 2)).masked_fill(~adjacency, NEG)
            w = torch.softmax(logits, dim=-1) * has
        else:
            w = adjacency.to(z.dtype) / adjacency.sum(-1, keepdim=True).clamp(min=1).to(z.dtype)
        return z + w @ m, w


class PhraseDecoder(nn.Module):
    """LSTM_dec of eq. 13: a visual feature z Tensor[P, d] and the phrase's word ids LongTensor[P, L] (0 = padding)
    -> next-word logits Tensor[P, L, V] (step t predicts word t from z and words < t)."""

    def __init__(self, vocab_size: int, word_dim: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(max(2, vocab_size), word_dim, padding_idx=0)
        self.start = nn.Parameter(torch.zeros(word_dim))
        self.lstm = nn.LSTM(dim + word_dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, max(2, vocab_size))

    def forward(self, z: Tensor, words: Tensor) -> Tensor:
        prev = torch.cat([self.start.expand(words.shape[0], 1, -1), self.embed(words[:, :-1])], dim=1)
        inp = torch.cat([z[:, None, :].expand(-1, words.shape[1], -1), prev], dim=-1)
        h, _ = self.lstm(inp)
        return self.out(h)


# ------------------------------------------------------------------------------------------- network
@dataclass
class ReIRBatch:
    """One batch of captions with their images' proposals (what :class:`ReIR` reads; nothing ties a phrase to a
    box). B captions, T words, N phrases, L words per phrase, M proposals, E graph edges.

    words LongTensor[B, T]; spans LongTensor[B, N, 2]; phrase_words LongTensor[B, N, L]; phrase_mask
    Bool[B, N]; feats Tensor[B, M, D]; boxes Tensor[B, M, 4] xyxy pixels; prop_mask Bool[B, M]; sizes
    Tensor[B, 2] (height, width); classes LongTensor[B, M] each proposal's detector class; class_sim
    Tensor[B, N, C] each phrase's similarity to every class name (eq. 3's <E_ext(q), E_ext(c)>, >= 0; s^a is
    its entry at the proposal's class); image_index LongTensor[B] (captions of the same image share a value:
    they are no negatives of each other in L_rank); edges LongTensor[E, 3] (caption, phrase i, phrase j: one row
    per parsed relation) with edge_labels LongTensor[E] (0: not a kept class);
    targets LongTensor[B, N] the best-covering proposal of each phrase (-1: none), only for the upper bound."""

    words: Tensor
    spans: Tensor
    phrase_words: Tensor
    phrase_mask: Tensor
    feats: Tensor
    boxes: Tensor
    prop_mask: Tensor
    sizes: Tensor
    classes: Tensor
    class_sim: Tensor
    image_index: Tensor
    edges: Tensor
    edge_labels: Tensor
    targets: Tensor | None = None

    def __len__(self) -> int:
        return int(self.words.shape[0])

    def s_a(self) -> Tensor:
        """Eq. 3 for every phrase and proposal of the caption's own image, Tensor[B, N, M]."""
        n, m = self.class_sim.shape[1], self.classes.shape[1]
        return torch.gather(self.class_sim, 2, self.classes[:, None, :].expand(-1, n, m))

    def s_a_cross(self) -> Tensor:
        """Eq. 3 for caption D's phrases against image I's proposals, Tensor[D, I, N, M] (L_rank's pairs)."""
        bsz, n, c = self.class_sim.shape
        m = self.classes.shape[1]
        sim = self.class_sim[:, None, :, :].expand(bsz, bsz, n, c)
        return torch.gather(sim, 3, self.classes[None, :, None, :].expand(bsz, bsz, n, m))


def adjacency_of(edges: Tensor, b: int, n: int) -> Tensor:
    """Bool[B, N, N] from edge rows (caption, i, j), both directions, no self loops."""
    adj = torch.zeros((b, n, n), dtype=torch.bool, device=edges.device)
    if edges.numel():
        adj[edges[:, 0], edges[:, 1], edges[:, 2]] = True
        adj[edges[:, 0], edges[:, 2], edges[:, 1]] = True
    eye = torch.eye(n, dtype=torch.bool, device=edges.device)
    return adj & ~eye


class ReIR(nn.Module):
    """The two-stage network (module docstring). :meth:`forward` returns a dict of the intermediate results that
    :func:`reir_loss` and inference read (shapes in :meth:`forward`)."""

    def __init__(self, config: ReIRConfig) -> None:
        super().__init__()
        c = self.config = config
        self.language = LanguageEncoder(c.vocab_size, c.word_dim, c.dim // 2)
        self.visual = VisualEncoder(c.visual_dim, c.dim, c.hidden_dim)
        self.coarse = MatchingHead(c.dim, c.hidden_dim, c.regression, c.reg_query)
        self.fine = MatchingHead(c.dim, c.hidden_dim, c.regression, c.reg_query) if c.two_stage else None
        self.graph = VisualObjectGraph(c.dim, c.hidden_dim, c.graph_attention) if c.graph else None
        self.relation = mlp(2 * c.dim, c.hidden_dim, max(1, c.num_relations)) if c.graph else None  # F_rel
        self.decoder = PhraseDecoder(c.vocab_size, c.word_dim, c.dim, c.decoder_dim)

    def load_word_vectors(self, matrix: Tensor) -> None:
        """Initialise both word embeddings from ``matrix`` Tensor[V, word_dim] (row 0 padding)."""
        with torch.no_grad():
            for emb in (self.language.embed, self.decoder.embed):
                emb.weight.copy_(matrix[: emb.weight.shape[0]])

    def coarse_scores(self, xq: Tensor, xo: Tensor, s_a: Tensor, prop_mask: Tensor) -> tuple[Tensor, Tensor,
                                                                                           Tensor | None]:
        """Eqs. 2-4 for every phrase and proposal: x_q Tensor[B, N, d], x_o Tensor[B, M, d], s_a Tensor[B, N, M],
        prop_mask Bool[B, M] -> (s^c Tensor[B, N, M], logits = score_scale s^c masked Tensor[B, N, M],
        delta^c Tensor[B, N, M, 4] or None)."""
        s_hat, delta = self.coarse(xq[:, :, None, :], xo[:, None, :, :])
        s_c = s_hat * s_a
        logits = (self.config.score_scale * s_c).masked_fill(~prop_mask[:, None, :], NEG)
        return s_c, logits, delta

    def forward(self, b: ReIRBatch) -> dict[str, Tensor]:
        """Returns ``x_q`` [B, N, d], ``x_o`` [B, M, d], ``s_c``, ``logits_c``, ``alpha_c`` [B, N, M], ``delta_c``
        [B, N, M, 4] (with STR), ``boxes_c`` [B, N, M, 4] (the proposals refined by delta^c, or the proposals);
        with TSD also ``top`` LongTensor[B, N, K], ``top_mask`` Bool[B, N, K], ``x_top`` [B, N, K, d] (x'_o),
        ``s_f``, ``logits_f``, ``alpha_f`` [B, N, K], ``delta_f`` [B, N, K, 4] (with STR), ``boxes_top`` (V_i's
        refined boxes) and ``boxes_f`` [B, N, K, 4], ``z_f`` [B, N, d]; with VOGN ``z`` / ``z_prime`` [B, N, d],
        ``omega`` [B, N, N]; always ``z_c`` [B, N, d] and ``score`` [B, N, K or M] (eq. 11, or s^c without TSD)
        and ``pred_boxes`` [B, N, 4] (the argmax's refined box)."""
        c = self.config
        xq = self.language(b.words, b.spans)
        xo = self.visual(b.feats, b.boxes, b.sizes[:, None, :].expand(-1, b.boxes.shape[1], -1))
        s_a = b.s_a()
        s_c, logits_c, delta_c = self.coarse_scores(xq, xo, s_a, b.prop_mask)
        alpha_c = torch.softmax(logits_c, dim=-1)
        bsz, n, m = s_c.shape
        props = b.boxes[:, None, :, :].expand(bsz, n, m, 4)
        sizes = b.sizes[:, None, None, :].expand(bsz, n, m, 2)
        if delta_c is not None:
            boxes_c = clip_boxes_to_sizes(decode_boxes(delta_c.reshape(-1, 4), props.reshape(-1, 4)),
                                          sizes.reshape(-1, 2)).reshape(bsz, n, m, 4)
        else:
            boxes_c = props
        out: dict[str, Tensor] = {"x_q": xq, "x_o": xo, "s_c": s_c, "logits_c": logits_c, "alpha_c": alpha_c,
                                  "boxes_c": boxes_c, "z_c": alpha_c @ xo}
        if delta_c is not None:
            out["delta_c"] = delta_c
        if not c.two_stage:
            out["score"] = s_c.masked_fill(~b.prop_mask[:, None, :], -1.0)
            best = out["score"].argmax(-1)
            out["pred_boxes"] = torch.gather(boxes_c, 2, best[:, :, None, None].expand(-1, -1, 1, 4))[:, :, 0]
            return out
        k = min(c.top_k, m)
        masked = s_c.detach().masked_fill(~b.prop_mask[:, None, :], -1.0)
        top = masked.topk(k, dim=-1).indices  # [B, N, K]
        top_mask = torch.gather(b.prop_mask[:, None, :].expand(bsz, n, m), 2, top)
        boxes_top = torch.gather(boxes_c, 2, top[..., None].expand(-1, -1, -1, 4)).detach()
        feats_top = torch.gather(b.feats[:, None, :, :].expand(bsz, n, m, b.feats.shape[-1]), 2,
                                 top[..., None].expand(-1, -1, -1, b.feats.shape[-1]))
        x_top = self.visual(feats_top, boxes_top, b.sizes[:, None, None, :].expand(bsz, n, k, 2))
        s_c_top = torch.gather(s_c, 2, top)
        logits_top = torch.gather(logits_c, 2, top).masked_fill(~top_mask, NEG)
        alpha_top = torch.softmax(logits_top, dim=-1)  # alpha^c over V_i, renormalised (module docstring)
        s_a_top = torch.gather(s_a, 2, top)
        if self.graph is not None:
            z = (alpha_top[..., None] * x_top).sum(2)  # eq. 5
            adj = adjacency_of(b.edges, bsz, n) & b.phrase_mask[:, None, :] & b.phrase_mask[:, :, None]
            z_prime, omega = self.graph(z, adj)  # eqs. 6-7
            x_top = x_top + alpha_top[..., None] * z_prime[:, :, None, :]  # eq. 8
            out.update(z=z, z_prime=z_prime, omega=omega)
        s_hat_f, delta_f = self.fine(xq[:, :, None, :], x_top)
        s_f = s_hat_f * s_a_top  # eq. 9
        logits_f = (c.score_scale * s_f).masked_fill(~top_mask, NEG)
        alpha_f = torch.softmax(logits_f, dim=-1)
        if delta_f is not None:
            boxes_f = clip_boxes_to_sizes(decode_boxes(delta_f.reshape(-1, 4), boxes_top.reshape(-1, 4)),
                                          b.sizes[:, None, None, :].expand(bsz, n, k, 2).reshape(-1, 2)
                                          ).reshape(bsz, n, k, 4)
            out["delta_f"] = delta_f
        else:
            boxes_f = boxes_top
        score = (s_c_top * s_f).masked_fill(~top_mask, -1.0)  # eq. 11
        best = score.argmax(-1)
        out.update(top=top, top_mask=top_mask, x_top=x_top, s_f=s_f, logits_f=logits_f, alpha_f=alpha_f,
                   boxes_top=boxes_top, boxes_f=boxes_f, z_f=(alpha_f[..., None] * x_top).sum(2), score=score,
                   pred_boxes=torch.gather(boxes_f, 2, best[:, :, None, None].expand(-1, -1, 1, 4))[:, :, 0])
        return out


# ------------------------------------------------------------------------------------------- losses
def reconstruction_loss(decoder: PhraseDecoder, z: Tensor, phrase_words: Tensor, phrase_mask: Tensor) -> Tensor:
    """Per caption sum over its phrases of L_log (the summed negative log-likelihood of the phrase's words given
    z), Tensor[B]. z Tensor[B, N, d]; phrase_words LongTensor[B, N, L]; phrase_mask Bool[B, N]."""
    bsz, n, length = phrase_words.shape
    if not bool(phrase_mask.any()):
        return z.new_zeros(bsz)
    sel = phrase_mask.reshape(-1)
    words = phrase_words.reshape(-1, length)[sel]
    logits = decoder(z.reshape(bsz * n, -1)[sel], words)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), words.reshape(-1), ignore_index=0,
                          reduction="none").reshape(words.shape).sum(1)
    per = z.new_zeros(bsz * n)
    per[sel] = nll
    return per.reshape(bsz, n).sum(1)


def _smooth_l1(x: Tensor) -> Tensor:
    a = x.abs()
    return torch.where(a < SMOOTH_L1_BETA, 0.5 * a * a / SMOOTH_L1_BETA, a - 0.5 * SMOOTH_L1_BETA)


def self_taught_regression(delta: Tensor, boxes: Tensor, confidence: Tensor, valid: Tensor, tau: float) -> Tensor:
    """Eq. 15's term of one level, per caption Tensor[B]: every box with IoU > tau to its phrase's most confident
    box regresses towards it. delta Tensor[B, N, K, 4] predicted offsets of boxes Tensor[B, N, K, 4] (the boxes
    they apply to); confidence Tensor[B, N, K] (s^c or s^f); valid Bool[B, N, K] (real proposal of a real
    phrase)."""
    bsz, n, k, _ = boxes.shape
    boxes = boxes.detach()
    best = confidence.detach().masked_fill(~valid, -2.0).argmax(-1)  # [B, N]
    target = torch.gather(boxes, 2, best[:, :, None, None].expand(-1, -1, 1, 4))  # [B, N, 1, 4]
    flat_boxes, flat_target = boxes.reshape(-1, 4), target.expand(-1, -1, k, -1).reshape(-1, 4)
    iou = elementwise_box_iou(flat_boxes, flat_target).reshape(bsz, n, k)
    near = (iou > tau) & valid
    if not bool(near.any()):
        return delta.new_zeros(bsz)
    goal = encode_boxes(flat_target, flat_boxes.clamp_min(0)).reshape(bsz, n, k, 4)
    goal = torch.where(near[..., None], goal, delta.detach())
    per = _smooth_l1(delta - goal).sum(-1) * near
    return per.sum((1, 2))


def ranking_loss(out: dict[str, Tensor], b: ReIRBatch, margin: float, scale: float) -> Tensor:
    """L_rank (module docstring) for the batch, a scalar. For every caption D and image I of the batch, phrase i of
    D attends over I's proposals with alpha = Softmax_m(scale * cos(x_qi, x_om)) (Align2Ground's local matching in
    the shared embedding), z_i(I) = sum_m alpha_m x_om, and S(I, D) = (1/N) sum_i cos(x_qi, z_i(I)); then the
    hinge over the other images and captions of the batch in both directions (pairs of the same image excluded),
    summed over negatives and averaged over the batch."""
    xq, xo = F.normalize(out["x_q"], dim=-1), out["x_o"]  # [B, N, d], [B, M, d]
    bsz = xq.shape[0]
    cos = torch.einsum("dnk,imk->dinm", xq, F.normalize(xo, dim=-1))  # [D, I, N, M]
    alpha = torch.softmax((scale * cos).masked_fill(~b.prop_mask[None, :, None, :], NEG), dim=-1)
    z = torch.einsum("dinm,imk->dink", alpha, xo)  # [D, I, N, d]
    sim = torch.einsum("dink,dnk->din", F.normalize(z, dim=-1), xq)  # [D, I, N]
    pm = b.phrase_mask[:, None, :].to(sim.dtype)
    score = (sim * pm).sum(-1) / pm.sum(-1).clamp(min=1.0)  # S(I, D) as [D, I]
    same = b.image_index[:, None] == b.image_index[None, :]  # same image: not a negative
    pos = score.diagonal()  # S(I_D, D)
    over_images = (margin - pos[:, None] + score).clamp(min=0).masked_fill(same, 0.0)
    over_captions = (margin - pos[None, :] + score).clamp(min=0).masked_fill(same, 0.0)
    return (over_images.sum() + over_captions.sum()) / bsz


def relation_loss(model: ReIR, out: dict[str, Tensor], b: ReIRBatch) -> Tensor:
    """Eqs. 16-17 per caption Tensor[B]: the cross-entropy of F_rel(z^f_i, z^f_j) over the C_r kept classes for
    every parsed relation with a kept class (label > 0)."""
    bsz = b.words.shape[0]
    keep = b.edge_labels > 0
    if model.relation is None or not bool(keep.any()):
        return out["z_c"].new_zeros(bsz)
    e = b.edges[keep]
    z = out["z_f"]
    logits = model.relation(torch.cat([z[e[:, 0], e[:, 1]], z[e[:, 0], e[:, 2]]], dim=-1))
    ce = F.cross_entropy(logits, b.edge_labels[keep] - 1, reduction="none")
    return torch.zeros(bsz, dtype=ce.dtype, device=ce.device).index_add(0, e[:, 0], ce)


def supervised_loss(out: dict[str, Tensor], b: ReIRBatch) -> Tensor:
    """The upper bound's term per caption Tensor[B]: cross-entropy of the coarse logits towards the best-covering
    proposal (targets >= 0), and of the fine logits where that proposal is in V_i."""
    t = b.targets
    if t is None:
        raise UsageError("the upper bound needs targets (supervised=True)")
    have = t >= 0
    per = out["logits_c"].new_zeros(b.phrase_mask.shape)
    if bool(have.any()):
        lc = out["logits_c"][have]
        per[have] = F.cross_entropy(lc, t[have], reduction="none")
        if "top" in out:
            hit = out["top"] == t[..., None]  # [B, N, K]
            found = hit.any(-1) & have
            if bool(found.any()):
                per[found] = per[found] + F.cross_entropy(out["logits_f"][found], hit[found].float().argmax(-1),
                                                          reduction="none")
    return per.sum(1)


def reir_loss(model: ReIR, out: dict[str, Tensor], b: ReIRBatch, regression_on: bool) -> tuple[Tensor, dict[str,
                                                                                                             float]]:
    """Eq. 12: L = L_rec + lambda_1 L_reg + lambda_2 L_rel + lambda_3 L_rank (+ the upper bound's cross-entropy),
    each per-caption term averaged over the batch. ``regression_on``: L_reg after the warm-up. Returns the loss
    and its terms (floats)."""
    c = model.config
    rec = reconstruction_loss(model.decoder, out["z_c"], b.phrase_words, b.phrase_mask)
    if "z_f" in out:
        rec = rec + reconstruction_loss(model.decoder, out["z_f"], b.phrase_words, b.phrase_mask)  # eq. 14
    loss = rec.mean()
    parts = {"rec": float(rec.mean().detach())}
    if c.regression and regression_on:
        valid_c = b.prop_mask[:, None, :] & b.phrase_mask[:, :, None]
        props = b.boxes[:, None, :, :].expand(-1, b.spans.shape[1], -1, -1)
        reg = self_taught_regression(out["delta_c"], props, out["s_c"], valid_c, c.tau)
        if "delta_f" in out:
            valid_f = out["top_mask"] & b.phrase_mask[:, :, None]
            reg = reg + self_taught_regression(out["delta_f"], out["boxes_top"], out["s_f"], valid_f, c.tau)
        loss = loss + c.reg_weight * reg.mean()
        parts["reg"] = float(reg.mean().detach())
    if c.graph:
        rel = relation_loss(model, out, b)
        loss = loss + c.rel_weight * rel.mean()
        parts["rel"] = float(rel.mean().detach())
    if c.rank_weight:
        rank = ranking_loss(out, b, c.rank_margin, c.score_scale)
        loss = loss + c.rank_weight * rank
        parts["rank"] = float(rank.detach())
    if c.supervised:
        sup = supervised_loss(out, b)
        loss = loss + c.sup_weight * sup.mean()
        parts["sup"] = float(sup.mean().detach())
    return loss, parts


__all__ = ["ReIR", "ReIRBatch", "ReIRConfig", "VARIANTS", "LanguageEncoder", "MatchingHead", "PhraseDecoder",
           "VisualEncoder", "VisualObjectGraph", "adjacency_of", "ranking_loss", "reconstruction_loss", "reir_loss",
           "relation_loss", "self_taught_regression", "supervised_loss", "variant_config", "variant_of_config"]
