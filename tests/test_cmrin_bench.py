"""The CMRIN benchmarks run in quick mode, report sane figures, and refuse to measure broken code."""

from __future__ import annotations

import math

import pytest
import torch

from refground.bench import cmrin_bench as cb
from refground.methods.cmrin.model import GatedGraphConv


@pytest.fixture(autouse=True)
def _small(monkeypatch):
    """One thread, random inputs (no cache), and smaller batches than the benchmark's so the test stays fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("REFGROUND_CACHE", raising=False)
    monkeypatch.setattr(cb, "TRAIN_BATCH", 16)
    monkeypatch.setattr(cb, "INFER_BATCH", 48)
    yield
    torch.set_num_threads(threads)


def test_quick_benchmarks_report_sane_figures():
    results = cb.bench_cmrin_train(True, 0) + cb.bench_cmrin_infer(True, 0) + cb.bench_ggcn(True, 0)
    assert [(r.name, r.unit) for r in results] == [("cmrin_train", "queries/s"), ("cmrin_infer", "ms/query"),
                                                   ("ggcn", "ms")]
    for r in results:
        assert math.isfinite(r.figure) and r.figure > 0, r
        assert r.note
    train, infer, ggcn = results
    assert train.baseline is None and train.ratio is None
    assert "s per epoch" in train.note and "random inputs" in train.note
    for r in (infer, ggcn):
        assert r.baseline > 0 and r.ratio == pytest.approx(r.baseline / r.figure)


def test_reference_matches_conv_including_degenerate_graphs():
    torch.manual_seed(0)
    conv = GatedGraphConv(6, 5)
    with torch.no_grad():
        conv.edge_bias.normal_()
    x, rel, pv, pe = cb.ggcn_inputs(4, 20, 6, seed=1)
    rel[1] = 0            # no edges at all: only the self term
    pv[2] = 0.0           # closed vertex gates: only the edge biases reach the neighbours
    rel[3, 0, 1] = 11     # the last edge type
    with torch.no_grad():
        torch.testing.assert_close(conv(x, rel, pv, pe), cb.gated_graph_conv_reference(conv, x, rel, pv, pe),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cb.gated_graph_conv_reference(conv, x[1:2], rel[1:2], pv[1:2], pe[1:2]),
                                   torch.relu(conv.w_self(x[1:2])))


def test_benchmarks_raise_on_wrong_results(monkeypatch):
    real = GatedGraphConv.forward
    monkeypatch.setattr(GatedGraphConv, "forward", lambda self, x, *a: real(self, x, *a) * 1.01)
    with pytest.raises(RuntimeError, match="ggcn"):
        cb.bench_ggcn(True, 0)

    def batch_dependent(self, x, relations, vertex_gates, edge_gates):
        # wrong only when several queries share a forward, like a padding bug would be
        return real(self, x, relations, vertex_gates, edge_gates) * (1.0 if x.shape[0] == 1 else 1.5)

    monkeypatch.setattr(GatedGraphConv, "forward", batch_dependent)
    with pytest.raises(RuntimeError, match="cmrin_infer"):
        cb.bench_cmrin_infer(True, 0)
