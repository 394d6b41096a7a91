"""Issue 14, "nothing silently wrong": importers say what they could not read as given.

Flickr30K sentence files in latin-1 are read as latin-1 (counted), never with U+FFFD; a UTF-8 byte-order
mark is dropped instead of breaking the markup; an import whose --images folder lacks the annotated files
warns with the count and the first name; a refer ref with an unknown split name is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from conftest import fail, run_json
from refground.cli.main import main
from refground.data.formats import import_flickr30k, import_refer

XML = ("<annotation><filename>{iid}.jpg</filename><size><width>50</width><height>40</height><depth>3</depth>"
       "</size><object><name>1</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox>"
       "</object></annotation>\n")


def flickr_folder(root: Path, sentences: bytes, train: bytes = b"1\n") -> Path:
    """A one-image Flickr30K Entities folder (image 1, entity 1 boxed) with the given sentence file bytes."""
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "1.txt").write_bytes(sentences)
    (root / "Annotations" / "1.xml").write_text(XML.format(iid=1))
    (root / "train.txt").write_bytes(train)
    (root / "val.txt").write_text("")
    (root / "test.txt").write_text("")
    (root / "images").mkdir()
    (root / "images" / "1.jpg").write_bytes(b"jpg")
    return root


# ------------------------------------------------------------------------------------------ 11a / 11b text decoding
def test_latin1_sentence_is_read_as_latin1_and_counted(capsys, tmp_path):
    line = "[/EN#1/people A man] at the caf\xe9 , na\xefve\n".encode("latin-1")
    root = flickr_folder(tmp_path / "f", b"[/EN#1/people A man] walks\n" + line)
    ds = import_flickr30k(root, root / "images")
    assert [q.text for q in ds.queries()] == ["A man walks", "A man at the caf\xe9 , na\xefve"]
    assert not any("\ufffd" in q.text or "\ufffd" in q.raw for q in ds.queries())
    assert (ds.meta["latin1_lines"], ds.meta["latin1_files"]) == (1, 1)
    result = run_json(capsys, "data", "import-flickr30k", "--root", str(root), "--images", str(root / "images"),
                      "--cache", str(tmp_path / "cache"))
    assert (result["latin1_lines"], result["latin1_files"]) == (1, 1)
    code = main(["data", "import-flickr30k", "--root", str(root), "--images", str(root / "images"), "--cache",
                 str(tmp_path / "cache"), "--dataset", "again"])
    err = capsys.readouterr().err
    assert code == 0 and "warning: 1 line(s) in 1 file(s) were not UTF-8 and were read as latin-1" in err


def test_bom_is_dropped_silently(tmp_path):
    root = flickr_folder(tmp_path / "f", b"\xef\xbb\xbf[/EN#1/people A man] walks\n", train=b"\xef\xbb\xbf1\n")
    ds = import_flickr30k(root, root / "images")
    q = ds.queries()[0]
    assert q.text == "A man walks" and q.raw == "[/EN#1/people A man] walks"
    assert [(m.start, m.end, m.object_ids) for m in q.mentions] == [(0, 2, (1000,))]
    assert ds.meta["bom_files"] == 2 and ds.meta["latin1_lines"] == 0


def test_decode_text_keeps_utf8_lines_and_falls_back_per_line():
    from refground.data.formats._common import decode_text

    text, bom, latin1 = decode_text("caf\u00e9\n".encode() + "na\xefve\n".encode("latin-1") + b"plain")
    assert (text, bom, latin1) == ("caf\u00e9\nna\xefve\nplain", False, 1)
    assert decode_text(b"\xef\xbb\xbfabc") == ("abc", True, 0)


# ------------------------------------------------------------------------------------------ 11c missing images
@pytest.fixture()
def refer_root(capsys, synth_cache, tmp_path) -> Path:
    out = tmp_path / "refer"
    assert main(["data", "export", "--format", "refer", "--corpus", "refcoco", "--out-dir", str(out), "--cache",
                 str(synth_cache)]) == 0
    capsys.readouterr()
    return out


def test_import_refcoco_with_an_empty_images_folder_warns(capsys, tmp_path, refer_root, synth_ds):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["data", "import-refcoco", "--root", str(refer_root), "--images", str(empty), "--cache",
            str(tmp_path / "cache")]
    code = main(args)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    n = synth_ds.num_images
    warnings = [line for line in cap.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {n} of {n} image files named by the annotations are not under --images {empty} "
                        f"(first: {synth_ds.image_files[0]}); check --images, or later steps that read the images "
                        "will fail"]
    result = run_json(capsys, *args)  # a re-run (cache hit) still reports it
    assert result["missing_images"] == n and result["skipped"] is True
    result = run_json(capsys, "data", "import-refcoco", "--root", str(refer_root), "--images",
                      str(refer_root / "images"), "--cache", str(tmp_path / "cache"), "--dataset", "ok")
    assert result["missing_images"] == 0


def test_import_flickr_counts_missing_images(tmp_path):
    root = flickr_folder(tmp_path / "f", b"[/EN#1/people A man] walks\n")
    ds = import_flickr30k(root, tmp_path)  # the JPEG is under root/images, not here
    assert (ds.meta["missing_images"], ds.meta["first_missing_image"]) == (1, "1.jpg")


# ------------------------------------------------------------------------------------------ 11d unknown split names
def test_unknown_ref_split_is_refused(capsys, tmp_path, refer_root):
    refs_path = refer_root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[1]["split"] = "tesst"
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    err = fail(capsys, "data", "import-refcoco", "--root", str(refer_root), "--images", str(refer_root / "images"),
               "--cache", str(tmp_path / "cache"))
    assert err == (f"error: {refs_path}: ref {refs[1]['ref_id']}: unknown split 'tesst'; expected one of: train, val, "
                   "test, testA, testB, testC, testAB, testBC, testAC")
    assert not (tmp_path / "cache" / "refcoco_unc").exists()


@pytest.mark.parametrize("split", ["train", "val", "test", "testA", "testB", "testC", "testAB"])
def test_known_ref_splits_are_accepted(tmp_path, refer_root, split):
    refs_path = refer_root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[0]["split"] = split
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    ds = import_refer(refer_root, "refcoco", "unc", refer_root / "images")
    assert ds.query(refs[0]["sent_ids"][0]).split == split

