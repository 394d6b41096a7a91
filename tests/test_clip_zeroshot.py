"""`refground report clip`: zero-shot figures of a CLIP on a dataset it never saw, checked against slow
per-object / per-query loops on a tiny world with a tiny random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_json
from hf_tiny import make_tiny_clip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from refground.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("zs")
    write_synthetic(root / "synth" / "dataset", "synth", num_images=24, image_size=64, workers=1)
    clip = make_tiny_clip(root / "tinyclip")
    return root, clip


def test_zero_shot_against_loops(world: tuple[Path, Path]) -> None:
    from refground.data.store import load_dataset
    from refground.features.clip_zeroshot import CATEGORY_TEMPLATE, COLOR_TEMPLATES, zero_shot
    from refground.features.detector_train import load_images
    from refground.features.extract import clip_crop
    from refground.features.hf import HFClip

    root, folder = world
    ds = load_dataset(root / "synth" / "dataset")
    clip = HFClip(folder)
    res = zero_shot(ds, clip, "val")
    val = [int(i) for i, s in zip(ds.image_ids, ds.image_splits) if s == "val"]
    cat_text = clip.embed_texts([CATEGORY_TEMPLATE.format(c) for c in ds.categories])
    colors = sorted(set(ds.object_attributes["color"]))
    col_text = clip.embed_texts([t.format(c) for c in colors for t in COLOR_TEMPLATES]).view(len(colors), 3, -1)
    col_text = col_text.mean(1)
    col_text = col_text / col_text.norm(dim=1, keepdim=True)
    right_cat = right_col = total = 0
    region_hits, chances = [], []
    for i, im in zip(val, load_images(ds, val)):
        objs = ds.objects_of(i)
        crops = clip.embed_images([clip_crop(im, np.asarray(o.box)) for o in objs])
        for o, e in zip(objs, crops):
            right_cat += ds.categories[int((cat_text @ e).argmax())] == o.category
            right_col += colors[int((col_text @ e).argmax())] == o.attributes["color"]
            total += 1
        for q in ds.queries("val", "expression"):
            if q.image_id == i:
                qe = clip.embed_texts([q.text])[0]
                region_hits.append(objs[int((crops @ qe).argmax())].id == q.referent_object_id)
                chances.append(1 / len(objs))
    assert res["objects"] == total
    assert res["category"]["accuracy"] == pytest.approx(right_cat / total, abs=1e-9)
    assert res["color"]["accuracy"] == pytest.approx(right_col / total, abs=1e-9)
    q = res["query_to_region"]["all"]
    assert q["count"] == len(region_hits)
    assert q["recall@1"] == pytest.approx(np.mean(region_hits), abs=1e-9)
    assert q["chance"] == pytest.approx(np.mean(chances), abs=1e-9)
    p = res["attention_pointing"]["all"]
    assert p["count"] == len(region_hits) and 0 <= p["weighted"] <= 1 and 0 < p["chance"] < 1
    assert 0 <= res["caption_to_image"]["recall@1"] <= res["caption_to_image"]["recall@10"] <= 1
    assert sum(v["count"] for k, v in res["query_to_region"].items() if k != "all") == q["count"]


def test_pointing_counts_maxima_inside_the_box(monkeypatch: pytest.MonkeyPatch, world: tuple[Path, Path]) -> None:
    """With maps peaked by construction at the referent's centre (or at a far corner), the share is 1 (or 0)."""
    import torch

    from refground.data.store import load_dataset
    from refground.features import clip_zeroshot as Z

    root, _ = world
    ds = load_dataset(root / "synth" / "dataset")
    exprs = ds.queries("val", "expression")[:6]

    def maps(inside: bool):
        def one(images):
            out = []
            for q, im in zip(exprs_now, images):
                m = torch.zeros(im.shape[:2])
                b = ds.object_boxes[ds.object_row(q.referent_object_id)]
                if inside:
                    m[int((b[1] + b[3]) / 2), int((b[0] + b[2]) / 2)] = 1
                else:  # the corner farthest from the box centre
                    cy = 0 if (b[1] + b[3]) / 2 > im.shape[0] / 2 else im.shape[0] - 1
                    cx = 0 if (b[0] + b[2]) / 2 > im.shape[1] / 2 else im.shape[1] - 1
                    m[cy, cx] = 1
                out.append(m)
            return out

        def fn(clip, images, texts):
            return one(images), one(images)
        return fn

    exprs_now = exprs
    assert Z._pointing(ds, None, exprs, maps(True), batch=len(exprs))["all"]["weighted"] == 1.0
    assert Z._pointing(ds, None, exprs, maps(False), batch=len(exprs))["all"]["weighted"] == 0.0


def test_report_clip_cli(world: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from conftest import fail

    root, folder = world
    out = tmp_path / "zs.md"
    js = run_json(capsys, "report", "clip", "--cache", str(root), "--clip", f"hf:{folder}", "--out", str(out),
                  "--split", "train", "--max-images", "3")
    assert js["images"] == 3 and js["clip"]["name"] == f"hf-{folder.name}"
    assert out.is_file() and "zero-shot" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["category"] == js["category"]
    if js["png"]:
        assert Path(js["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    msg = fail(capsys, "report", "clip", "--cache", str(root), "--clip", "builtin")
    assert "refground train clip" in msg
    msg = fail(capsys, "report", "clip", "--cache", str(root), "--clip", f"hf:{folder}", "--max-images", "0")
    assert "--max-images" in msg
