"""What a CLIP knows of a grounding dataset it never saw: zero-shot figures (``refground report clip``).

On one split (default val) of a dataset, with any CLIP folder (the built-in one of ``refground train clip`` or
``hf:PATH``), nothing trained on the dataset:

- **crop classification**: each ground-truth object's crop (the CLIP artifact's crop recipe,
  :func:`refground.features.extract.clip_crop`) against one text per class, the argmax is the prediction:
  by category ("a photo of a {category}.", the prompt of the artifact's category embeddings) and by colour
  (an ensemble of the templates in :data:`COLOR_TEMPLATES`, their embeddings averaged as CLIP's prompt
  ensembles are); accuracy per class and overall;
- **caption -> image retrieval**: every caption of the split against every image of the split, recall@1 / 10;
- **query -> region**: every expression against the crops of its own image's objects, recall@1 (the
  referent ranked first) beside chance (the mean of 1 / objects in the image), per expression kind;
- **the gradient-weighted [CLS] attention map** of an expression on its image (BiCM's QAM signal,
  :func:`refground.features.clip_attention.query_attention_maps`): the share of expressions whose map
  maximum falls inside the referent's box, per kind, beside the plain (vanilla) [CLS] attention map's share
  and the chance of a uniformly random point (the mean box area over the image area).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.data.model import Dataset
from refground.errors import DataError
from refground.progress import track
from refground.tables import TableData, write_report

CATEGORY_TEMPLATE = "a photo of a {}."  # = refground.features.extract.CLIP_PROMPT
COLOR_TEMPLATES = ("a photo of a {} shape.", "a {} object.", "something {}.")
RETRIEVAL_KS = (1, 5, 10)


def _texts(clip: Any, texts: Sequence[str]) -> torch.Tensor:
    return clip.embed_texts(list(texts)).float()


def class_embeddings(clip: Any, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Tensor[C, E]: per class name the normalised mean of its templates' text embeddings."""
    emb = _texts(clip, [t.format(n) for n in names for t in templates]).view(len(names), len(templates), -1)
    return torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)


def _accuracy(pred: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    per = {n: float((pred[truth == k] == k).mean()) if (truth == k).any() else None for k, n in enumerate(names)}
    return {"accuracy": float((pred == truth).mean()) if len(truth) else float("nan"), "count": int(len(truth)),
            "per_class": per, "chance": 1.0 / len(names)}


def split_images(ds: Dataset, split: str) -> list[int]:
    """Image ids of ``split`` (stored order)."""
    return [int(i) for i, s in zip(ds.image_ids, ds.image_splits) if s == split]


def zero_shot(ds: Dataset, clip: Any, split: str = "val", max_images: int | None = None,
              attention_batch: int = 16) -> dict[str, Any]:
    """The zero-shot figures of the module docstring for ``clip`` (a ClipEncoder with ``model``/``processor``,
    e.g. :class:`~refground.features.hf.HFClip`) on ``split`` of ``ds`` (the first ``max_images`` images of it
    where given). Returns a JSON-able dict."""
    from refground.features.clip_attention import query_attention_map_pairs
    from refground.features.detector_train import load_images
    from refground.features.extract import clip_crop

    t0 = time.perf_counter()
    ids = split_images(ds, split)[:max_images]
    if not ids:
        raise DataError(f"dataset {ds.name}: no images in split {split!r}")
    keep = set(ids)
    colors = ds.object_attributes.get("color")
    color_names = sorted({str(c) for c in colors}) if colors is not None else []
    cat_emb = class_embeddings(clip, ds.categories, (CATEGORY_TEMPLATE,))
    col_emb = class_embeddings(clip, color_names, COLOR_TEMPLATES) if color_names else None
    col_index = {c: k for k, c in enumerate(color_names)}

    image_emb, crop_emb, obj_rows, obj_image = [], [], [], []
    block = 32
    for a in track(range(0, len(ids), block), total=(len(ids) + block - 1) // block,
                   description=f"zero-shot crops on {split}"):
        chunk = ids[a:a + block]
        images = load_images(ds, chunk)
        image_emb.append(clip.embed_images(images).float())
        crops = []
        for i, im in zip(chunk, images):
            sl = ds.object_slice(i)
            for r in range(sl.start, sl.stop):
                crops.append(clip_crop(im, ds.object_boxes[r]))
                obj_rows.append(r)
                obj_image.append(i)
        if crops:
            crop_emb.append(clip.embed_images(crops).float())
    images_e = torch.cat(image_emb)
    crops_e = torch.cat(crop_emb) if crop_emb else torch.zeros(0, images_e.shape[1])
    rows = np.asarray(obj_rows, dtype=np.int64)

    cat_truth = np.asarray(ds.object_categories[rows], dtype=np.int64)
    cat_pred = (crops_e @ cat_emb.t()).argmax(dim=1).numpy()
    out: dict[str, Any] = {"dataset": ds.name, "split": split, "images": len(ids), "objects": int(len(rows)),
                           "category": _accuracy(cat_pred, cat_truth, ds.categories),
                           "category_prompt": CATEGORY_TEMPLATE}
    if col_emb is not None:
        col_truth = np.asarray([col_index[str(colors[r])] for r in rows], dtype=np.int64)
        col_pred = (crops_e @ col_emb.t()).argmax(dim=1).numpy()
        out["color"] = _accuracy(col_pred, col_truth, color_names)
        out["color_prompts"] = list(COLOR_TEMPLATES)

    # caption -> image retrieval among the split's images
    image_row = {i: k for k, i in enumerate(ids)}
    caps = [q for q in ds.queries(split, "caption") if q.image_id in keep]
    if caps:
        from refground.features.clip_train import retrieval_recall

        cap_e = _texts(clip, [q.text for q in caps])
        rec = retrieval_recall(images_e, cap_e, torch.tensor([image_row[q.image_id] for q in caps]), RETRIEVAL_KS)
        out["caption_to_image"] = {"captions": len(caps), "images": len(ids),
                                   **{f"recall@{k}": rec[f"text_to_image@{k}"] for k in RETRIEVAL_KS},
                                   "chance@1": 1.0 / len(ids)}

    # query -> region among the image's own objects, and the attention maps
    exprs = [q for q in ds.queries(split, "expression") if q.image_id in keep]
    if exprs:
        q_e = _texts(clip, [q.text for q in exprs])
        first = {}
        for k, i in enumerate(obj_image):
            first.setdefault(i, k)
        counts = {i: ds.object_slice(i).stop - ds.object_slice(i).start for i in ids}
        hit, chance, kinds = [], [], []
        for k, q in enumerate(exprs):
            a = first[q.image_id]
            n = counts[q.image_id]
            scores = crops_e[a:a + n] @ q_e[k]
            hit.append(rows[a + int(scores.argmax())] == ds.object_row(q.referent_object_id))
            chance.append(1.0 / n)
            kinds.append(q.kind)
        out["query_to_region"] = _per_kind(np.asarray(hit), np.asarray(chance), kinds)
        out["attention_pointing"] = _pointing(ds, clip, exprs, query_attention_map_pairs, attention_batch)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _per_kind(hit: np.ndarray, chance: np.ndarray, kinds: Sequence[str]) -> dict[str, Any]:
    """{"all": {"recall@1", "chance", "count"}, kind: ...} of per-query hits and chances."""
    kinds_a = np.asarray(kinds)
    groups = {"all": np.ones(len(hit), dtype=bool), **{k: kinds_a == k for k in dict.fromkeys(kinds)}}
    return {name: {"recall@1": float(hit[m].mean()), "chance": float(chance[m].mean()), "count": int(m.sum())}
            for name, m in groups.items() if m.any()}


def _argmax_point(m: torch.Tensor) -> tuple[float, float]:
    """(x, y) pixel centre of the map's maximum (the first one in row-major order)."""
    k = int(m.flatten().argmax())
    return (k % m.shape[1]) + 0.5, (k // m.shape[1]) + 0.5


def _pointing(ds: Dataset, clip: Any, exprs: Sequence[Any], maps_fn: Any, batch: int) -> dict[str, Any]:
    """Share of expressions whose gradient-weighted [CLS] attention map (and, apart, the vanilla map) peaks
    inside the referent's box, per kind, with the uniform-point chance (box area / image area). ``maps_fn(clip,
    images, texts)`` gives (weighted maps, vanilla maps)."""
    from refground.features.detector_train import load_images

    hits = {"weighted": [], "vanilla": []}
    chance, kinds = [], []
    for a in track(range(0, len(exprs), batch), total=(len(exprs) + batch - 1) // batch,
                   description="attention maps"):
        part = exprs[a:a + batch]
        images = load_images(ds, [q.image_id for q in part])
        texts = [q.text for q in part]
        for name, maps in zip(("weighted", "vanilla"), maps_fn(clip, images, texts)):
            for q, m in zip(part, maps):
                x, y = _argmax_point(m)
                b = ds.object_boxes[ds.object_row(q.referent_object_id)]
                hits[name].append(b[0] <= x <= b[2] and b[1] <= y <= b[3])
        for q, im in zip(part, images):
            b = ds.object_boxes[ds.object_row(q.referent_object_id)]
            chance.append(float((b[2] - b[0]) * (b[3] - b[1])) / float(im.shape[0] * im.shape[1]))
            kinds.append(q.kind)
    weighted = _per_kind(np.asarray(hits["weighted"]), np.asarray(chance), kinds)
    vanilla = _per_kind(np.asarray(hits["vanilla"]), np.asarray(chance), kinds)
    return {k: {"weighted": v["recall@1"], "vanilla": vanilla[k]["recall@1"], "chance": v["chance"],
                "count": v["count"]} for k, v in weighted.items()}


# ------------------------------------------------------------------------------------------------ report


def zero_shot_tables(res: dict[str, Any], model: str) -> list[TableData]:
    """The report's tables of a :func:`zero_shot` result."""
    where = f"{res['dataset']} {res['split']}"
    rows = [["category", res["category"]["accuracy"], res["category"]["chance"], res["category"]["count"]]]
    if "color" in res:
        rows.append(["colour", res["color"]["accuracy"], res["color"]["chance"], res["color"]["count"]])
    tables = [TableData(f"CLIP {model} zero-shot on {where}: ground-truth crops classified by prompt",
                        ["label", "accuracy", "chance", "objects"], rows)]
    if "caption_to_image" in res:
        c = res["caption_to_image"]
        tables.append(TableData(f"caption -> image retrieval among {c['images']} images",
                                ["metric", "value"], [[f"recall@{k}", c[f"recall@{k}"]] for k in RETRIEVAL_KS]
                                + [["chance@1", c["chance@1"]], ["captions", c["captions"]]]))
    if "query_to_region" in res:
        q = res["query_to_region"]
        p = res["attention_pointing"]
        tables.append(TableData("expression -> its image's objects (crop embeddings), and the [CLS] attention "
                                "map's maximum inside the referent box",
                                ["kind", "region recall@1", "region chance", "weighted map", "vanilla map",
                                 "point chance", "expressions"],
                                [[k, v["recall@1"], v["chance"], p[k]["weighted"], p[k]["vanilla"], p[k]["chance"],
                                  v["count"]] for k, v in q.items()],
                                [None, "percent", "percent", "percent", "percent", "percent", "count"]))
    return tables


def report_clip(dataset: str, cache: Path | None, clip_spec: str = "builtin", split: str = "val",
                out: Path | None = None, max_images: int | None = None, figure_examples: int = 8) -> dict[str, Any]:
    """``refground report clip``: :func:`zero_shot` of CLIP ``clip_spec`` (``builtin[:NAME]`` or ``hf:PATH``)
    on ``split`` of ``dataset``, written as markdown (``out``, default ``<cache>/report/clip.md``), JSON beside
    it and a PNG of attention maps (``<stem>_attention.png``). Returns ``{"markdown_path", "tables", "json"}``."""
    from refground.data.store import dataset_dir, load_dataset
    from refground.features.sources import resolve
    from refground.tables import markdown_table

    ds_dir = dataset_dir(dataset, cache)
    ds = load_dataset(ds_dir)
    spec = resolve(clip_spec, "clip", ds_dir.parent / "runs")
    clip = spec.load(ds)
    res = zero_shot(ds, clip, split, max_images)
    res["clip"] = {"spec": clip_spec, "name": spec.name, "path": str(spec.path)}
    tables = zero_shot_tables(res, spec.name)
    path = Path(out) if out is not None else ds_dir.parent / "report" / "clip.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    png = attention_figure(ds, clip, split, path.with_name(f"{path.stem}_attention.png"), figure_examples)
    res["png"] = str(png) if png else None
    res["markdown_path"] = str(path)
    lines = [f"# CLIP {spec.name}: zero-shot on {dataset} {split}", ""]
    for t in tables:
        lines += markdown_table(t) + [""]
    if png:
        lines += [f"![attention maps]({Path(png).name})", ""]
    res = write_report(path, "\n".join(lines), res)
    return {"markdown_path": str(path), "tables": tables, "json": res}


def attention_figure(ds: Dataset, clip: Any, split: str, path: Path, n: int = 8) -> Path | None:
    """A PNG of ``n`` category expressions of ``split``: the image with the referent box, the vanilla and the
    gradient-weighted [CLS] attention maps with their maxima."""
    from refground.features.clip_attention import query_attention_map_pairs
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from refground.features.detector_train import load_images
    from refground.plots import to_image
    from refground.viz import save_png

    keep = set(split_images(ds, split))
    exprs = [q for q in ds.queries(split, "expression") if q.image_id in keep and q.kind == "category"][:n]
    if not exprs or n < 1:
        return None
    images = load_images(ds, [q.image_id for q in exprs])
    texts = [q.text for q in exprs]
    weighted, vanilla = query_attention_map_pairs(clip, images, texts)
    fig = Figure(figsize=(7.5, 2.6 * len(exprs)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(exprs), 3, squeeze=False)
    for r, (q, im) in enumerate(zip(exprs, images)):
        b = ds.object_boxes[ds.object_row(q.referent_object_id)]
        for c, (title, m) in enumerate((("image", None), ("vanilla", vanilla[r]), ("query-aware", weighted[r]))):
            ax = axes[r][c]
            ax.imshow(im)
            if m is not None:
                ax.imshow(m.numpy(), cmap="jet", alpha=0.5, extent=(0, im.shape[1], im.shape[0], 0))
                x, y = _argmax_point(m)
                ax.plot([x], [y], marker="x", color="white", markersize=10, mew=2)
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor="lime",
                                   linewidth=2))
            ax.set_title(q.text if c == 0 else title, fontsize=8)
            ax.axis("off")
    return Path(save_png(to_image(fig), path))


__all__ = ["COLOR_TEMPLATES", "CATEGORY_TEMPLATE", "attention_figure", "class_embeddings", "report_clip",
           "zero_shot", "zero_shot_tables"]
