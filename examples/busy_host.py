"""Time a CMRIN training step alone and beside a CPU-bound process, for several thread settings.

The README's "Time" section ("A busy host") comes from this script: a default CMRIN training step (and a tiny
config's) on random inputs shaped like the default world, each setting in a fresh process (OpenMP reads its
environment once), first on a quiet machine, then beside ``python -c "while True: pass"``.

Usage: python examples/busy_host.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SETTINGS = {  # name -> (environment additions, torch threads or None)
    "2 threads, default wait": ({}, None),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "2 threads, GOMP_SPINCOUNT=2000": ({"GOMP_SPINCOUNT": "2000"}, None),
    "1 thread": ({}, 1),
}

STEP = r"""
import sys, time, torch, numpy as np
threads = int(sys.argv[1]) if sys.argv[1] != "-" else None
steps = int(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
from refground.bench.cmrin_bench import _world
from refground.grounding.candidates import make_batch
from refground.methods.cmrin.model import CMRIN, triplet_loss
cands, tq, _, model, _ = _world(64 * 40, 10, 0)
tiny = dict(embed_dim=16, hidden_dim=16, type_dim=16, edge_type_dim=16, attention_dim=16, graph_dim=16,
            spatial_dim=8, match_dim=16)
out = []
for cfg, n in ((None, steps), (tiny, 3 * steps)):
    if cfg:
        torch.manual_seed(0)
        model = CMRIN(model.config.__class__(**{**model.config.to_dict(), **cfg}))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for k in range(n):
        rows = np.arange(k * 64 % 2500, k * 64 % 2500 + 64)
        b = make_batch(tq, cands, rows)
        loss = triplet_loss(model(**b.inputs())["scores"], b.targets, 0.1, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.append((time.perf_counter() - t) / n * 1000)
print(f"{out[0]:.0f} {out[1]:.1f}")
"""


def run(env: dict[str, str], threads: int | None, steps: int) -> tuple[float, float]:
    """(ms per default step, ms per tiny step) in a fresh process with ``env`` added."""
    proc = subprocess.run([sys.executable, "-c", STEP, str(threads or "-"), str(steps)], env={**os.environ, **env},
                          capture_output=True, text=True, check=True)
    default, tiny = proc.stdout.split()[-2:]
    return float(default), float(tiny)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps timed per setting (tiny: 3x)")
    args = parser.parse_args()
    rows = {name: [run(env, t, args.steps)] for name, (env, t) in SETTINGS.items()}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        for name, (env, t) in SETTINGS.items():
            rows[name].append(run(env, t, args.steps))
    finally:
        busy.kill()
    print(f"{'setting':36s} {'alone ms (tiny)':>18s} {'busy ms (tiny)':>18s}")
    for name, ((a, at), (b, bt)) in rows.items():
        print(f"{name:36s} {a:>10.0f} ({at:>5.1f}) {b:>10.0f} ({bt:>5.1f})")


if __name__ == "__main__":
    main()
