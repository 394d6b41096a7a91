"""`refground retrieve` end to end on the fixture dataset with a tiny random CLIP (tests/hf_tiny.py)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import fail, run_json
from test_extract_hf_cli import hf_cache  # noqa: F401 - the fixture: dataset copy and tiny model folders

from refground.cache import RaggedH5
from refground.cli.main import main
from refground.retrieval.index import normalise

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def clip_cache(hf_cache):  # noqa: F811
    """hf_cache with features/hf-detr.h5 (5 DETR proposals per image) and clip/hf-clip.h5 (the tiny CLIP's
    embeddings of images, proposal crops, objects, queries). Returns the cache root."""
    rc = main(["extract", "--cache", str(hf_cache["cache"]), "--detector", f"hf:{hf_cache['detr']}", "--clip",
               f"hf:{hf_cache['clip']}", "--no-dense", "--max-proposals", "5"])
    assert rc == 0
    return hf_cache["cache"]


def _clip_arrays(root, group):
    with RaggedH5(root / "synth" / "clip" / "hf-clip.h5") as f:
        return normalise(f.table(group, "embedding")), f.offsets.get(group), f.table("images", "ids")


def _exact(db, q, k):
    """The obviously-correct reference: every score in float64, a full stable sort."""
    s = db.astype(np.float64) @ q.astype(np.float64)
    order = np.argsort(-s, kind="stable")[:k]
    return order, s[order]


def test_text_search_of_images_matches_brute_force(clip_cache, hf_cache, capsys):  # noqa: F811
    from refground.features.hf import HFClip

    c = str(clip_cache)
    res = run_json(capsys, "retrieve", "the red ball left of a cat", "--cache", c, "--top-k", "5")
    assert res["section"] == "images" and res["clip"] == "hf-clip" and res["query"] == {"text": "the red ball left of a cat"}
    assert res["index"]["status"] == "written" and res["index"]["type"] == "flat" and res["index"]["ntotal"] == 24
    db, _, ids = _clip_arrays(clip_cache, "images")
    q = HFClip(hf_cache["clip"]).embed_texts(["the red ball left of a cat"]).numpy()[0]
    rows, scores = _exact(db, q, 5)
    assert [h["rank"] for h in res["hits"]] == [1, 2, 3, 4, 5]
    assert [h["row"] for h in res["hits"]] == rows.tolist()
    assert [h["image_id"] for h in res["hits"]] == ids[rows].tolist()
    np.testing.assert_allclose([h["score"] for h in res["hits"]], scores, atol=1e-5)
    # Second time: the index is a cache hit; the table names the hits.
    again = run_json(capsys, "retrieve", "the red ball left of a cat", "--cache", c, "--top-k", "5")
    assert again["index"]["status"] == "hit" and again["hits"] == res["hits"]
    assert main(["retrieve", "the red ball left of a cat", "--cache", c, "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "score" in out and str(res["hits"][0]["image_id"]) in out


def test_regions_and_objects_map_back_to_boxes(clip_cache, hf_cache, synth_ds, capsys):  # noqa: F811
    c = str(clip_cache)
    reg = run_json(capsys, "retrieve", "a blue dog", "--regions", "--cache", c, "--top-k", "4")
    with RaggedH5(clip_cache / "synth" / "features" / "hf-detr.h5") as f:
        boxes, offsets = f.table("proposals", "boxes"), f.offsets["proposals"]
        image_ids = f.table("images", "ids")
    assert len(reg["hits"]) == 4
    for h in reg["hits"]:
        img_row = int(np.searchsorted(offsets, h["row"], side="right") - 1)
        assert h["image_id"] == image_ids[img_row] and h["region"] == h["row"] - offsets[img_row]
        np.testing.assert_allclose(h["box"], boxes[h["row"]], atol=0.01)
    obj = run_json(capsys, "retrieve", "a blue dog", "--objects", "--cache", c, "--top-k", "3", "--index", "ivf",
                   "--shards", "2", "--nprobe", "100")
    assert obj["index"]["type"] == "ivf" and obj["index"]["shards"] == 2 and obj["nprobe"] == 100
    db, _, _ = _clip_arrays(clip_cache, "objects")
    for h in obj["hits"]:
        o = synth_ds.object(h["object_id"])
        assert h["image_id"] == o.image_id and h["category"] == o.category
        np.testing.assert_allclose(h["box"], o.box, atol=0.01)
        assert synth_ds.object_ids[h["row"]] == h["object_id"]
    # nprobe >= nlist visits every cell: the IVF search is exact, across both shards.
    from refground.features.hf import HFClip

    q = HFClip(hf_cache["clip"]).embed_texts(["a blue dog"]).numpy()[0]
    rows, _ = _exact(db, q, 3)
    assert [h["row"] for h in obj["hits"]] == rows.tolist()


def test_image_to_query_search_json_and_png(clip_cache, synth_ds, tmp_path, capsys):
    c = str(clip_cache)
    image_id = int(synth_ds.image_ids[3])
    png = tmp_path / "hits.png"
    res = run_json(capsys, "retrieve", "--image", str(image_id), "--cache", c, "--top-k", "6", "--out", str(png))
    assert res["section"] == "queries" and res["query"] == {"image_id": image_id} and res["png"] == str(png)
    db, _, _ = _clip_arrays(clip_cache, "queries")
    img, _, _ = _clip_arrays(clip_cache, "images")
    rows, _ = _exact(db, img[3], 6)
    assert [h["row"] for h in res["hits"]] == rows.tolist()
    with h5py.File(clip_cache / "synth" / "clip" / "hf-clip.h5", "r") as f:
        qids = f["queries/ids"][()]
    for h in res["hits"]:
        assert h["query_id"] == qids[h["row"]] and h["text"] == synth_ds.query(h["query_id"]).text
        assert h["image_id"] == synth_ds.query(h["query_id"]).image_id
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 160 * 5 and im.height > 2 * 160  # the query tile + 6 hits: two rows of tiles
    # A region search writes boxes into the strip: the PNG differs from a plain image search's.
    png2 = tmp_path / "regions.png"
    assert main(["retrieve", "a cat", "--regions", "--cache", c, "--top-k", "2", "--out", str(png2)]) == 0
    capsys.readouterr()
    assert png2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_only_and_cache_listing(clip_cache, capsys):
    c = str(clip_cache)
    built = run_json(capsys, "retrieve", "--build", "--queries", "--index", "ivf", "--seed", "3", "--cache", c)
    assert built["section"] == "queries" and built["status"] in ("written", "hit") and built["type"] == "ivf"
    again = run_json(capsys, "retrieve", "--build", "--queries", "--index", "ivf", "--seed", "3", "--cache", c)
    assert again["status"] == "hit" and again["fingerprint"] == built["fingerprint"]
    other = run_json(capsys, "retrieve", "--build", "--queries", "--index", "ivf", "--seed", "4", "--cache", c)
    assert other["status"] == "written" and other["fingerprint"] != built["fingerprint"]
    ls = run_json(capsys, "cache", "verify", "--cache", c)
    entries = [e for e in ls["entries"] if e["kind"] == "index/hf-clip"]
    assert ls["ok"] and entries and all(e["status"] == "complete" for e in entries), ls
    assert "queries-ivf" in {e["name"] for e in entries}


def test_hostile_inputs_are_one_line_errors(clip_cache, tmp_path, capsys):
    c = str(clip_cache)
    for args, msg in (
        (["", "--cache", c], "query text is empty"),
        (["   ", "--cache", c], "query text is empty"),
        (["--image", "987654", "--cache", c], "unknown image id"),
        (["x", "--top-k", "0", "--cache", c], "--top-k must be at least 1"),
        (["x", "--shards", "0", "--cache", c], "--shards must be at least 1"),
        (["x", "--shards", "25", "--cache", c], "more shards than the 24 vectors"),
        (["x", "--nprobe", "0", "--index", "ivf", "--cache", c], "--nprobe must be at least 1"),
        (["x", "--nlist", "3", "--cache", c], "--nlist applies to --index ivf only"),
        (["x", "--index", "hnsw", "--cache", c], "--index must be one of flat, ivf"),
        (["x", "--clip", "nope", "--cache", c], "no such CLIP artifact"),
        (["x", "--images", "--regions", "--cache", c], "choose one of"),
        (["--cache", c], "give a query text or --image ID"),
        (["x", "--image", "1", "--cache", c], "give a query text or --image ID"),
        (["x", "--build", "--cache", c], "--build builds the index only"),
        (["x", "--out", str(tmp_path / "x.txt"), "--cache", c], "must end in .png"),
        (["x", "--cache", str(tmp_path / "empty")], "no CLIP artifact"),
        (["x", "--threads", "0", "--cache", c], "--threads 0"),
    ):
        err = fail(capsys, "retrieve", *args)
        assert msg in err, (args, err)
    notpng = tmp_path / "notes.png"
    notpng.write_text("my notes")
    assert "is not an output of this command" in fail(capsys, "retrieve", "x", "--out", str(notpng), "--cache", c)
    assert notpng.read_text() == "my notes"
    # Texts the tokenizer must cope with: far longer than its 16 positions, and outside its tiny vocabulary.
    for text in ("the red ball " * 300, "ünïcödé ☃ 🐈 \t  left\nof"):
        res = run_json(capsys, "retrieve", text, "--cache", c, "--top-k", "2")
        assert len(res["hits"]) == 2 and res["query"]["text"] == text.strip()


def test_several_clip_artifacts_need_a_choice(clip_cache, tmp_path, capsys):
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(clip_cache / "synth" / "dataset", root / "synth" / "dataset")
    shutil.copytree(clip_cache / "synth" / "features", root / "synth" / "features")
    shutil.copytree(clip_cache / "synth" / "clip", root / "synth" / "clip")
    for suffix in (".h5", ".h5.manifest.json"):
        shutil.copy(root / "synth" / "clip" / f"hf-clip{suffix}", root / "synth" / "clip" / f"other{suffix}")
    err = fail(capsys, "retrieve", "--image", "1", "--cache", str(root))
    assert "2 CLIP artifacts (hf-clip, other)" in err and "--clip MODEL" in err
    res = run_json(capsys, "retrieve", "--image", "1", "--clip", "other", "--cache", str(root), "--top-k", "2")
    assert res["clip"] == "other" and len(res["hits"]) == 2
    json.dumps(res)
