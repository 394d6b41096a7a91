#!/usr/bin/env python
"""Kill -9 during epoch 2, resume, compare: is a resumed CMRIN run byte-identical to an uninterrupted one?

On the default world (what `refground quickstart` builds: `refground data synth`, `train detector`,
`extract --no-dense`, `graph`; each step a cache hit when already done) this trains `refground train cmrin`
with the default config once without interruption (run ``kr-straight``), then three times into a fresh run
``kr-kill-<K>``: it waits for epoch 1's checkpoint, sleeps a fraction of an epoch (default 0.2, 0.5 and 0.8 of
the seconds its own epoch 1 took), sends SIGKILL, reruns the same command to completion (it resumes
after epoch 1) and compares model.pt and the last checkpoint's weights with the uninterrupted run's, byte
for byte. Prints a table; exits 1 if any run differs.

With ``--nproc N`` (N > 1) every training runs under ``torchrun --standalone --nproc-per-node N`` (distributed
data parallel, gloo), the runs are named ``kr<N>-straight`` and ``kr<N>-kill-<K>``, and SIGKILL goes to the
whole process group (torchrun and its N workers), as a killed job on a cluster would die.

Usage::

    python examples/kill_resume.py [--cache cache] [--epochs N] [--fractions 0.2,0.5,0.8] [--keep-straight]
                                   [--no-setup] [--nproc N]

``--epochs`` overrides only the number of epochs (the default config trains 10, about 1.5 to 3 minutes each on
a shared 2-core machine; the script trains 4 times plus the killed parts, so ``--epochs 3`` takes about
20 minutes). Logs go to
``<cache>/synth/report/kill_resume/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def refground(nproc: int = 1) -> list[str]:
    """The CLI of the interpreter running this script (its venv's console script), else ``refground``; under
    torchrun with ``--nproc`` above 1 (``--`` keeps torchrun from reading refground's ``--run`` as its own)."""
    exe = Path(sys.executable).parent / "refground"
    cli = [str(exe)] if exe.is_file() else ["refground"]
    if nproc <= 1:
        return cli
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun) if torchrun.is_file() else "torchrun", "--standalone", "--nproc-per-node", str(nproc),
            "--no-python", "--", *cli]


def run(args: list[str], log: Path, nproc: int = 1) -> dict:
    """Run ``refground ARGS --json`` to completion (under torchrun with ``nproc`` above 1); its JSON summary
    (stderr to ``log``)."""
    with open(log, "w") as err:
        out = subprocess.run(refground(nproc) + args + ["--json"], stdout=subprocess.PIPE, stderr=err, text=True)
    if out.returncode != 0:
        sys.exit(f"refground {' '.join(args)} failed with exit code {out.returncode}; see {log}")
    return json.loads(out.stdout)


def torchrun_workers(proc: subprocess.Popen) -> list[int]:
    """The pids of ``proc``'s child processes (torchrun's workers), from /proc (Linux)."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == proc.pid:
            workers.append(int(stat.parent.name))
    return workers


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` (started with ``start_new_session``: its whole group) and, under torchrun, its workers:
    torchrun starts each worker in a session of its own, so killing torchrun alone leaves them training (and
    holding the run's lock)."""
    for pid in torchrun_workers(proc):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended on its own meanwhile
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        proc.kill()


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def same_weights(a: Path, b: Path) -> bool:
    """Whether the last epoch's weights in two checkpoints are equal (model.pt holds the best epoch's)."""
    import torch

    from refground.train import load_weights

    wa, wb = load_weights(a)["model"], load_weights(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="cache", help="cache root (default ./cache)")
    ap.add_argument("--epochs", type=int, default=None, help="CMRIN epochs (default: the config's, 10)")
    ap.add_argument("--fractions", default="0.2,0.5,0.8", help="kill points, as fractions of an epoch's seconds")
    ap.add_argument("--keep-straight", action="store_true", help="reuse a complete uninterrupted run kr-straight "
                    "of the same settings (a cache hit) instead of retraining it")
    ap.add_argument("--no-setup", action="store_true", help="skip the world's steps (the cache has features and "
                    "graphs already, e.g. a small test world)")
    ap.add_argument("--nproc", type=int, default=1, help="processes per training (torchrun; default 1: plain)")
    opts = ap.parse_args()
    nproc = max(1, opts.nproc)
    prefix = "kr" if nproc == 1 else f"kr{nproc}"
    cache = Path(opts.cache)
    fractions = [float(f) for f in opts.fractions.split(",") if f.strip()]
    logs = cache / "synth" / "report" / "kill_resume"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--cache", str(cache)]
    t0 = time.perf_counter()
    for step in ([] if opts.no_setup else (["data", "synth"], ["train", "detector"], ["extract", "--no-dense"],
                                           ["graph"])):
        run(step + common, logs / f"{'-'.join(step)}.log")
    train = ["train", "cmrin", *common] + (["--epochs", str(opts.epochs)] if opts.epochs else [])
    runs = cache / "synth" / "runs" / "cmrin"

    ref = runs / f"{prefix}-straight"
    if not opts.keep_straight:
        shutil.rmtree(ref, ignore_errors=True)
    t = time.perf_counter()
    straight = run(train + ["--run", ref.name], logs / f"{ref.name}.log", nproc)
    straight_s = time.perf_counter() - t
    if straight.get("cache_hit"):
        print(f"{ref.name}: reused (cache hit; --keep-straight)")
    elif straight.get("resumed_from"):
        sys.exit(f"{ref.name} resumed an interrupted run: not a reference; rerun without --keep-straight")
    ref_epochs = json.loads((ref / "curve.json").read_text())["epochs"]
    epoch_s = min(e["seconds"] for e in ref_epochs)  # a fallback for the kill points below
    val = 100 * straight["metrics"].get("precision@1", float("nan"))
    print(f"uninterrupted ({nproc} process{'es' if nproc > 1 else ''}): {straight_s:.0f} s wall, val Precision@1 "
          f"{val:.1f}, for {len(ref_epochs)} epochs (epoch seconds {', '.join(str(e['seconds']) for e in ref_epochs)}); "
          f"best epoch {straight['metrics'].get('best_epoch')}", flush=True)

    rows = []
    for k, frac in enumerate(fractions, 1):
        name = f"{prefix}-kill-{k}"
        folder = runs / name
        shutil.rmtree(folder, ignore_errors=True)
        with open(logs / f"{name}.killed.log", "w") as err:
            proc = subprocess.Popen(refground(nproc) + train + ["--run", name], stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            while not (folder / "checkpoint.pt").is_file():  # epoch 1 done (a fresh folder has none before)
                if proc.poll() is not None:
                    sys.exit(f"{name} ended before its first checkpoint; see {logs / f'{name}.killed.log'}")
                time.sleep(0.02)
            seen = time.perf_counter()
            # This run's own epoch 1 (its curve is written just before the checkpoint) is the best estimate of
            # how long its epoch 2 takes on a shared machine; the reference run's shortest epoch if unreadable.
            try:
                own_s = json.loads((folder / "curve.json").read_text())["epochs"][0]["seconds"]
            except (OSError, ValueError, KeyError, IndexError):
                own_s = epoch_s
            time.sleep(max(0.0, frac * own_s - (time.perf_counter() - seen)))
            kill_tree(proc)
            proc.wait()
            killed_after = time.perf_counter() - seen
        curve = json.loads((folder / "curve.json").read_text())
        done = max((e["epoch"] for e in curve["epochs"]), default=0)
        res = run(train + ["--run", name], logs / f"{name}.resumed.log", nproc)
        rows.append({"run": name, "kill_s_into_epoch2": round(killed_after, 2), "fraction": frac,
                     "epochs_done_at_kill": done, "resumed_from": res.get("resumed_from"),
                     "model_pt_identical": same_bytes(folder / "model.pt", ref / "model.pt"),
                     "last_weights_identical": same_weights(folder / "checkpoint.pt", ref / "checkpoint.pt"),
                     "metrics_identical": res["metrics"] == straight["metrics"]})
        print(json.dumps(rows[-1]), flush=True)

    head = ["run", "killed (s into epoch 2)", "epochs done", "resumed from", "model.pt cmp", "last weights",
            "val metrics"]
    table = [[r["run"], f"{r['kill_s_into_epoch2']} ({r['fraction']:.0%})", str(r["epochs_done_at_kill"]),
              str(r["resumed_from"]), "identical" if r["model_pt_identical"] else "DIFFER",
              "identical" if r["last_weights_identical"] else "DIFFER",
              "identical" if r["metrics_identical"] else "DIFFER"] for r in rows]
    widths = [max([len(h), *(len(row[i]) for row in table)]) for i, h in enumerate(head)]
    print()
    for row in [head, ["-" * w for w in widths], *table]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; logs in {logs}")
    ok = all(r["model_pt_identical"] and r["last_weights_identical"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
