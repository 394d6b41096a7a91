"""`refground quickstart` end to end on a tiny world (the same chain as the main job, small settings)."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_CMRIN
from refground.methods.cmrin.model import CMRINConfig
from refground.quickstart import run_quickstart
from refground.tables import EVAL_SPLITS as SPLITS
from test_detector import tiny_config


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_quickstart_chain_report_and_second_run_hits(tmp_path):
    kw = dict(images=24, image_size=128, detector_config=tiny_config(epochs=1),
              cmrin_config=CMRINConfig(**TINY_CMRIN), figures=1, top_n=5)
    messages: list[str] = []
    res = run_quickstart(tmp_path, on_step=messages.append, **kw)
    assert [s["step"].split()[1] for s in res["steps"][:5]] == ["data", "train", "extract", "graph", "train"]
    assert len(messages) == len(res["steps"]) == 7
    assert all(s["status"] not in ("hit",) for s in res["steps"][:5])
    for split in SPLITS:
        assert 0 <= res["precision"][split]["all"] <= 1
        assert 0 <= res["proposals"][split]["all"] <= 1
    report = (tmp_path / "synth" / "report" / "quickstart.md").read_text()
    assert "| testB |" in report and "drop (points)" in report
    p = f"{100 * res['precision']['testB']['all']:.1f}"
    assert f"| testB | {p} |" in report
    assert len(res["figures"]) == 2 and all(open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for f in res["figures"])
    again = run_quickstart(tmp_path, **kw)
    assert [s["status"] for s in again["steps"][:5]] == ["hit"] * 5
    assert again["precision"] == res["precision"] and again["proposals"] == res["proposals"]
    json.dumps(again)  # the --json output is plain JSON
