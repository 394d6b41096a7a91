"""The Table 2 analogue: Precision@1 of CMRIN's ablation variants per split, and on the relation kinds.

Each variant is a run ``runs/cmrin/<variant>`` trained with ``refground train cmrin --variant <variant>``;
:func:`ablation_table` scores every run that exists (ground-truth objects as candidates, the predictions
written and reused like ``refground eval --method cmrin``) and renders the markdown table.
"""

from __future__ import annotations

from typing import Any

from refground.data.store import dataset_dir, load_dataset
from refground.errors import ArtifactError
from refground.tables import EVAL_SPLITS, pct
from refground.train import MODEL_FILE

KINDS = ("relation1", "relation2")


def ablation_table(dataset: str = "synth", cache: Any = None, runs: tuple[str, ...] | None = None,
                   splits: tuple[str, ...] = EVAL_SPLITS) -> dict[str, Any]:
    """``{"rows": [{"run", "label", "<split>": P@1, "<split>/<kind>": P@1, "relations/<split>": P@1}],
    "markdown": str}`` for the runs (default: every Table 2 variant that has a complete run)."""
    from refground.eval.evaluate import comprehension_of
    from refground.methods.cmrin.model import VARIANTS
    from refground.grounding.candidates import CandidateSpec
    from refground.methods.cmrin.run import predict_cmrin_many, run_dir

    names = list(runs) if runs else [v for v in VARIANTS if (run_dir(dataset, cache, v) / MODEL_FILE).is_file()]
    if not names:
        raise ArtifactError("no CMRIN runs to compare; train them with `refground train cmrin --variant NAME` "
                            f"for NAME in {', '.join(VARIANTS)}")
    ds = load_dataset(dataset_dir(dataset, cache))
    rows = []
    for name in names:
        row: dict[str, Any] = {"run": name, "label": VARIANTS.get(name, (name, {}))[0]}
        for split, res in zip(splits, predict_cmrin_many(dataset, cache, name, [(s, CandidateSpec()) for s in splits])):
            comp = comprehension_of(ds, res["path"], split)
            row[split] = comp["all"]["precision@1"]
            for kind in KINDS:
                if kind in comp:
                    row[f"{split}/{kind}"] = comp[kind]["precision@1"]
            rel = [comp[k] for k in KINDS if k in comp]
            if rel:
                n = sum(r["queries"] for r in rel)
                row[f"relations/{split}"] = sum(r["precision@1"] * r["queries"] for r in rel) / n
        rows.append(row)
    return {"rows": rows, "markdown": render_markdown(rows, splits)}


def render_markdown(rows: list[dict[str, Any]], splits: tuple[str, ...] = EVAL_SPLITS) -> str:
    cols = [*splits, *[f"{s}/{k}" for s in splits for k in KINDS]]
    head = "| # | variant | " + " | ".join(c.replace("/", " ") for c in cols) + " |"
    lines = ["Precision@1 (%), ground-truth objects as candidates:", "", head, "|---" * (len(cols) + 2) + "|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['label']} | " + " | ".join(pct(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
