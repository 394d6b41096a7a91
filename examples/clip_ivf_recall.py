"""IVF against exact search on a real CLIP artifact: recall@10 of `--index ivf` for the stored expressions searched
against every proposal crop (the README's retrieval figure).

    python examples/clip_ivf_recall.py CACHE [--dataset synth] [--model clip-default] [--queries 1000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from refground.cache import RaggedH5
    from refground.retrieval.index import build_index, default_nlist, default_nprobe, recall_at_k, search_index

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--dataset", default="synth")
    ap.add_argument("--model", default="clip-default")
    ap.add_argument("--queries", type=int, default=1000)
    a = ap.parse_args()
    with RaggedH5(a.cache / a.dataset / "clip" / f"{a.model}.h5") as f:
        db = np.ascontiguousarray(f.table("proposals", "embedding"), dtype=np.float32)
        qs = np.ascontiguousarray(f.table("queries", "embedding")[:a.queries], dtype=np.float32)
    for name, kind in (("exact", "flat"), ("ivf", "ivf")):
        t0 = time.perf_counter()
        index = build_index(db, kind, seed=0)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, rows = search_index(index, qs, 10)
        secs = time.perf_counter() - t0
        if kind == "flat":
            exact = rows
        nl = default_nlist(len(db))
        print(f"{name}: {len(db)} vectors, built in {built:.2f} s, {len(qs) / secs:.0f} queries/s"
              + (f", nlist {nl}, nprobe {default_nprobe(nl)}, recall@10 {recall_at_k(rows, exact):.3f}"
                 if kind == "ivf" else ""))


if __name__ == "__main__":
    main()
