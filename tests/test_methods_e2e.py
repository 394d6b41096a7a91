"""Every registered method, end to end through the CLI on a 60-image world: pseudo ground truth (where it has
one), train (tiny config), predict + eval, show and report. Parametrised over the registry, so a new method
gets this test for free once it has a tiny config in TINY below."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY_CMRIN, run_json
from refground.cli.main import main
from refground.methods import list_methods

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {
    "cmrin": TINY_CMRIN,
    "vlnms": {"word_dim": 8, "gru_hidden": 8, "mlp_dim": 8, "attention_dim": 4, "trans_dim": 8, "trans_heads": 2,
              "trans_layers": 1, "trans_ff": 8, "epochs": 2, "batch_size": 16, "lr": 2e-3},
    "lts": {"word_dim": 8, "gru_dim": 8, "fusion_dim": 8, "level_dim": 4, "aspp_dim": 4, "epochs": 1,
            "batch_size": 16, "lr_decay_epochs": 1},
    "reir": {"word_dim": 8, "dim": 16, "hidden_dim": 16, "decoder_dim": 16, "epochs": 1, "batch_size": 16,
             "lr_decay_epochs": 1},
    # KAM on a tiny random CLIP's 8-d embeddings; Thr_k below every fused score (that CLIP's scores are not CLIP's)
    "bicm": {"hidden": 8, "batch_size": 4, "epochs": 2, "thr_k": -1e9},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A 60-image world with a tiny detector, its features (with the pre-NMS detections), dense maps and graphs, a
    tiny CMRIN run named "cmrin" (the second stage that proposal methods report with) and the CLIP embeddings of a
    tiny random CLIP (what BiCM reads)."""
    import torch

    from refground.data.store import dataset_dir, load_dataset
    from refground.data.synth import write_synthetic
    from refground.features.detector_train import train_detector
    from refground.features.pipeline import extract_dataset
    from refground.graph_artifact import build_graphs
    from refground.methods.cmrin.model import CMRINConfig
    from refground.methods.cmrin.run import train_cmrin
    from test_detector import tiny_config

    root = tmp_path_factory.mktemp("e2e") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_synthetic(dataset_dir("synth", root), name="synth", num_images=60, seed=0, image_size=128, workers=1)
        ds = load_dataset(dataset_dir("synth", root))
        train_detector(ds, root / "synth" / "runs" / "detector" / "default", tiny_config(epochs=1), seed=0,
                       dataset_dir=dataset_dir("synth", root), evaluate=False)
        from hf_tiny import make_tiny_clip

        clip = make_tiny_clip(tmp_path_factory.mktemp("e2e-clip") / "clip")
        extract_dataset("synth", root, dense=True, max_proposals=20, detections=0.05, clip=f"hf:{clip}")
        build_graphs("synth", root)
        extract_dataset("synth", root, first_stage=True)  # ReIR's first-stage proposals (detector-default-rpn)
        train_cmrin("synth", root, "cmrin", CMRINConfig(**TINY_CMRIN), seed=0)
    finally:
        torch.set_num_threads(threads)
    return root


def test_every_method_has_a_tiny_config():
    assert {m.name for m in list_methods("train")} <= set(TINY)


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_method_end_to_end(name, world, tmp_path, capsys):
    from refground.methods import get_method

    m = get_method(name)
    cache = tmp_path / "cache"
    shutil.copytree(world, cache)
    c = ("--cache", str(cache))
    if m.pseudo:
        res = run_json(capsys, "pseudo", name, *c)
        assert res["status"] == "written" and Path(res["path"]).is_file()
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY[name]))
    trained = run_json(capsys, "train", name, "--run", "t", "--config", str(cfg), *c)
    assert trained["cache_hit"] is False and Path(trained["run"]).name == "t"
    run_folder = Path(trained["run"])
    assert (run_folder / "model.pt").is_file() and (run_folder / "metrics.json").is_file()
    assert run_json(capsys, "train", name, "--run", "t", "--config", str(cfg), *c)["cache_hit"] is True
    ev = run_json(capsys, "eval", "--method", name, "--run", "t", "--split", "val", *c)
    section = {"comprehension": "comprehension", "segmentation": "segmentation",
               "phrase grounding": "phrase_grounding"}.get(m.task, "proposals")
    assert ev["counts"]["predictions_in_split"] > 0 and section in ev
    png = tmp_path / "show.png"
    assert main(["show", "--method", name, "--run", "t", "--split", "val", "--out", str(png), *c]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_args = {"cmrin": ["--runs", "t"], "vlnms": ["--runs", "t", "--timing-images", "2"],
                   "lts": ["--runs", "t", "--splits", "val"], "reir": ["--runs", "t", "--splits", "val"]
                   }.get(name, [])
    rep = run_json(capsys, "report", name, *report_args, "--out", str(tmp_path / "r.md"), *c)
    assert (tmp_path / "r.md").is_file() and rep
