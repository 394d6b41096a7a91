"""CMRIN: Cross-Modal Relationship Inference Network (Yang, Li, Yu, CVPR 2019; ../shared/papers/cmrin.txt).

The network scores each candidate box of an image against a referring expression:

1. :class:`LanguageEncoder` -- a bidirectional LSTM gives every word a context h_t (Sec. 3.1.2).
2. :class:`CrossModalRelationshipExtractor` (CMRE, Sec. 3.1) -- word-type weights over entity / relation /
   absolute location / unnecessary (eq. 1) and the global language context h_g; the weighted normalised
   attention of words over vertices and each vertex's language context c_i (eqs. 2-3); vertex gates p^v
   (eq. 4) and edge-type gates p^e (eqs. 5-6) over the spatial relation graph
   (:func:`refground.graph.spatial_relations`, labels 1-11 are edges, 0 is "no relationship").
3. :class:`GatedGraphConv` (GGCN, Sec. 3.2) -- on the multimodal graph x^m_i = [x^s_i, c_i], N gated graph
   convolutions with separate out- and in-relation weights and one bias per edge type (eq. 7).
4. The matching score s_i = <L2Norm(W_s0 [W_p p_i, x^c_i]), L2Norm(W_s1 h_g)> (eq. 8) with the spatial
   feature p_i = [x, y, w, h, wh] (centre, size, area; normalised by the image), trained with the triplet
   loss whose negative is drawn at random from the online hard negatives, margin 0.1 (eq. 9,
   :func:`triplet_loss`).

Table 2's ablation rows are configurations of this one model (:data:`VARIANTS`):

==========================================  ==========  ==========  ======  ======
row                                         language    context     layers  fusion
==========================================  ==========  ==========  ======  ======
global langcxt + vis instance               global      instance    0       no
global langcxt + global viscxt(2)           global      global      2       no
weighted langcxt + guided viscxt(2)         weighted    guided      2       no
weighted langcxt + guided viscxt(1)+fusion  weighted    guided      1       yes
weighted langcxt + guided viscxt(3)+fusion  weighted    guided      3       yes
weighted langcxt + guided viscxt(2)+fusion  weighted    guided      2       yes  (CMRIN)
==========================================  ==========  ==========  ======  ======

Choices where the paper is silent (each one a config field):

* "global" language context (rows 1-2) is "the last hidden state of the expression encoding LSTM": the
  forward direction's state after the last word concatenated with the backward direction's state after
  the first word. "weighted" is the paper's h_g = sum_t (m_t^(0) + m_t^(1) + m_t^(2)) h_t.
* "global viscxt" (row 2) runs the same graph convolutions on the spatial relation graph with every gate
  open and no language in the vertex features: edge gates 1 and vertex gates 1/K (K candidates), so a
  vertex receives the mean of its neighbours' messages as in the normalised GCN the paper builds on. (With
  vertex gates of 1 the sum of up to 19 neighbours swamps a vertex's own feature: 58.1% val Precision@1
  after 10 epochs, far below row 1.) "guided" (row 3) uses the language gates but vertex
  features x^s only (no fusion of c_i).
* sigma is ReLU. In eq. 7 the neighbour sums are plain sums, as written (no degree normalisation).
* eq. 8's "⊙" between two vectors that yield a scalar score is read as the inner product of the two
  L2-normalised vectors (cosine similarity), so scores lie in [-1, 1] and the margin 0.1 is on that scale.
* Region features are standardised per dimension with the training set's mean and standard deviation
  (stored with the weights), since the paper's Faster R-CNN pool5 features and our detector's fc7
  features live on different scales; ``visual_location`` appends p_i to x^s (off by default, as in the
  paper, where location enters only through W_p p_i).
* Defaults measured on val of the default world (5 epochs, seed 0): the paper's recipe alone plateaus at
  86.2% val Precision@1 with train accuracy 6-7 points higher; mirroring and dropout 0.2 narrow that gap.
* ``flip_augment`` (on by default) mirrors each training query left-right and/or top-bottom with
  probability 1/2 each: the candidates' centres, the relation labels and the direction words ("left" <->
  "right", "above" <-> "below", ...) are mirrored, the region features kept
  (:class:`refground.grounding.candidates.Flips`). The paper trains without it; it is a data augmentation for relational reasoning on a small training set.
* ``word_type_bias`` (None: PyTorch's default initialisation) sets the initial bias of eq. 1's last layer
  (entity, relation, location, unnecessary).
  Trained CMRIN marks the words of the context phrases as unnecessary (entity and relation weight 0.00
  after "which is below": "a small square" contributes nothing to p^v, c_i or h_g), so no message from the
  context object reaches the referent. Starting from a -4 bias on "unnecessary" ends in the same place.
* ``dropout`` (0.2 by default; the paper does not mention any) on the standardised region features and on x_i
  before W_s0, for the generalisation gap measured on the small synthetic training set.
* Dimensions are smaller than the paper's 512-d embeddings, sized for a CPU and a 63-word vocabulary:
  embeddings 128, D_h = 256 (128 per direction), D_l0 = D_e0 = 256, D_n = 128, D_e = D_s = 256, D_p = 64.
  At the paper's sizes (``embed_dim=512, hidden_dim=512, attention_dim=512, graph_dim=512,
  match_dim=512``) a training step costs 3.5x more on two cores (0.35 s against 0.10 s for 64 queries);
  every size is a config field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refground.errors import UsageError, check_choice, check_known_fields
from refground.grounding.rnn import run_packed

NUM_EDGE_TYPES = 11  # relation labels 1..11 (0 = no relationship / self / padding)
WORD_TYPES = ("entity", "relation", "location", "unnecessary")

LANGUAGE = ("global", "weighted")
CONTEXT = ("instance", "global", "guided")


@dataclass
class CMRINConfig:
    """Everything that defines a CMRIN model and its training (saved as a run's config.json)."""

    vocab_size: int = 2
    visual_dim: int = 256
    embed_dim: int = 128
    hidden_dim: int = 256
    type_dim: int = 256
    edge_type_dim: int = 256
    attention_dim: int = 128
    graph_dim: int = 256
    spatial_dim: int = 64
    match_dim: int = 256
    language: str = "weighted"
    context: str = "guided"
    layers: int = 2
    fusion: bool = True
    visual_location: bool = False
    margin: float = 0.1
    dropout: float = 0.2
    word_type_bias: tuple[float, float, float, float] | None = None
    # training
    flip_augment: bool = True
    # optimisation (Sec. 4.2: Adam, learning rate 5e-4, batch 64); the learning rate drops 10x after
    # lr_decay_epochs epochs (0: never)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    lr_decay_epochs: int = 7
    min_word_count: int = 6

    def __post_init__(self) -> None:
        check_choice("language", self.language, LANGUAGE)
        check_choice("context", self.context, CONTEXT)
        if self.context == "instance" and (self.layers != 0 or self.fusion):
            raise UsageError("context 'instance' has no graph convolutions: layers 0, no fusion")
        if self.context != "instance" and self.layers < 1:
            raise UsageError(f"context {self.context!r} needs at least one graph convolution")
        if self.fusion and self.context != "guided":
            raise UsageError("fusion of word contexts needs the guided (language-gated) context")
        if self.context == "guided" and self.language != "weighted":
            raise UsageError("the guided context comes from the weighted language context")
        for name in ("epochs", "batch_size", "hidden_dim"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")
        if self.hidden_dim % 2:
            raise UsageError("hidden_dim is split over two LSTM directions: it must be even")
        if not self.lr > 0:
            raise UsageError("lr must be positive")
        if not 0 <= self.dropout < 1:
            raise UsageError("dropout must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CMRINConfig:
        check_known_fields(cls, d, "CMRIN config")
        return cls(**d)


# Table 2 rows, in the paper's order: name -> (label, overrides of the default (= full CMRIN) config).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "instance": ("global langcxt + vis instance",
                 {"language": "global", "context": "instance", "layers": 0, "fusion": False}),
    "global-2": ("global langcxt + global viscxt(2)",
                 {"language": "global", "context": "global", "layers": 2, "fusion": False}),
    "guided-2": ("weighted langcxt + guided viscxt(2)", {"layers": 2, "fusion": False}),
    "fusion-1": ("weighted langcxt + guided viscxt(1) + fusion", {"layers": 1}),
    "fusion-3": ("weighted langcxt + guided viscxt(3) + fusion", {"layers": 3}),
    "cmrin": ("weighted langcxt + guided viscxt(2) + fusion (CMRIN)", {}),
}


def variant_config(name: str, **overrides: Any) -> CMRINConfig:
    """The config of Table 2 row ``name`` (a key of :data:`VARIANTS`), with ``overrides`` applied."""
    if name not in VARIANTS:
        raise UsageError(f"unknown CMRIN variant {name!r}; expected one of: {', '.join(VARIANTS)}")
    return CMRINConfig(**{**VARIANTS[name][1], **overrides})


class LanguageEncoder(nn.Module):
    """Word embeddings and a bidirectional LSTM: h_t = [forward_t, backward_t] in R^{D_h} (Sec. 3.1.2).

    forward(words: LongTensor[B, T] (0 = padding)) -> (h: Tensor[B, T, D_h] (zero at padding),
    last: Tensor[B, D_h] the "last hidden state": forward state at the last word + backward state at the
    first word).
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden_dim // 2, batch_first=True, bidirectional=True)

    def forward(self, words: Tensor) -> tuple[Tensor, Tensor]:
        h, (h_n, _) = run_packed(self.lstm, self.embed(words), words)
        last = torch.cat([h_n[0], h_n[1]], dim=1)
        return h, last


class CrossModalRelationshipExtractor(nn.Module):
    """CMRE: word types (eq. 1), global language context h_g, vertex attention and language contexts
    (eqs. 2-3), vertex gates (eq. 4) and edge-type gates (eqs. 5-6).

    forward(h: Tensor[B, T, D_h], word_mask: BoolTensor[B, T], xs: Tensor[B, K, D_x],
    cand_mask: BoolTensor[B, K]) -> dict with
      ``word_types`` m: Tensor[B, T, 4] (zero at padding), ``global`` h_g: Tensor[B, D_h],
      ``attention`` lambda: Tensor[B, T, K], ``vertex_context`` c: Tensor[B, K, D_h],
      ``vertex_gates`` p^v: Tensor[B, K], ``edge_gates`` p^e: Tensor[B, N_e] (entry j-1 gates label j).
    """

    def __init__(self, config: CMRINConfig, visual_dim: int):
        super().__init__()
        c = config
        self.word_type = nn.Sequential(nn.Linear(c.hidden_dim, c.type_dim), nn.ReLU(),
                                       nn.Linear(c.type_dim, len(WORD_TYPES)))            # W_l0, W_l1
        if c.word_type_bias is not None:
            with torch.no_grad():
                self.word_type[2].bias.copy_(torch.tensor(c.word_type_bias, dtype=torch.float32))
        self.w_v = nn.Linear(visual_dim, c.attention_dim, bias=False)                    # W_v
        self.w_h = nn.Linear(c.hidden_dim, c.attention_dim, bias=False)                  # W_h
        self.w_n = nn.Linear(c.attention_dim, 1, bias=False)                             # W_n
        self.edge_type = nn.Sequential(nn.Linear(c.hidden_dim, c.edge_type_dim), nn.ReLU(),
                                       nn.Linear(c.edge_type_dim, NUM_EDGE_TYPES))        # W_e0, W_e1

    def forward(self, h: Tensor, word_mask: Tensor, xs: Tensor, cand_mask: Tensor) -> dict[str, Tensor]:
        wm = word_mask.to(h.dtype)
        m = torch.softmax(self.word_type(h), dim=-1) * wm[..., None]                       # eq. 1
        h_g = ((m[..., 0] + m[..., 1] + m[..., 2])[..., None] * h).sum(1)
        # eq. 2: alpha_{t,i} = W_n tanh(W_v x_i + W_h h_t); softmax over the image's vertices.
        alpha = self.w_n(torch.tanh(self.w_v(xs)[:, None, :, :] + self.w_h(h)[:, :, None, :])).squeeze(-1)
        alpha = alpha.masked_fill(~cand_mask[:, None, :], float("-inf"))
        lam = m[..., 0:1] * torch.softmax(alpha, dim=-1)                                    # [B, T, K]
        c_vertex = torch.einsum("btk,btd->bkd", lam, h)                                    # eq. 3
        p_v = lam.sum(1)                                                                   # eq. 4
        w_e = torch.softmax(self.edge_type(h), dim=-1) * m[..., 1:2]                       # eq. 5
        p_e = w_e.sum(1)                                                                   # eq. 6
        return {"word_types": m, "global": h_g, "attention": lam, "vertex_context": c_vertex,
                "vertex_gates": p_v, "edge_gates": p_e}


class GatedGraphConv(nn.Module):
    """One gated graph convolution (eq. 7) on a directed graph with N_e edge types.

    x_out_i = sum_{j: e_ij > 0} p^e_{e_ij} (W_out x_j p^v_j + b_{e_ij})     (out-relations of i)
    x_in_i  = sum_{j: e_ji > 0} p^e_{e_ji} (W_in  x_j p^v_j + b_{e_ji})     (in-relations of i)
    x_self_i = W_self x_i + b_self;   x'_i = relu(x_out_i + x_in_i + x_self_i)

    forward(x: Tensor[B, K, D_in], relations: LongTensor[B, K, K] (entry [i, j] = e_ij, 0 = no edge;
    padded rows/columns must be 0), vertex_gates: Tensor[B, K], edge_gates: Tensor[B, N_e]) ->
    Tensor[B, K, D_out].
    """

    def __init__(self, in_dim: int, out_dim: int, num_edge_types: int = NUM_EDGE_TYPES):
        super().__init__()
        self.w_out = nn.Linear(in_dim, out_dim, bias=False)
        self.w_in = nn.Linear(in_dim, out_dim, bias=False)
        self.w_self = nn.Linear(in_dim, out_dim)
        self.edge_bias = nn.Parameter(torch.zeros(num_edge_types, out_dim))
        self.num_edge_types = num_edge_types

    def forward(self, x: Tensor, relations: Tensor, vertex_gates: Tensor, edge_gates: Tensor) -> Tensor:
        # Gate of each ordered pair: p^e of its edge type, 0 where there is no edge (label 0).
        gates = torch.cat([edge_gates.new_zeros(edge_gates.shape[0], 1), edge_gates], dim=1)      # [B, 1+N_e]
        pair = torch.gather(gates, 1, relations.flatten(1)).view_as(relations).to(x.dtype)      # [B, K, K]
        xv = x * vertex_gates[..., None]
        x_out = torch.bmm(pair, self.w_out(xv))
        x_in = torch.bmm(pair.transpose(1, 2), self.w_in(xv))
        # Bias terms: sum_j p^e_{e_ij} b_{e_ij} = sum_e (#out-edges of type e) p^e_e b_e (likewise in-edges).
        onehot = F.one_hot(relations, self.num_edge_types + 1)[..., 1:].to(x.dtype)              # [B, K, K, N_e]
        count_out = onehot.sum(2) * edge_gates[:, None, :]
        count_in = onehot.sum(1) * edge_gates[:, None, :]
        bias = (count_out + count_in) @ self.edge_bias
        return torch.relu(x_out + x_in + bias + self.w_self(x))


class CMRIN(nn.Module):
    """The whole network (see the module docstring for the variants).

    forward(words: LongTensor[B, T] (0 = padding), features: Tensor[B, K, D] region features,
    spatial: Tensor[B, K, 5] p_i, relations: LongTensor[B, K, K] spatial relation labels (0-11; padded
    rows/columns 0), cand_mask: BoolTensor[B, K]) -> dict with ``scores`` Tensor[B, K] (eq. 8; -inf at
    padding) and, for the weighted language context, the CMRE outputs (``vertex_gates``, ``edge_gates``,
    ``word_types``, ``attention``).
    """

    def __init__(self, config: CMRINConfig):
        super().__init__()
        self.config = c = config
        self.language = LanguageEncoder(c.vocab_size, c.embed_dim, c.hidden_dim)
        vis_dim = c.visual_dim + (5 if c.visual_location else 0)
        self.register_buffer("feature_mean", torch.zeros(c.visual_dim))
        self.register_buffer("feature_std", torch.ones(c.visual_dim))
        self.cmre = CrossModalRelationshipExtractor(c, vis_dim) if c.language == "weighted" else None
        dims = [vis_dim + (c.hidden_dim if c.fusion else 0)] + [c.graph_dim] * c.layers
        self.ggcn = nn.ModuleList(GatedGraphConv(dims[n], dims[n + 1]) for n in range(c.layers))
        self.w_p = nn.Linear(5, c.spatial_dim)                                             # W_p
        self.w_s0 = nn.Linear(c.spatial_dim + dims[-1], c.match_dim, bias=False)           # W_s0
        self.w_s1 = nn.Linear(c.hidden_dim, c.match_dim, bias=False)                       # W_s1
        self.drop = nn.Dropout(c.dropout)

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Per-dimension standardisation of the region features (from the training candidates)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=1e-3))

    def forward(self, words: Tensor, features: Tensor, spatial: Tensor, relations: Tensor,
                cand_mask: Tensor) -> dict[str, Tensor]:
        c = self.config
        word_mask = words != 0
        h, last = self.language(words)
        xs = self.drop((features - self.feature_mean) / self.feature_std)
        xs = xs * cand_mask[..., None].to(xs.dtype)
        if c.visual_location:
            xs = torch.cat([xs, spatial], dim=-1)
        out: dict[str, Tensor] = {}
        if self.cmre is not None:
            out = self.cmre(h, word_mask, xs, cand_mask)
            lang = out["global"]
        else:
            lang = last
        x = xs
        if c.fusion:
            x = torch.cat([xs, out["vertex_context"]], dim=-1)                             # x^m = [x^s, c]
        if c.layers:
            if c.context == "guided":
                p_v, p_e = out["vertex_gates"], out["edge_gates"]
            else:  # the global visual context: the same convolutions with every gate open, averaged
                count = cand_mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
                p_v = cand_mask.to(x.dtype) / count
                p_e = x.new_ones(x.shape[0], NUM_EDGE_TYPES)
            for conv in self.ggcn:
                x = conv(x, relations, p_v, p_e)                                           # eq. 7
        x = self.drop(torch.cat([self.w_p(spatial), x], dim=-1))                           # x_i = [W_p p_i, x^c_i]
        v = F.normalize(self.w_s0(x), dim=-1)
        q = F.normalize(self.w_s1(lang), dim=-1)
        scores = (v * q[:, None, :]).sum(-1)                                               # eq. 8
        out["scores"] = scores.masked_fill(~cand_mask, float("-inf"))
        return out


def triplet_loss(scores: Tensor, target: Tensor, margin: float = 0.1, generator: torch.Generator | None = None
                 ) -> Tensor:
    """Eq. 9: max(s_neg + margin - s_gt, 0) with s_neg drawn uniformly at random from the online hard
    negatives {j != gt : s_j + margin - s_gt > 0}; a query without hard negatives contributes 0.

    scores: Tensor[B, K] (-inf at padding); target: LongTensor[B] index of the ground truth. Returns the mean
    over the batch (a scalar).
    """
    s_gt = scores.gather(1, target[:, None])
    violation = scores + margin - s_gt                                                     # [B, K]
    hard = violation > 0
    hard[torch.arange(len(target)), target] = False
    # A uniform draw among the hard negatives: the arg-max of independent uniforms over them.
    u = torch.rand(scores.shape, generator=generator, device=scores.device)
    pick = torch.where(hard, u, torch.full_like(u, -1.0)).argmax(1)
    has = hard.any(1)
    chosen = violation.gather(1, pick[:, None]).squeeze(1)
    return torch.where(has, chosen, torch.zeros_like(chosen)).clamp(min=0).mean()


__all__ = ["CMRIN", "CMRINConfig", "CrossModalRelationshipExtractor", "GatedGraphConv", "LanguageEncoder",
           "NUM_EDGE_TYPES", "VARIANTS", "WORD_TYPES", "triplet_loss", "variant_config"]
