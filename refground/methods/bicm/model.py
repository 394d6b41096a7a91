"""BiCM's modules as the paper writes them (Shi, Hayat, Cai, "Unpaired Referring Expression Grounding via
Bidirectional Cross-Modal Matching", Sec. 3), on scores that :mod:`refground.methods.bicm.modules` computes.

* QAM (Sec. 3.2, eqs. 1-5): the query-aware attention map ``A`` and its box ``P_t`` (the map min-max normalised,
  thresholded at ``thr_a`` = Thr_a = 0.7: :func:`refground.features.clip_attention.box_from_map`); the
  vanilla-attention variant (Table 5, "VA") uses the head mean of the attention alone.
* COM (Sec. 3.3, eqs. 6-8): ``S^PQ_r`` cosine of the proposal crop's CLIP embedding and the query's, ``S^CQ_r``
  cosine of the proposal's class name's CLIP text embedding and the query's, ``S^BU = S^PQ + S^CQ``; ``P_t``
  joins the proposals with the class name of highest ``S^CQ`` among the image's proposals.
* SF (Sec. 3.4, eqs. 9-10): ``S^TD_r`` the mean of the map over the box's pixels, ``S_r = S^BU + lambda_t S^TD``
  (lambda_t = 1000). Map scale: S^TD reads the *raw* map, the head mean of eq. 5 bilinearly upsampled to the
  image, not the min-max normalised one that P_t is cut from. The paper sets lambda_t = 1000 "to make the three
  scores have similar orders of magnitude": that only holds for raw values (a [CLS] attention of ~1/U per patch
  times a gradient of ~0.05 gives means of 1e-4 to 1e-2; measured on the built-in CLIP: map maxima 2e-3 to 7e-3,
  so lambda_t S^TD spans 0 to a few units beside S^BU's ~0.2-1.5), while a normalised map in [0, 1] times 1000
  would make every other score irrelevant.
* KAM (Sec. 3.5, eq. 11): :class:`KnowledgeAdaptation`, an MLP over ``[f_i, f_p, f_c, f_q]`` (image, proposal
  crop, class name and query embeddings): FC + BN + ReLU (fuse), FC + BN + ReLU (transform), FC (score), sigmoid.
  Trained on pseudo labels with the loss of fully supervised grounding [10] (Hu et al.: a softmax over the
  image's candidate boxes, cross-entropy at the labelled one: :func:`kam_loss`, on the pre-sigmoid logits, which
  order the boxes as the sigmoid does). ``Sim_r = S^BU + lambda_t S^TD + lambda_k S^KAM`` (lambda_k = 1).
* Box rules (Sec. 4.1): ``largest``, the largest box among those whose score is above the mean score (the
  paper's rule for single-object queries, "to fairly compare with [25]"); ``union``, the union of the above-mean
  boxes (its rule for Flickr30K phrases, which may name several objects); ``argmax``, the top box.

The ablation rows (:data:`VARIANTS`, Tables 4-6) are configurations of :class:`BiCMConfig`; ``class-name`` is
the baseline of Wang and Specia [25] (:func:`refground.methods.bicm.run.class_name_scores`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from refground.errors import UsageError, check_known_fields

QAM_MAPS = ("qa", "va", "none")  # query-aware, vanilla attention (Table 5), no top-down module
COM_INFO = ("both", "class", "visual", "none")  # Table 6: class name + visual, class name only, visual only
BOX_RULES = ("largest", "union", "argmax")

# name -> (qam, com, sf, kam); Table 4: QAM, COM, QAM+COM, QAM+COM+SF, +KAM; Table 5: VA maps; Table 6: COM info
VARIANT_MODULES: dict[str, tuple[str, str, bool, bool]] = {
    "qam": ("qa", "none", False, False),
    "com": ("none", "both", False, False),
    "com-class": ("none", "class", False, False),
    "com-visual": ("none", "visual", False, False),
    "qam-com": ("qa", "both", False, False),
    "va-com": ("va", "both", False, False),
    "qam-com-sf": ("qa", "both", True, False),
    "va-com-sf": ("va", "both", True, False),
    "bicm": ("qa", "both", True, True),
}
CLASS_NAME = "class-name"
VARIANTS = (CLASS_NAME, *VARIANT_MODULES)
TRAINED = ("bicm",)  # the variants with a learnt part (KAM); the others are training-free


@dataclass
class BiCMConfig:
    """BiCM's switches and hyper-parameters (the paper's values as defaults).

    ``qam`` (qa | va | none), ``com`` (both | class | visual | none), ``sf`` and ``kam`` select the modules;
    ``thr_a`` cuts P_t from the normalised map, ``thr_k`` keeps a pseudo label whose fused score S_r passes it,
    ``lambda_t`` / ``lambda_k`` weigh S^TD and S^KAM; the proposals: the detector's boxes of confidence >=
    ``min_score``, at least ``min_boxes``, at most ``top_n`` (the paper's Visual Genome detector's 100 proposals are
    its 10-100 boxes above 0.2: :meth:`~refground.methods.bicm.data.DetectorProposals.read`). KAM:
    ``hidden`` units per layer, ``epochs`` (50), ``lr`` (Adam, 1e-4), ``batch_size`` pseudo-labelled pairs per
    step, ``kam_val_fraction`` of the pseudo labels held out to log the MLP's agreement with them (no benchmark
    truth is read while training)."""

    qam: str = "qa"
    com: str = "both"
    sf: bool = True
    kam: bool = True
    thr_a: float = 0.7
    thr_k: float = 0.9
    lambda_t: float = 1000.0
    lambda_k: float = 1.0
    top_n: int = 100
    min_score: float = 0.2
    min_boxes: int = 10
    hidden: int = 256
    epochs: int = 50
    lr: float = 1e-4
    batch_size: int = 32
    kam_val_fraction: float = 0.1
    embed_dim: int = 0  # set from the CLIP artifact by the trainer

    def __post_init__(self) -> None:
        if self.qam not in QAM_MAPS:
            raise UsageError(f"qam {self.qam!r}: expected one of {', '.join(QAM_MAPS)}")
        if self.com not in COM_INFO:
            raise UsageError(f"com {self.com!r}: expected one of {', '.join(COM_INFO)}")
        if self.qam == "none" and self.com == "none":
            raise UsageError("BiCM needs QAM or COM (both are 'none')")
        if self.sf and (self.qam == "none" or self.com == "none"):
            raise UsageError("SF fuses QAM's map with COM's scores: it needs both")
        if self.kam and not self.sf:
            raise UsageError("KAM adds to the fused score of QAM + COM + SF (eq. 11): it needs sf")
        if not 0.0 < self.thr_a <= 1.0:
            raise UsageError(f"thr_a {self.thr_a}: must be in (0, 1]")
        if not 0.0 <= self.kam_val_fraction < 1.0:
            raise UsageError(f"kam_val_fraction {self.kam_val_fraction}: must be in [0, 1)")
        if self.top_n < 1 or self.hidden < 1 or self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise UsageError("top_n, hidden and epochs must be >= 1, batch_size >= 2 (batch norm) and lr > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BiCMConfig:
        check_known_fields(cls, d, "BiCM config")
        return cls(**d)


def variant_config(variant: str, **overrides: Any) -> BiCMConfig:
    """The config of an ablation row (:data:`VARIANT_MODULES`) with ``overrides`` (config fields) on top."""
    if variant not in VARIANT_MODULES:
        raise UsageError(f"--variant {variant!r}: expected one of {', '.join(VARIANT_MODULES)}")
    qam, com, sf, kam = VARIANT_MODULES[variant]
    return BiCMConfig(**{"qam": qam, "com": com, "sf": sf, "kam": kam, **overrides})


# ------------------------------------------------------------------------------------------- eqs. 8-11


def bottom_up(s_pq: torch.Tensor, s_cq: torch.Tensor, com: str) -> torch.Tensor:
    """``S^BU`` (eq. 8, Table 6): ``S^PQ + S^CQ`` (``both``), ``S^CQ`` (``class``) or ``S^PQ`` (``visual``);
    zeros for ``none``. s_pq, s_cq: Tensor[..., N]."""
    if com == "both":
        return s_pq + s_cq
    if com == "class":
        return s_cq.clone()
    if com == "visual":
        return s_pq.clone()
    return torch.zeros_like(s_pq)


def fused_score(s_pq: torch.Tensor, s_cq: torch.Tensor, s_td: torch.Tensor, cfg: BiCMConfig,
                s_kam: torch.Tensor | None = None) -> torch.Tensor:
    """``S_r`` (eq. 10) or ``Sim_r`` (eq. 11) of every candidate: ``S^BU + lambda_t S^TD [+ lambda_k S^KAM]`` with
    the modules ``cfg`` switches on. All inputs Tensor[..., N]; ``s_kam`` the sigmoid output of KAM."""
    score = bottom_up(s_pq, s_cq, cfg.com)
    if cfg.sf:
        score = score + cfg.lambda_t * s_td
    if cfg.kam:
        if s_kam is None:
            raise UsageError("this BiCM config has KAM: its scores are needed")
        score = score + cfg.lambda_k * s_kam
    return score


def choose_boxes(scores: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, rule: str) -> torch.Tensor:
    """The predicted box of each query from its candidates' scores (Sec. 4.1's rules, vectorised).

    scores: Tensor[Q, N]; boxes: Tensor[Q, N, 4] xyxy pixels; valid: Tensor[Q, N] bool (at least one per row).
    ``argmax``: the top box. ``largest``: of the valid boxes whose score is above the row's mean valid score (the
    top box when none is, e.g. all equal), the one of largest area (the first on ties). ``union``: the union box
    of those above-mean boxes. Returns Tensor[Q, 4]."""
    if rule not in BOX_RULES:
        raise UsageError(f"box rule {rule!r}: expected one of {', '.join(BOX_RULES)}")
    if not bool(valid.any(1).all()):
        raise UsageError("choose_boxes: a query has no candidate box")
    s = scores.masked_fill(~valid, float("-inf"))
    top = s.argmax(1)
    rows = torch.arange(len(s))
    if rule == "argmax":
        return boxes[rows, top]
    n = valid.sum(1, keepdim=True).clamp_min(1)
    mean = scores.masked_fill(~valid, 0).sum(1, keepdim=True) / n
    above = valid & (scores > mean)
    above[rows, top] |= ~above.any(1)  # no box above the mean (all scores equal): the top one
    if rule == "largest":
        area = (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)
        return boxes[rows, area.masked_fill(~above, float("-inf")).argmax(1)]
    lo = boxes[..., :2].masked_fill(~above[..., None], float("inf")).amin(1)
    hi = boxes[..., 2:].masked_fill(~above[..., None], float("-inf")).amax(1)
    return torch.cat([lo, hi], 1)


# -------------------------------------------------------------------------------------------------- KAM


class KnowledgeAdaptation(nn.Module):
    """KAM's MLP (Fig. 3): ``[f_i, f_p, f_c, f_q]`` (4 x E) -> FC + BN + ReLU -> FC + BN + ReLU -> FC -> sigmoid.

    ``forward(fi, fp, fc, fq)`` takes Tensor[M, E] each (one row per candidate box, batch-normalised over the M
    rows) and returns the logits Tensor[M]; :meth:`score` the sigmoid ``S^KAM``."""

    def __init__(self, embed_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.fuse = nn.Sequential(nn.Linear(4 * embed_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, fi: torch.Tensor, fp: torch.Tensor, fc: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fi, fp, fc, fq], -1).float()
        return self.out(self.transform(self.fuse(x)))[:, 0]

    def score(self, fi: torch.Tensor, fp: torch.Tensor, fc: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
        """``S^KAM`` in (0, 1): Tensor[M]."""
        return torch.sigmoid(self(fi, fp, fc, fq))


def kam_loss(logits: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The grounding loss of [10] over each pair's candidates: mean over pairs of ``-log softmax(logits)[target]``.

    logits: Tensor[B, N] (padding anywhere ``valid`` is False); valid: Tensor[B, N] bool; target: Tensor[B] long,
    the index of the pseudo-labelled box (valid)."""
    s = logits.masked_fill(~valid, float("-inf"))
    return nn.functional.cross_entropy(s, target)


__all__ = ["BOX_RULES", "BiCMConfig", "CLASS_NAME", "COM_INFO", "KnowledgeAdaptation", "QAM_MAPS", "TRAINED",
           "VARIANTS", "VARIANT_MODULES", "bottom_up", "choose_boxes", "fused_score", "kam_loss", "variant_config"]
