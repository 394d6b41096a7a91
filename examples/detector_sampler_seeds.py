"""Train the built-in detector with the batched RoI sampler and with the per-image loop it replaced, same seed.

The README's detector section compares them (seed 1, one thread: recall@100 99.4 with either): the two draw
their random RoI subsets in a different order, so they differ as two seeds would. The per-image loop is
``refground.bench.stages_bench.reference_sample_rois``, the baseline of ``refground bench quickstart-stages``.

Usage: python examples/detector_sampler_seeds.py CACHE [--seed 1] [--out DIR]
(CACHE holds the default world, e.g. the quickstart's ``cache``; runs go to DIR/{batched,loop}-s<seed>.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("sampler-runs"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from refground.bench.stages_bench import reference_sample_rois
    from refground.data.store import dataset_dir, load_dataset
    from refground.features import detector_train as dt
    from refground.features.detector import DetectorConfig

    ds_dir = dataset_dir("synth", args.cache)
    ds = load_dataset(ds_dir)
    batched = dt.sample_rois
    for name, sampler in (("batched", batched), ("loop", reference_sample_rois)):
        dt.sample_rois = sampler
        try:
            r = dt.train_detector(ds, args.out / f"{name}-s{args.seed}", DetectorConfig(), seed=args.seed,
                                  dataset_dir=ds_dir)
        finally:
            dt.sample_rois = batched
        m = r["metrics"]
        recall = {n: round(100 * v, 1) for n, v in m["referent_recall"].items()}
        print(f"{name}: referent recall {recall}, category {100 * m['category_accuracy']:.1f}, "
              f"{m['mean_proposals']:.1f} proposals per image")


if __name__ == "__main__":
    main()
