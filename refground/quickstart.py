"""The main job: synthetic world -> detector -> features -> graphs -> CMRIN -> evaluation -> report.

:func:`run_quickstart` chains the library calls behind ``refground data synth``, ``train detector``,
``extract --no-dense``, ``graph``, ``train cmrin`` and ``eval --method cmrin`` (``examples/quickstart.sh`` runs
the same commands one by one). Every step is cached, so a second run only re-reads the results. The report
(``<cache>/<dataset>/report/quickstart.md``) has Precision@1 per split and expression kind with ground-truth
objects as candidates, the drop with the detector's top-N proposals, the time of each step, and PNGs: the
training curve and the paper's Figure 4 for a few test queries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refground.data.model import KIND_ORDER
from refground.data.store import dataset_dir
from refground.tables import EVAL_SPLITS, FLOAT, SECONDS, format_value, pct
from refground.threads import use_threads

QUICK_EPOCHS = 1  # the quickstart schedule: what fits the 5-minute budget (README; 2 epochs until issue 16)
Step = Callable[[str], None]


def run_quickstart(cache: Any = None, dataset: str = "synth", seed: int = 0, cmrin_epochs: int | None = None,
                   top_n: int = 10, figures: int = 3, on_step: Step | None = None, images: int = 5000,
                   image_size: int = 256, detector_config: Any = None, cmrin_config: Any = None,
                   force: bool = False, threads: int | str | None = None) -> dict[str, Any]:
    """Run every step (each skipped when its artifact is current; ``force``: every step redone, the runs
    retrained in place, which a run of other settings needs) and write the report.

    The defaults are the main job's: the default synthetic world (5,000 images of 256 px), the default
    detector and the full CMRIN (``cmrin_epochs`` overrides its epochs); tests pass small ones. ``threads``:
    torch threads of each step (:func:`refground.threads.use_threads`: a count, ``"auto"`` chosen afresh as
    each step starts from the idle cores, None: as they are).

    Returns ``{"steps": [{"step", "seconds", "status"}], "precision": {split: {kind: P@1}},
    "proposals": {split: {kind: P@1}}, "report": path, "figures": [paths], "seconds": total}``.
    """
    from refground.data.synth import ensure_synthetic
    from refground.features.detector import DetectorConfig
    from refground.features.detector_train import features_referent_recall, split_image_ids, train_detector
    from refground.features.pipeline import default_workers, extract_dataset, features_path
    from refground.graph_artifact import build_graphs
    from refground.methods.cmrin.model import variant_config
    from refground.eval.evaluate import comprehension_of
    from refground.grounding.candidates import CandidateSpec
    from refground.methods.cmrin.run import predict_cmrin_many, train_cmrin

    say = on_step or (lambda _msg: None)
    t_all = time.perf_counter()
    steps: list[dict[str, Any]] = []

    def step(name: str, fn: Callable[[], Any], status: Callable[[Any], str],
             work: Callable[[Any], tuple[float, str]] | None = None) -> Any:
        """Run one step; ``work(value)`` gives (items done, unit) for its throughput (none on a cache hit)."""
        say(name)
        t0 = time.perf_counter()
        with use_threads(threads) as count:
            value = fn()
        seconds = time.perf_counter() - t0
        row = {"step": name, "seconds": round(seconds, 1), "status": status(value), "throughput": None, "unit": "",
               "threads": count}
        items, unit = work(value) if work is not None else (0.0, "")
        if items and row["status"] not in ("hit", "current"):
            row["throughput"], row["unit"] = round(items / max(seconds, 1e-9), 1), unit
        steps.append(row)
        return value

    ds_dir = dataset_dir(dataset, cache)
    ds, _ = step("refground data synth", lambda: ensure_synthetic(ds_dir, dataset, images, seed, image_size,
                                                                       force=force),
                 lambda r: "written" if r[1] else "hit", lambda r: (r[0].num_images, "images/s"))
    det_config = detector_config or DetectorConfig()
    # The detector's val evaluation is deferred (`refground train detector` runs it on the cache hit): its
    # proposal recall is read from the extracted features below, which hold the same proposals.
    step("refground train detector",
         lambda: train_detector(ds, ds_dir.parent / "runs" / "detector" / "default", det_config,
                                seed=seed, dataset_dir=ds_dir, force=force, evaluate=False),
         lambda r: "hit" if r["cache_hit"] else "trained",
         lambda r: (r.get("epochs_trained_now", 0) * len(split_image_ids(ds, "train")), "train images/s"))
    step("refground extract --no-dense",
         lambda: extract_dataset(dataset, cache, dense=False, seed=seed, force=force, workers=default_workers()),
         lambda r: "hit" if r.get("cache_hit") else "written", lambda r: (r.get("images_computed", 0), "images/s"))
    step("refground graph", lambda: build_graphs(dataset, cache, force=force), lambda r: r["status"],
         lambda r: (ds.num_images, "images/s"))
    # A short schedule still ends with its last epoch at the lowered learning rate.
    overrides = {"epochs": cmrin_epochs, "lr_decay_epochs": max(cmrin_epochs - 1, 0)} if cmrin_epochs else {}
    config = cmrin_config or variant_config("cmrin", **overrides)
    cm = step("refground train cmrin", lambda: train_cmrin(dataset, cache, "cmrin", config, seed=seed, force=force),
              lambda r: "hit" if r["cache_hit"] else "trained",
              lambda r: ((r.get("epochs_trained_now") or 0) * (r.get("train_queries") or 0), "train queries/s"))
    precision: dict[str, dict[str, float]] = {}
    proposals: dict[str, dict[str, float]] = {}

    def evaluate_all() -> int:
        jobs = [(split, CandidateSpec(source, top_n)) for source in ("gt", "proposals") for split in EVAL_SPLITS]
        scored = 0
        for res in predict_cmrin_many(dataset, cache, "cmrin", jobs, force=force):
            figs = comprehension_of(ds, res["path"], res["split"])
            table = precision if res["candidates"] == "gt" else proposals
            table[res["split"]] = {kind: f["precision@1"] for kind, f in figs.items()}
            scored += int(figs.get("all", {}).get("queries", 0))
        return scored

    step(f"refground eval --method cmrin (gt and top-{top_n} proposals)", evaluate_all, lambda _r: "done",
         lambda n: (n, "queries/s"))
    report_dir = ds_dir.parent / "report"
    pngs = step("figures", lambda: _figures(ds, cache, dataset, report_dir, cm, figures), lambda _r: "written")
    result = {"steps": steps, "precision": precision, "proposals": proposals, "top_n": top_n,
              "cmrin": {k: cm.get(k) for k in ("run", "best_epoch", "train_seconds", "queries_per_s")},
              "detector_recall@10": features_referent_recall(ds, features_path(dataset, cache), "val", (10,))[10],
              "figures": [str(p) for p in pngs], "seconds": round(time.perf_counter() - t_all, 1)}
    report = report_dir / "quickstart.md"
    from refground.atomic import atomic_file

    with atomic_file(report) as fh:
        fh.write(render_report(result, ds.name))
    result["report"] = str(report)
    return result


def _figures(ds: Any, cache: Any, dataset: str, out_dir: Path, cm: dict[str, Any], count: int) -> list[Path]:
    """The training curve and Figure 4 for the first ``count`` second-order relation queries of testB."""
    from refground.methods.cmrin.run import explain_query
    from refground.plots import render_curve
    from refground.methods.cmrin.figures import render_cmrin_figure
    from refground.viz import save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [save_png(render_curve(cm.get("curve") or _curve_of(cm["run"]), "cmrin training"),
                      out_dir / "cmrin_curve.png")]
    picked = [q for q in ds.queries("testB", "expression") if q.kind == "relation2"][:count]
    for q in picked:
        info = explain_query(dataset, cache, "cmrin", q.id)
        paths.append(save_png(render_cmrin_figure(ds, info["query"], info["boxes"], info["scores"],
                                                   info.get("vertex_gates"), info["candidates"]), out_dir / f"cmrin_query_{q.id}.png"))
    return paths


def _curve_of(run: str) -> dict[str, Any]:
    from refground.train import CURVE_FILE, read_json

    return read_json(Path(run) / CURVE_FILE) or {}


def render_report(result: dict[str, Any], name: str) -> str:
    """The markdown report of a quickstart result."""
    kinds = [k for k in ("all", *KIND_ORDER) if any(k in result["precision"].get(s, {}) for s in EVAL_SPLITS)]
    lines = [f"# refground quickstart: CMRIN on `{name}`", "",
             "Precision@1 (%) with the ground-truth objects as candidates (`refground eval --method cmrin`):", "",
             "| split | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for s in EVAL_SPLITS:
        lines.append(f"| {s} | " + " | ".join(pct(result["precision"].get(s, {}).get(k)) for k in kinds) + " |")
    n = result["top_n"]
    lines += ["", f"With the detector's top {n} proposals by confidence as candidates (`--candidates proposals "
              f"--top-n {n}`), and the drop against ground-truth candidates:", "",
              "| split | P@1 gt | P@1 proposals | drop (points) |", "|---|---|---|---|"]
    for s in EVAL_SPLITS:
        g, p = result["precision"].get(s, {}).get("all"), result["proposals"].get(s, {}).get("all")
        drop = "-" if g is None or p is None else pct(g - p)
        lines.append(f"| {s} | {pct(g)} | {pct(p)} | {drop} |")
    cm = result["cmrin"]
    lines += ["", f"CMRIN run: `{cm['run']}`, best epoch {cm['best_epoch']} on val, "
              f"{format_value(cm['queries_per_s'], FLOAT)} training queries/s. Detector referent recall@10 on val: "
              f"{pct(result['detector_recall@10'])}%.", "", "| step | seconds | throughput | status |",
              "|---|---|---|---|"]
    lines += [f"| `{s['step']}` | {format_value(s['seconds'], SECONDS)} | "
              f"{format_value(s.get('throughput'), FLOAT)} {s.get('unit', '')} | {s['status']} |" for s in result["steps"]]
    lines += ["", f"Total: {format_value(result['seconds'], SECONDS)} s.", "", "Figures:", ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in result["figures"]]
    return "\n".join(lines) + "\n"
