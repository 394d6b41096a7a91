"""refground.threads: the thread count the heavy commands choose, and `--threads`."""

from __future__ import annotations

import os

import pytest
import torch

from refground import threads as T
from refground.errors import UsageError


def test_parse_threads_takes_auto_or_a_positive_count():
    assert T.parse_threads(None) == "auto" and T.parse_threads("auto") == "auto"
    assert T.parse_threads("3") == 3 and T.parse_threads(1) == 1
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(UsageError, match="--threads"):
            T.parse_threads(bad)


def test_use_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with T.use_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with T.use_threads(None) as n:  # None leaves the count alone
        assert n == before


def test_auto_threads_counts_idle_available_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(T, "available_cores", lambda: 4)
    for idle, expected in ((3.8, 4), (2.4, 2), (1.6, 2), (0.3, 1), (9.0, 4)):
        monkeypatch.setattr(T, "idle_cores", lambda seconds=0.2, v=idle: v)
        assert T.auto_threads() == expected
    monkeypatch.setattr(T, "idle_cores", lambda seconds=0.2: None)
    assert T.auto_threads() is None  # no /proc/stat: torch's own default


def test_auto_threads_leaves_torchrun_and_omp_num_threads_alone(monkeypatch):
    monkeypatch.setattr(T, "idle_cores", lambda seconds=0.2: 2.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert T.auto_threads() is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert T.auto_threads() is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_idle_cores_is_a_share_of_the_machine():
    idle = T.idle_cores(0.05)
    assert idle is not None and 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6


def test_threads_option_is_checked_before_any_work(tmp_path, capsys):
    from conftest import fail

    out = fail(capsys, "train", "cmrin", "--cache", str(tmp_path), "--threads", "0")
    assert "--threads 0" in out
