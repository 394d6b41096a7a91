"""BiCM's training-free modules on images and query texts: QAM, COM and SF scores of every candidate box.

:func:`image_modules` is the unit of work (one image, the query texts asked of it): one vision pass of the CLIP
with the last block's attention (eq. 1), one backward pass per text through the last block for eq. 3's gradient,
the query-aware and vanilla maps (eqs. 4-5) upsampled to the image, ``P_t`` of each (Thr_a), ``P_t``'s crop
embedded with the CLIP artifact's crop recipe, and per candidate ``S^PQ`` (eq. 6, from the CLIP artifact's
proposal-crop embeddings: no CLIP call per proposal), ``S^CQ`` (eq. 7) and ``S^TD`` (eq. 9, the raw map's mean
over the box's pixels from a summed-area table, :func:`refground.boxes.box_map_mean`). :func:`compute_scores`
runs it over many (image, text) pairs and returns a :class:`ModuleScores` that every ablation row reads
(:func:`candidates`), so Tables 4-6 cost one pass. Nothing here reads a ground-truth box.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from refground.boxes import box_map_mean
from refground.errors import UsageError
from refground.methods.bicm.data import DetectorProposals
from refground.methods.bicm.model import BiCMConfig

MAPS = ("qa", "va")  # query-aware (eqs. 4-5), vanilla visual attention (Table 5)


@dataclass
class ClipInputs:
    """What COM reads besides the query: the CLIP (an :class:`~refground.features.hf.HFClip` with eager attention),
    ``crop_embedding`` float16[P_all, E] (the CLIP artifact's ``proposals/embedding``, row = the features file's
    proposal row), ``image_embedding`` float16[I, E] (``images/embedding``, dataset order), ``class_embedding``
    float32[C, E] (the detector's class names through the CLIP text encoder, eq. 7's ``fc``) and the artifact's
    ``crop`` recipe (``context``, ``square``)."""

    clip: Any
    crop_embedding: np.ndarray
    image_embedding: np.ndarray
    class_embedding: torch.Tensor
    crop: dict[str, Any]


@dataclass
class ModuleScores:
    """Module outputs of Q (image, text) pairs; candidates are the image's top proposals padded to N.

    ``image_rows`` int64[Q] (dataset rows), ``prop_rows`` int64[Q, N] (rows of :class:`DetectorProposals`, 0 at
    padding), ``valid`` bool[Q, N], ``s_pq`` / ``s_cq`` float32[Q, N] (eqs. 6-7), ``sim_iq`` float32[Q] (eq. 2),
    ``fq`` float16[Q, E] (query embedding), ``pt_class`` int64[Q] and ``pt_cq`` float32[Q] (P_t's class: the
    proposals' class of highest S^CQ, Sec. 3.3), and per map m in :data:`MAPS`: ``pt_box_m`` float32[Q, 4],
    ``pt_pq_m`` float32[Q] (P_t's S^PQ), ``td_m`` float32[Q, N] and ``pt_td_m`` float32[Q] (S^TD, eq. 9, of the
    proposals and of P_t), ``pt_feat_m`` float16[Q, E] (P_t's crop embedding, KAM's f_p)."""

    arrays: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __len__(self) -> int:
        return len(self.arrays["image_rows"])

    def subset(self, index: np.ndarray) -> ModuleScores:
        return ModuleScores({k: v[index] for k, v in self.arrays.items()})

    def save(self, path: Path, attrs: dict[str, Any] | None = None) -> None:
        """Write the arrays to an HDF5 file atomically (the caller writes the manifest)."""
        import h5py

        from refground.atomic import atomic_file

        with atomic_file(Path(path), "w+b") as fh:
            with h5py.File(fh, "w") as f:
                for k, v in self.arrays.items():
                    f.create_dataset(k, data=v)
                for k, v in (attrs or {}).items():
                    f.attrs[k] = v

    @classmethod
    def load(cls, path: Path) -> ModuleScores:
        import h5py

        with h5py.File(path, "r") as f:
            return cls({k: f[k][()] for k in f.keys()})


def class_embeddings(clip: Any, class_names: list[str]) -> torch.Tensor:
    """eq. 7's ``fc``: each detector class name (the bare name, as the paper encodes C_r) through the CLIP text
    encoder, float32[C, E] L2-normalised."""
    return clip.embed_texts([n.replace("_", " ") for n in class_names])


def _crops(image: np.ndarray, boxes: np.ndarray, crop: dict[str, Any]) -> list[np.ndarray]:
    from refground.features.extract import clip_crops

    return clip_crops(image, boxes, float(crop.get("context", 0.1)), bool(crop.get("square", True)))


def image_modules(inp: ClipInputs, image: np.ndarray, texts: list[str], fq: torch.Tensor, boxes: np.ndarray,
                  labels: np.ndarray, crop_rows: np.ndarray, thr_a: float) -> dict[str, np.ndarray]:
    """QAM, COM and SF of one image for T query texts.

    image: uint8[H, W, 3]; texts: T strings; fq: Tensor[T, E] their L2-normalised CLIP text embeddings; boxes:
    float32[N, 4] the image's proposals (xyxy pixels), labels int64[N] their detector classes, crop_rows int64[N]
    their rows in ``inp.crop_embedding``. Returns the per-pair arrays of :class:`ModuleScores` for these T pairs
    (unpadded: ``s_pq`` etc. float32[T, N])."""
    from refground.features.clip_attention import (
        _patch,
        box_from_map,
        cls_attention_and_grad_texts,
        grid_to_image_pair,
        head_mean,
        processor_window,
    )

    clip = inp.clip
    t, n = len(texts), len(boxes)
    if t == 0:
        raise UsageError("image_modules: no query text")
    hh, ww = image.shape[:2]
    pixels = clip._pixels([image])
    att, grad, sims = cls_attention_and_grad_texts(clip.model, pixels, **clip.tokens(texts))
    patch = _patch(clip.model)
    grid = int(pixels.shape[-2]) // patch, int(pixels.shape[-1]) // patch
    window = processor_window(clip.processor.image_processor, hh, ww)
    a_qa = head_mean(att.expand_as(grad), grad, True).view(t, *grid).cpu()  # eqs. 4-5
    a_va = head_mean(att[None], None, False).view(1, *grid).cpu()  # Table 5's vanilla map: mean_h att
    out: dict[str, Any] = {}
    fq = F.normalize(fq.float(), dim=-1)
    prop_feat = torch.from_numpy(inp.crop_embedding[crop_rows].astype(np.float32))  # [N, E]
    s_pq = fq @ F.normalize(prop_feat, dim=-1).T if n else torch.zeros(t, 0)  # eq. 6
    fc = inp.class_embedding[torch.from_numpy(labels)] if n else torch.zeros(0, fq.shape[1])
    s_cq = fq @ F.normalize(fc, dim=-1).T if n else torch.zeros(t, 0)  # eq. 7
    out["s_pq"], out["s_cq"] = s_pq.numpy().astype(np.float32), s_cq.numpy().astype(np.float32)
    out["sim_iq"] = sims.cpu().numpy().astype(np.float32)
    if n:
        best = s_cq.argmax(1)
        out["pt_class"] = torch.from_numpy(labels)[best].numpy().astype(np.int64)
        out["pt_cq"] = s_cq.max(1).values.numpy().astype(np.float32)
    else:  # no proposal: P_t's class name is the closest of all classes
        cq_all = fq @ F.normalize(inp.class_embedding, dim=-1).T
        out["pt_class"] = cq_all.argmax(1).numpy().astype(np.int64)
        out["pt_cq"] = cq_all.max(1).values.numpy().astype(np.float32)
    tb = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4))
    va_raw, va_norm = grid_to_image_pair(a_va[0], (hh, ww), window)
    va_box = box_from_map(va_norm, thr_a)
    va_td = box_map_mean(va_raw, torch.cat([tb, va_box[None]])).float()
    pt_qa, td_qa, pt_td_qa = [], [], []
    for k in range(t):
        raw, norm = grid_to_image_pair(a_qa[k], (hh, ww), window)
        box = box_from_map(norm, thr_a)  # P_t: the normalised map at Thr_a; S^TD's scale: the raw map
        td = box_map_mean(raw, torch.cat([tb, box[None]])).float()
        pt_qa.append(box)
        td_qa.append(td[:n])
        pt_td_qa.append(td[n])
    out["pt_box_qa"] = torch.stack(pt_qa).numpy().astype(np.float32)
    out["td_qa"] = torch.stack(td_qa).numpy().astype(np.float32).reshape(t, n)
    out["pt_td_qa"] = torch.stack(pt_td_qa).numpy().astype(np.float32)
    out["pt_box_va"] = np.repeat(va_box.numpy()[None].astype(np.float32), t, 0)
    out["td_va"] = np.repeat(va_td[:n].numpy()[None].astype(np.float32), t, 0)
    out["pt_td_va"] = np.full(t, float(va_td[n]), np.float32)
    feats = clip.embed_images(_crops(image, np.concatenate([out["pt_box_qa"], va_box.numpy()[None]]), inp.crop))
    feats = F.normalize(feats.float(), dim=-1)
    out["pt_feat_qa"], out["pt_feat_va"] = feats[:t].numpy(), np.repeat(feats[t:].numpy(), t, 0)
    out["pt_pq_qa"] = (fq * feats[:t]).sum(-1).numpy().astype(np.float32)
    out["pt_pq_va"] = (fq @ feats[t]).numpy().astype(np.float32)
    out["fq"] = fq.numpy()
    return out


def compute_scores(inp: ClipInputs, images: Any, props: DetectorProposals, image_rows: np.ndarray,
                   texts: list[str], thr_a: float, description: str = "") -> ModuleScores:
    """:func:`image_modules` over Q (image, text) pairs, one vision pass per distinct image.

    images: a callable ``row -> uint8[H, W, 3]`` (dataset row to pixels); image_rows int64[Q]; texts Q strings.
    The pairs' text embeddings come from one batched pass over the distinct texts. Returns a
    :class:`ModuleScores` in the pairs' order, candidates padded to the largest proposal count."""
    from refground.progress import track

    image_rows = np.asarray(image_rows, np.int64)
    if len(image_rows) != len(texts):
        raise UsageError(f"compute_scores: {len(image_rows)} images and {len(texts)} texts")
    q = len(texts)
    uniq, inv = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    fq_all = inp.clip.embed_texts([str(u) for u in uniq])
    counts = np.diff(props.offsets)[image_rows] if q else np.zeros(0, np.int64)
    n = max(1, int(counts.max()) if q else 1)
    e = int(fq_all.shape[1])
    arrays: dict[str, np.ndarray] = {
        "image_rows": image_rows, "prop_rows": np.zeros((q, n), np.int64), "valid": np.zeros((q, n), bool),
        "s_pq": np.zeros((q, n), np.float32), "s_cq": np.zeros((q, n), np.float32), "sim_iq": np.zeros(q, np.float32),
        "fq": np.zeros((q, e), np.float16), "pt_class": np.zeros(q, np.int64), "pt_cq": np.zeros(q, np.float32)}
    for m in MAPS:
        arrays.update({f"pt_box_{m}": np.zeros((q, 4), np.float32), f"pt_pq_{m}": np.zeros(q, np.float32),
                       f"td_{m}": np.zeros((q, n), np.float32), f"pt_td_{m}": np.zeros(q, np.float32),
                       f"pt_feat_{m}": np.zeros((q, e), np.float16)})
    order = np.argsort(image_rows, kind="stable")
    bounds = np.flatnonzero(np.diff(image_rows[order])) + 1
    groups = np.split(order, bounds) if q else []
    it = track(groups, total=len(groups), description=description) if description else groups
    for g in it:
        row = int(image_rows[g[0]])
        sl = props.of(row)
        k = sl.stop - sl.start
        res = image_modules(inp, images(row), [texts[i] for i in g], fq_all[inv[g]], props.boxes[sl],
                            props.labels[sl], props.crop_rows[sl], thr_a)
        arrays["prop_rows"][g, :k] = np.arange(sl.start, sl.stop)
        arrays["valid"][g, :k] = True
        for key, v in res.items():
            if v.ndim == 2 and key in ("s_pq", "s_cq", "td_qa", "td_va"):
                arrays[key][g, :k] = v
            else:
                arrays[key][g] = v
    return ModuleScores(arrays)


def candidates(ms: ModuleScores, cfg: BiCMConfig, props: DetectorProposals) -> dict[str, torch.Tensor]:
    """The candidate set and scores of an ablation row: the proposals, plus P_t of ``cfg.qam``'s map when QAM is on.

    Returns ``boxes`` Tensor[Q, N(+1), 4], ``valid`` bool, ``s_pq``, ``s_cq``, ``s_td`` Tensor[Q, N(+1)] (S^TD of
    the row's map; zeros without QAM) and ``pt_index`` (N, or -1 without P_t), ``labels`` int64[Q, N(+1)]."""
    boxes = torch.from_numpy(props.boxes[ms["prop_rows"]])
    labels = torch.from_numpy(props.labels[ms["prop_rows"]])
    valid = torch.from_numpy(ms["valid"])
    s_pq, s_cq = torch.from_numpy(ms["s_pq"]), torch.from_numpy(ms["s_cq"])
    m = cfg.qam
    s_td = torch.from_numpy(ms[f"td_{m}"]) if m != "none" else torch.zeros_like(s_pq)
    out = {"boxes": boxes, "valid": valid, "s_pq": s_pq, "s_cq": s_cq, "s_td": s_td, "labels": labels,
           "pt_index": torch.tensor(-1)}
    if m == "none":
        return out
    q = len(ms)
    out["boxes"] = torch.cat([boxes, torch.from_numpy(ms[f"pt_box_{m}"])[:, None]], 1)
    out["valid"] = torch.cat([valid, torch.ones(q, 1, dtype=torch.bool)], 1)
    out["s_pq"] = torch.cat([s_pq, torch.from_numpy(ms[f"pt_pq_{m}"])[:, None]], 1)
    out["s_cq"] = torch.cat([s_cq, torch.from_numpy(ms["pt_cq"])[:, None]], 1)
    out["s_td"] = torch.cat([s_td, torch.from_numpy(ms[f"pt_td_{m}"])[:, None]], 1)
    out["labels"] = torch.cat([labels, torch.from_numpy(ms["pt_class"])[:, None]], 1)
    out["pt_index"] = torch.tensor(boxes.shape[1])
    return out


def kam_inputs(ms: ModuleScores, inp: ClipInputs, props: DetectorProposals, cand: dict[str, torch.Tensor],
               qam: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KAM's ``[f_i, f_p, f_c, f_q]`` of every candidate: four Tensor[Q, N(+1), E] float32 (padding rows hold
    the first proposal's values, masked by ``cand["valid"]``)."""
    q, nc = cand["valid"].shape
    n = ms["prop_rows"].shape[1]
    fi = torch.from_numpy(inp.image_embedding[ms["image_rows"]].astype(np.float32))[:, None].expand(q, nc, -1)
    fp = torch.from_numpy(inp.crop_embedding[props.crop_rows[ms["prop_rows"]]].astype(np.float32))
    if nc > n:
        fp = torch.cat([fp, torch.from_numpy(ms[f"pt_feat_{qam}"].astype(np.float32))[:, None]], 1)
    fc = inp.class_embedding[cand["labels"]]
    fq = torch.from_numpy(ms["fq"].astype(np.float32))[:, None].expand(q, nc, -1)
    return fi, F.normalize(fp, dim=-1), F.normalize(fc, dim=-1), fq


__all__ = ["ClipInputs", "MAPS", "ModuleScores", "candidates", "class_embeddings", "compute_scores",
           "image_modules", "kam_inputs"]
