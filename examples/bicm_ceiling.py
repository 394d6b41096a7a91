"""What an appearance-only matcher can reach on a world: the ceiling of BiCM's bottom-up information.

COM scores a proposal by what its crop looks like and by its class name; neither says where the object is, nor
what is next to it. This script replaces COM's two cosines by perfect knowledge of both (the referent's true
category and colour, read from the dataset: a diagnostic, never a method) and picks, among the proposals
BiCM ranks that match the referent's category and colour, the most confident one (or the largest, the paper's
rule), per expression kind. Location, size and relation expressions name several objects of one category and
colour apart by position or size, which no appearance score can tell apart: their ceiling is what a guess
among the look-alikes gets.

Usage: python examples/bicm_ceiling.py CACHE [SPLIT]   (needs `refground extract --clip builtin` on the world)
"""

from __future__ import annotations

import sys

import numpy as np

from refground.boxes import _box_iou_np
from refground.data.store import dataset_dir, load_dataset
from refground.methods.bicm.data import DetectorProposals
from refground.methods.bicm.model import BiCMConfig
from refground.methods.bicm.run import eval_pairs, features_path


def main(cache: str, split: str = "val") -> None:
    ds = load_dataset(dataset_dir("synth", cache))
    cfg = BiCMConfig()
    props = DetectorProposals.read(features_path("synth", cache, "detector-default"), ds, cfg.top_n, cfg.min_score,
                                   cfg.min_boxes)
    rows, _, qids, _ = eval_pairs(ds, split, "expression")
    obj_row = {int(o): k for k, o in enumerate(ds.object_ids.tolist())}
    q_row = {int(q): r for r, q in enumerate(ds.query_ids.tolist())}
    colour = np.array(ds.object_attributes.get("color", [""] * len(ds.object_ids)))
    names = props.class_names
    hits = {"confident": [], "largest": [], "any": []}
    kinds = []
    for irow, q in zip(rows.tolist(), qids.tolist()):
        ref = obj_row[ds.query(int(q)).referent_object_id]
        kinds.append(ds.query_kinds[q_row[int(q)]])
        sl = props.of(irow)
        boxes = props.boxes[sl].astype(np.float64)
        a, b = int(ds.image_object_offsets[irow]), int(ds.image_object_offsets[irow + 1])
        gt = ds.object_boxes[a:b]
        iou = _box_iou_np(boxes, gt) if len(boxes) else np.zeros((0, b - a))
        match = iou.argmax(1) + a if len(boxes) else np.zeros(0, int)
        ok = iou.max(1) >= 0.5 if len(boxes) else np.zeros(0, bool)
        cat = ds.categories[ds.object_categories[ref]]
        same = ok & (np.array([names[k] for k in props.labels[sl]]) == cat) & (colour[match] == colour[ref])
        hit_box = _box_iou_np(boxes, ds.object_boxes[ref:ref + 1])[:, 0] >= 0.5 if len(boxes) else np.zeros(0, bool)
        if not same.any():
            for k in hits:
                hits[k].append(False)
            continue
        cand = np.flatnonzero(same)
        area = (boxes[cand, 2] - boxes[cand, 0]) * (boxes[cand, 3] - boxes[cand, 1])
        hits["confident"].append(bool(hit_box[cand[0]]))  # proposals are stored best first
        hits["largest"].append(bool(hit_box[cand[np.argmax(area)]]))
        hits["any"].append(bool(hit_box[cand].any()))
    kinds = np.array(kinds)
    print(f"{split}: {len(kinds)} expressions; proposals: confidence >= {cfg.min_score}, {cfg.min_boxes}-{cfg.top_n}")
    print("kind        n     most confident look-alike   largest look-alike   some look-alike is it")
    for k in ["all", *sorted(set(kinds))]:
        sel = np.ones(len(kinds), bool) if k == "all" else kinds == k
        print(f"{k:10s} {sel.sum():5d}   " + "   ".join(f"{100 * np.mean(np.array(hits[m])[sel]):18.1f}"
                                                        for m in ("confident", "largest", "any")))


if __name__ == "__main__":
    main(*sys.argv[1:])
