"""Benchmark registry: ``refground bench`` runs registered benchmarks and reports measured ratios.

A benchmark is a function ``fn(quick: bool, seed: int) -> list[BenchResult]`` registered with
:func:`register`; one that reads a cached dataset also takes the command's ``dataset`` / ``cache`` / ``queries``
as keywords and is registered ``on_demand`` (run when named, not by a bare ``refground bench``). It measures
our implementation and its baseline side by side in the same run (these machines are noisy), so the ratio is
meaningful even when the absolute figures drift.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from refground.errors import UsageError


@dataclass
class BenchResult:
    """One measured figure. ``ratio`` = how many times better than ``baseline`` (for times: baseline / figure;
    for rates: figure / baseline); None without a baseline."""

    name: str
    figure: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


BenchFn = Callable[[bool, int], list[BenchResult]]
_REGISTRY: dict[str, BenchFn] = {}
_ON_DEMAND: set[str] = set()  # run only when named: they need a cache the user points them at

# Modules that register benchmarks when imported (each issue adds its own).
BENCH_MODULES = (
    "refground.bench.boxes_bench",
    "refground.bench.data_bench",
    "refground.bench.graph_bench",
    "refground.bench.extract_bench",
    "refground.bench.cmrin_bench",
    "refground.bench.vlnms_bench",
    "refground.bench.stages_bench",
    "refground.bench.eval_bench",
    "refground.bench.lts_bench",
    "refground.bench.reir_bench",
    "refground.bench.retrieval_bench",
    "refground.bench.bicm",
)


def register(name: str, on_demand: bool = False) -> Callable[[BenchFn], BenchFn]:
    """Decorator: register ``fn`` under ``name`` (``on_demand``: only run when named)."""

    def deco(fn: BenchFn) -> BenchFn:
        _REGISTRY[name] = fn
        if on_demand:
            _ON_DEMAND.add(name)
        return fn

    return deco


def _load() -> None:
    for mod in BENCH_MODULES:
        importlib.import_module(mod)


def list_benchmarks() -> list[str]:
    """Names of all registered benchmarks."""
    _load()
    return sorted(_REGISTRY)


def run_benchmarks(names: list[str] | None = None, quick: bool = False, seed: int = 0,
                   options: dict[str, object] | None = None) -> list[BenchResult]:
    """Run the named benchmarks (all but the on-demand ones when ``names`` is empty) and return their results in
    order. ``options`` (None values: not given) go to the benchmarks that take them as keywords."""
    _load()
    selected = names or sorted(n for n in _REGISTRY if n not in _ON_DEMAND)
    unknown = [n for n in selected if n not in _REGISTRY]
    if unknown:
        raise UsageError(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(sorted(_REGISTRY))}")
    results: list[BenchResult] = []
    for name in selected:
        fn = _REGISTRY[name]
        takes = inspect.signature(fn).parameters
        results.extend(fn(quick, seed, **{k: v for k, v in (options or {}).items() if k in takes and v is not None}))
    return results


def best_time(fn: Callable[[], object], repeat: int = 5, min_time: float = 0.05) -> float:
    """Best wall time in seconds of ``fn()`` over ``repeat`` rounds (each round loops until ``min_time``)."""
    best = float("inf")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        best = min(best, elapsed / n)
    return best
