"""The VL-NMS tables on the synthetic world (paper Tables 1, 2, 4 and 6) and the recall-against-N plot.

Rows come from artifacts that the pipeline already wrote; nothing is trained here:

* Table 1: referent and context-object recall@N of each proposal set: the detector's own proposals
  (class-agnostic NMS, top N by confidence; ``features/<name>.h5``), confidence-only per-class NMS on the
  pre-NMS detections (``vlnms/confidence``) and each VL-NMS run (``vlnms/<run>``).
* Table 2: CMRIN Precision@1 with ground-truth objects, the detector's top-10, and the top-10 of each
  proposal set (predictions written and reused like ``refground eval --method cmrin``).
* Table 4: the same VL-NMS run trained with and without the pseudo ground truth (runs ``<run>`` and
  ``<run>-nopseudo``).
* Table 6: seconds per image of the detector (extraction without and with the detection set), of VL-NMS
  (relatedness + NMS for all the image's queries) and of CMRIN (all the image's queries on 10 proposals).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from refground.data.store import dataset_dir, load_dataset
from refground.errors import ArtifactError
from refground.eval.metrics import RECALL_NS
from refground.tables import EVAL_SPLITS, MS, format_value, pct
from refground.train import MODEL_FILE

RUNS = ("fc-bce", "fc-rank", "trans-bce")
LABELS = {"detector": "detector NMS (class-agnostic, by confidence)",
          "confidence": "confidence-only NMS (per class, pre-NMS detections)",
          "fc-bce": "VL-NMS-FC, BCE", "fc-rank": "VL-NMS-FC, ranking", "trans-bce": "VL-NMS-Trans, BCE + reg",
          "trans-rank": "VL-NMS-Trans, ranking + reg"}


def _label(tag: str) -> str:
    if tag.endswith("-nopseudo"):
        return LABELS.get(tag[: -len("-nopseudo")], tag) + ", no pseudo GT"
    return LABELS.get(tag, tag)


def detector_recall(ds: Any, features_file: Path, split: str, ns: tuple[int, ...] = RECALL_NS) -> dict[str, float]:
    """Recall@N of the features artifact's own proposals (the same ranked list for every query of an image)."""
    from refground.cache import RaggedH5
    from refground.methods.vlnms.run import ranked_recall
    from refground.structures import RaggedBoxes

    with RaggedH5(features_file) as f:
        props = RaggedBoxes.read(f, "proposals")
    rows = ds.query_rows(split, "expression")
    image_rows = [ds.image_row(int(i)) for i in ds.query_image_ids[rows].tolist()]
    ranked = [props.group(r)[: max(ns)] for r in image_rows]
    return ranked_recall(ds, ds.query_ids[rows], ranked, ns)


def vlnms_tables(dataset: str = "synth", cache: Any = None, runs: tuple[str, ...] | None = None,
                 cmrin_run: str = "cmrin", features: str = "detector-default", top_n: int = 10, matcher: str = "cmrin",
                 splits: tuple[str, ...] = EVAL_SPLITS, timing_images: int = 64, min_confidence: float = 0.0
                 ) -> dict[str, Any]:
    """All four tables as dicts of rows, plus ``markdown``. A VL-NMS run without proposals for a split gets
    them written (``refground vlnms`` defaults, with ``min_confidence`` as its detection floor for the
    confidence-only and VL-NMS rows); a run named in ``runs`` that does not exist is a one-line
    ArtifactError naming `refground train vlnms`."""
    from refground.eval.evaluate import comprehension_of
    from refground.features.pipeline import features_path
    from refground.methods import get_method
    from refground.methods.vlnms.run import CONFIDENCE, run_dir, run_vlnms

    ds = load_dataset(dataset_dir(dataset, cache))
    candidates = list(runs) if runs is not None else [
        r for r in (*RUNS, *(f"{x}-nopseudo" for x in RUNS)) if (run_dir(dataset, cache, r) / MODEL_FILE).is_file()]
    if not candidates:
        raise ArtifactError("no VL-NMS runs to compare; train them with `refground train vlnms --variant fc|trans "
                            "--loss bce|rank`")
    recall: dict[str, dict[str, dict[str, float]]] = {"detector": {}}
    f_default = features_path(dataset, cache, features)
    for split in splits:
        recall["detector"][split] = detector_recall(ds, f_default, split)
    seconds: dict[str, float] = {}
    for tag in (CONFIDENCE, *candidates):
        res = run_vlnms(dataset, cache, None if tag == CONFIDENCE else tag, splits,
                        features=None if tag != CONFIDENCE else _run_features(dataset, cache, candidates[0]),
                        min_confidence=min_confidence)
        recall[tag] = {r["split"]: {k: v for k, v in r.items() if "recall@" in k} for r in res}
        seconds[tag] = float(np.mean([r.get("ms_per_image", np.nan) for r in res]))
    # Table 2: the second stage on each candidate set, through the registry and the shared candidates interface.
    jobs: list[tuple[str, dict[str, Any]]] = [(s, {"candidates": "gt"}) for s in splits]
    jobs += [(s, {"candidates": "proposals", "top_n": top_n}) for s in splits]
    jobs += [(s, {"candidates": "vlnms", "top_n": top_n, "vlnms_run": tag}) for tag in (CONFIDENCE, *candidates)
             for s in splits]
    precision: dict[str, dict[str, float]] = {}
    cmrin_ms: list[float] = []
    for (split, opts), res in zip(jobs, get_method(matcher, "predict").predict(dataset, cache, cmrin_run, jobs)):
        key = {"gt": "ground truth", "proposals": "detector"}.get(opts["candidates"], opts.get("vlnms_run"))
        precision.setdefault(key, {})[split] = comprehension_of(ds, res["path"], split)["all"]["precision@1"]
        if opts["candidates"] == "vlnms":  # Table 6 times the second stage on query-aware proposals
            cmrin_ms.append(float(res.get("ms_per_query", np.nan)))
    timing = measure_times(ds, dataset, cache, _run_features(dataset, cache, candidates[0]), seconds, cmrin_ms,
                           timing_images)
    out = {"recall": recall, "precision": precision, "timing": timing, "runs": candidates,
           "min_confidence": float(min_confidence),
           "labels": {k: _label(k) for k in recall}}
    out["markdown"] = render_markdown(out, splits)
    return out


def _run_features(dataset: str, cache: Any, run: str) -> str:
    from refground.cache.manifest import read_manifest_of
    from refground.methods.vlnms.run import run_dir

    m = read_manifest_of(run_dir(dataset, cache, run))
    return (m.params if m else {}).get("features", "detector-default")


def measure_times(ds: Any, dataset: str, cache: Any, features: str, vlnms_ms: dict[str, float],
                  cmrin_ms: list[float], images: int = 64) -> dict[str, Any]:
    """Table 6: milliseconds per image of the detector on ``images`` images (plain proposals, and with the
    pre-NMS detection set), of VL-NMS (from the proposal manifests) and of CMRIN (per query x queries per image)."""
    import torch

    from refground.data.store import image_path
    from refground.features.base import read_image
    from refground.features.detector import BuiltinDetector
    from refground.cache.manifest import read_manifest_of
    from refground.features.pipeline import features_path

    mf = read_manifest_of(features_path(dataset, cache, features))
    ckpt = mf.parents["detector"].path if mf and "detector" in mf.parents else None
    if not ckpt:
        raise ArtifactError(f"features {features}: no built-in detector recorded; Table 6 times the built-in detector")
    det = BuiltinDetector.load(ckpt)
    ids = [int(i) for i in ds.image_ids[:images]]
    imgs = [read_image(image_path(ds, i)) for i in ids]
    threshold = float(mf.params.get("detections", 0.05) or 0.05)

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    with torch.no_grad():
        runs: dict[str, list[float]] = {"plain": [], "both": []}
        # Interleaved, best of 5 each: the shared host's speed drifts between consecutive runs.
        for n in range(6):
            p = timed(lambda: det.propose(imgs, ids, 100))
            b = timed(lambda: det.propose_with_detections(imgs, ids, 100, threshold))
            if n:  # the first round warms up
                runs["plain"].append(p)
                runs["both"].append(b)
        plain, both = (1000 * min(runs[k]) / len(imgs) for k in ("plain", "both"))
    q_per_image = len(ds.query_rows("all", "expression")) / max(1, ds.num_images)
    return {"images": len(imgs), "threads": torch.get_num_threads(), "detector_ms": round(plain, 3),
            "detector_with_detections_ms": round(both, 3), "vlnms_ms": {k: round(v, 3) for k, v in vlnms_ms.items()},
            "cmrin_ms": round(float(np.nanmedian(cmrin_ms)) * q_per_image, 3) if cmrin_ms else None,
            "queries_per_image": round(q_per_image, 2),
            "overhead": {k: round((both - plain + v) / plain, 4) for k, v in vlnms_ms.items()}}


def render_markdown(t: dict[str, Any], splits: tuple[str, ...] = EVAL_SPLITS) -> str:
    lines = []
    if t.get("min_confidence"):
        lines += [f"Confidence-only NMS and VL-NMS drop detections with confidence below {t['min_confidence']:g} "
                  "(`--min-confidence`); the detector's own proposals are unfiltered.", ""]
    lines += ["### Table 1: recall of the referent and of context objects (%)", ""]
    for split in splits:
        lines += [f"**{split}**", "", "| proposals | " + " | ".join(f"R@{n}" for n in RECALL_NS) + " | "
                  + " | ".join(f"ctx R@{n}" for n in RECALL_NS) + " |", "|---" * (2 * len(RECALL_NS) + 1) + "|"]
        for tag, per in t["recall"].items():
            r = per.get(split, {})
            lines.append(f"| {t['labels'][tag]} | " + " | ".join(pct(r.get(f"recall@{n}")) for n in RECALL_NS) + " | "
                         + " | ".join(pct(r.get(f"context_recall@{n}")) for n in RECALL_NS) + " |")
        lines.append("")
    lines += ["### Table 2: CMRIN Precision@1 (%) with each candidate set (top 10)", "",
              "| candidates | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for key, per in t["precision"].items():
        lines.append(f"| {t['labels'].get(key, key)} | " + " | ".join(pct(per.get(s)) for s in splits) + " |")
    base = [r for r in t["runs"] if f"{r}-nopseudo" in t["runs"]]
    if base:
        lines += ["", "### Table 4: with and without pseudo ground truth", "",
                  "| run | " + " | ".join(f"{s} R@10" for s in splits) + " | " + " | ".join(f"{s} ctx R@10" for s in splits)
                  + " | " + " | ".join(f"{s} CMRIN P@1" for s in splits) + " |", "|---" * (3 * len(splits) + 1) + "|"]
        for r in base:
            for tag in (r, f"{r}-nopseudo"):
                rec = t["recall"][tag]
                lines.append(f"| {t['labels'][tag]} | " + " | ".join(pct(rec[s].get("recall@10")) for s in splits)
                             + " | " + " | ".join(pct(rec[s].get("context_recall@10")) for s in splits) + " | "
                             + " | ".join(pct(t["precision"].get(tag, {}).get(s)) for s in splits) + " |")
    tm = t["timing"]
    lines += ["", f"### Table 6: milliseconds per image ({tm['images']} images, {tm['threads']} threads, "
              f"{tm['queries_per_image']} queries per image)", "",
              "| stage | ms per image | extra over the detector |", "|---|---|---|",
              f"| detector (plain proposals) | {format_value(tm['detector_ms'], MS)} | - |",
              f"| detector + pre-NMS detection set | {format_value(tm['detector_with_detections_ms'], MS)} | "
              f"{pct(tm['detector_with_detections_ms'] / tm['detector_ms'] - 1)}% |"]
    for tag, ms in tm["vlnms_ms"].items():
        lines.append(f"| {t['labels'].get(tag, tag)} (scoring + NMS) | {format_value(ms, MS)} | "
                     f"{pct(tm['overhead'][tag])}% (with the detection set) |")
    if tm.get("cmrin_ms") is not None:
        lines.append(f"| CMRIN (10 candidates, all queries) | {format_value(tm['cmrin_ms'], MS)} | - |")
    return "\n".join(lines) + "\n"


def recall_plot(t: dict[str, Any], split: str, path: Path) -> Path:
    """Referent recall against N for every proposal set on ``split``, as a PNG."""
    from refground.atomic import atomic_file
    from refground.plots import line_chart

    def pct_or_none(value: Any) -> float | None:
        return None if value is None else 100 * value

    series = {t["labels"][tag]: (list(RECALL_NS), [pct_or_none(per[split].get(f"recall@{n}")) for n in RECALL_NS])
              for tag, per in t["recall"].items() if split in per}
    # N spans 1..100: a log axis keeps the small N readable; the ticks are the measured N themselves.
    img = line_chart(series, f"referent recall@N, {split}", "N (proposals kept per expression)", "recall@N (%)",
                     size=(720, 480), y_range=(0.0, 100.0), x_log=True, x_ticks=RECALL_NS)
    with atomic_file(Path(path), "wb") as fh:
        img.save(fh, format="PNG")
    return Path(path)
