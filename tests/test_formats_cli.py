"""`refground data import-refcoco | import-referit | import-flickr30k | export` through the CLI entry point:
happy paths, and every bad input as one error line, exit code 2 and no dataset folder left behind."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from refground import masks
from refground.cli.main import main
from refground.data.model import Dataset, Image, Mention, Object, Query
from refground.data.store import load_named, save_dataset


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def tiny() -> Dataset:
    m = np.zeros((20, 30), bool)
    m[2:8, 3:9] = True
    images = [Image(1, "one.png", 30, 20, "train"), Image(2, "two.png", 16, 16, "testA")]
    objects = [Object(11, 1, "circle", (3.0, 2.0, 9.0, 8.0), masks.encode(m), {"color": "red"}),
               Object(12, 1, "square", (10.0, 10.0, 30.0, 20.0)),
               Object(21, 2, "circle", (0.0, 0.0, 4.0, 4.0))]
    queries = [
        Query(1, 1, "expression", "red circle", (Mention(0, 2, "referent", (11,), "circle"),), (), "attribute",
              "train", 0, "Red circle"),
        Query(2, 1, "expression", "the circle", (Mention(0, 2, "referent", (11,), "circle"),), (), "category",
              "train", 0, "the circle"),
        Query(3, 2, "expression", "circle", (Mention(0, 1, "referent", (21,), "circle"),), (), "category", "testA", 1),
        Query(4, 1, "caption", "a circle and a square", (Mention(0, 2, "referent", (11,), "circle"),
                                                         Mention(3, 5, "referent", (12,), "square")), (), "caption",
              "train"),
        Query(5, 2, "caption", "a circle", (Mention(0, 2, "referent", (21,), "circle"),), (), "caption", "testA"),
    ]
    return Dataset.from_records("tiny", images, objects, queries)


@pytest.fixture()
def cache(tmp_path) -> Path:
    """A cache holding dataset "tiny" with its two image files."""
    root = tmp_path / "cache"
    d = root / "tiny" / "dataset"
    save_dataset(tiny(), d)
    (d / "images").mkdir()
    (d / "images" / "one.png").write_bytes(b"1")
    (d / "images" / "two.png").write_bytes(b"2")
    return root


@pytest.fixture()
def refer_root(tmp_path, cache, capsys) -> Path:
    """refer files (dataset folders refcoco and refclef) exported from "tiny"."""
    out = tmp_path / "refer"
    for name, split_by in (("refcoco", "unc"), ("refclef", "berkeley")):
        assert main(["data", "export", "-d", "tiny", "--format", "refer", "--out-dir", str(out), "--corpus", name,
                     "--split-by", split_by, "--cache", str(cache)]) == 0
    capsys.readouterr()
    return out


@pytest.fixture()
def flickr_root(tmp_path, cache, capsys) -> Path:
    out = tmp_path / "flickr"
    assert main(["data", "export", "-d", "tiny", "--format", "flickr30k", "--out-dir", str(out), "--cache",
                 str(cache)]) == 0
    capsys.readouterr()
    return out


def test_export_then_import_refcoco(capsys, tmp_path, cache, refer_root):
    assert (refer_root / "images" / "one.png").read_bytes() == b"1"
    code, out, err = run(capsys, "data", "import-refcoco", "--root", refer_root, "--corpus", "refcoco",
                         "--split-by", "unc", "--images", refer_root / "images", "--cache", cache, "--dataset", "tiny2")
    assert code == 0, err
    dest = cache / "tiny2" / "dataset"
    assert out.strip().splitlines() == [f"imported tiny2: 2 images, 3 objects, 3 queries -> {dest}"]
    back = load_named("tiny2", cache)
    ds = tiny()
    assert back.images() == ds.images() and back.objects() == ds.objects()
    assert back.queries() == ds.queries(task="expression")
    assert back.meta["image_root"] == str((refer_root / "images").resolve())
    # The same inputs again: skipped; --force imports again; --json is one object on stdout.
    code, out, err = run(capsys, "data", "import-refcoco", "--root", refer_root, "--images", refer_root / "images",
                         "--cache", cache, "--dataset", "tiny2", "--json")
    assert code == 0 and json.loads(out)["skipped"] is True and "skipping" in err
    result = json.loads(out)
    assert (result["images"], result["objects"], result["queries"], result["expressions"]) == (2, 3, 3, 3)
    code, out, _ = run(capsys, "data", "import-refcoco", "--root", refer_root, "--images", refer_root / "images",
                       "--cache", cache, "--dataset", "tiny2", "--json", "--force")
    assert code == 0 and json.loads(out)["skipped"] is False


def test_import_referit_default_name(capsys, cache, refer_root):
    code, out, err = run(capsys, "data", "import-referit", "--root", refer_root, "--split-by", "berkeley",
                         "--images", refer_root / "images", "--cache", cache)
    assert code == 0, err
    assert out.startswith("imported refclef_berkeley: 2 images, 3 objects, 3 queries")
    assert load_named("refclef_berkeley", cache).query(1).raw == "Red circle"


def test_export_then_import_flickr30k(capsys, tmp_path, cache, flickr_root):
    assert (flickr_root / "flickr30k_images" / "two.png").read_bytes() == b"2"
    code, out, err = run(capsys, "data", "import-flickr30k", "--root", flickr_root, "--images",
                         flickr_root / "flickr30k_images", "--cache", cache, "--dataset", "exact")
    assert code == 0, err
    ds = tiny()
    assert load_named("exact", cache).queries() == ds.queries(task="caption")  # the sidecar restores everything
    assert load_named("exact", cache).objects() == ds.objects()
    code, out, err = run(capsys, "data", "import-flickr30k", "--root", flickr_root, "--images",
                         flickr_root / "flickr30k_images", "--cache", cache, "--json", "--ignore-sidecar")
    assert code == 0, err
    result = json.loads(out)
    assert (result["dataset"], result["images"], result["objects"], result["captions"]) == ("flickr30k", 2, 3, 2)
    back = load_named("flickr30k", cache)
    assert [q.text for q in back.queries()] == ["a circle and a square", "a circle"]
    assert [q.split for q in back.queries()] == ["train", "test"]
    assert sorted(back.object_boxes.tolist()) == sorted(tiny().object_boxes.tolist())


def test_export_notes_and_json(capsys, tmp_path, cache):
    code, out, err = run(capsys, "data", "export", "-d", "tiny", "--format", "refer", "--out-dir", tmp_path / "x",
                         "--cache", cache)
    assert code == 0 and "2 caption queries skipped" in err
    assert out.strip() == ("exported tiny as refer: 2 images, 3 objects, 2 refs, 3 sentences, 2 image files -> "
                           f"{tmp_path / 'x' / 'tiny'}")
    code, out, _ = run(capsys, "data", "export", "-d", "tiny", "--format", "flickr30k", "--out-dir", tmp_path / "y",
                       "--cache", cache, "--json")
    assert code == 0 and json.loads(out)["skipped_expressions"] == 3


def _assert_error(capsys, args, cache: Path, name: str, *parts: str) -> None:
    code, out, err = run(capsys, *args, "--cache", cache, "--dataset", name)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for p in parts:
        assert p in lines[0], (p, lines[0])
    assert not (cache / name).exists()


def _refcoco_args(root: Path, split_by: str = "unc") -> list:
    return ["data", "import-refcoco", "--root", root, "--corpus", "refcoco", "--split-by", split_by, "--images", root]


def test_refer_bad_inputs(capsys, tmp_path, cache, refer_root):
    folder = refer_root / "refcoco"
    _assert_error(capsys, _refcoco_args(tmp_path / "missing"), cache, "r1", str(tmp_path / "missing"),
                  "refer data root not found")
    _assert_error(capsys, _refcoco_args(refer_root, "google"), cache, "r2", "unknown split-by 'google' for refcoco",
                  "expected one of: unc")
    _assert_error(capsys, ["data", "import-refcoco", "--root", refer_root, "--corpus", "refclef", "--images",
                           refer_root], cache, "r3", "unknown dataset 'refclef'", "refcoco+")

    refs_path = folder / "refs(unc).p"
    refs_bytes = refs_path.read_bytes()
    refs_path.rename(folder / "moved.p")
    _assert_error(capsys, _refcoco_args(refer_root), cache, "r4", f"refs(unc).p not found in {folder}")
    (folder / "moved.p").rename(refs_path)

    inst_path = folder / "instances.json"
    inst_text = inst_path.read_text()
    inst_path.write_text(inst_text[:-10])
    _assert_error(capsys, _refcoco_args(refer_root), cache, "r5", str(inst_path), "malformed JSON")

    inst = json.loads(inst_text)
    inst["annotations"][1]["bbox"] = [10.0, 10.0, 40.0, 10.0]
    inst_path.write_text(json.dumps(inst))
    _assert_error(capsys, _refcoco_args(refer_root), cache, "r6", str(inst_path), "annotation 12",
                  "lies outside the 30x20 image", "--skip-invalid")
    code, out, _ = run(capsys, *_refcoco_args(refer_root), "--cache", cache, "--dataset", "r6", "--skip-invalid")
    assert code == 0 and "(1 objects dropped/clipped)" in out
    inst_path.write_text(inst_text)

    refs = pickle.loads(refs_bytes)
    refs[0]["sentences"][1]["tokens"] = []
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    _assert_error(capsys, _refcoco_args(refer_root), cache, "r7", str(refs_path), "ref 0 sentence 2 is empty")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    refs_path.write_bytes(pickle.dumps([Evil()], protocol=2))
    _assert_error(capsys, _refcoco_args(refer_root), cache, "r8", str(refs_path), "forbidden global",
                  "system")
    assert not marker.exists()


def test_flickr_bad_inputs(capsys, tmp_path, cache, flickr_root):
    def args(root: Path) -> list:
        return ["data", "import-flickr30k", "--root", root, "--images", root, "--ignore-sidecar"]

    _assert_error(capsys, args(tmp_path / "missing"), cache, "f1", str(tmp_path / "missing"), "root not found")
    sent = flickr_root / "Sentences" / "2.txt"
    good = sent.read_text()
    sent.write_text("[/EN#3/circle a circle\n")
    _assert_error(capsys, args(flickr_root), cache, "f2", str(sent), "line 1", "unbalanced brackets")
    sent.write_text(good)
    xml = flickr_root / "Annotations" / "1.xml"
    xml_text = xml.read_text()
    xml.write_text(xml_text.replace("</annotation>", ""))
    _assert_error(capsys, args(flickr_root), cache, "f3", str(xml), "malformed XML")
    xml.unlink()
    _assert_error(capsys, args(flickr_root), cache, "f4", str(xml), "annotation file not found")
    xml.write_text(xml_text.replace("<xmax>30</xmax>", "<xmax>99</xmax>"))
    _assert_error(capsys, args(flickr_root), cache, "f5", str(xml), "lies outside the 30x20 image")


def test_export_bad_inputs(capsys, tmp_path, cache):
    code, out, err = run(capsys, "data", "export", "-d", "tiny", "--format", "coco", "--out-dir", tmp_path,
                         "--cache", cache)
    assert code == 2 and err.strip() == "error: unknown format 'coco'; expected one of: refer, flickr30k"
    code, out, err = run(capsys, "data", "export", "-d", "nope", "--out-dir", tmp_path / "o", "--cache", cache)
    assert code == 2 and "missing manifest.json" in err and not (tmp_path / "o").exists()
    code, out, err = run(capsys, "data", "export", "-d", "tiny", "--out-dir", tmp_path / "o", "--split-by", "../x",
                         "--cache", cache)
    assert code == 2 and "invalid split-by '../x'" in err and not (tmp_path / "o").exists()
