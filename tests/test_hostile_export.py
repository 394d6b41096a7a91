"""Issue 14, "nothing lost": commands that write files never destroy what they did not write.

`data export` refuses a target holding files no export wrote (unless --force, which still keeps them),
exports copies of the images (never hard links into the cache), and an --out-dir that is a file is one
line, exit 2. `eval --out` and `show --out` (and every --out written through cli.console.emit) refuse a
folder, the input file being read, and an existing file that is not an earlier output of the same kind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import fail, run_json
from refground.cli.main import main
from refground.data.formats import export_flickr30k, export_refer
from refground.data.model import Dataset, Image, Mention, Object, Query
from refground.errors import DataError


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def export(capsys, cache: Path, out: Path, fmt: str, *extra) -> tuple[int, str, str]:
    return run(capsys, "data", "export", "--format", fmt, "--out-dir", out, "--cache", cache, *extra)


# ------------------------------------------------------------------------------------------ data export
def test_refer_export_refuses_a_corpus_folder_holding_user_files(capsys, synth_cache, tmp_path):
    out = tmp_path / "X"
    (out / "synth").mkdir(parents=True)
    user = out / "synth" / "refs(google).p"
    user.write_bytes(b"the user's own refs")
    err = fail(capsys, "data", "export", "--format", "refer", "--out-dir", str(out), "--cache", str(synth_cache))
    assert "refs(google).p" in err and "--force" in err and str(out / "synth") in err
    assert user.read_bytes() == b"the user's own refs"
    assert sorted(p.name for p in (out / "synth").iterdir()) == ["refs(google).p"]
    assert not (out / "images").exists()  # refused before the first write

    # --force writes what export writes and keeps the rest (--out is --out-dir's other name, as in the issue)
    code, _, err = run(capsys, "data", "export", "--format", "refer", "--out", out, "--cache", synth_cache, "--force")
    assert code == 0, err
    assert user.read_bytes() == b"the user's own refs"
    assert {"instances.json", "refs(unc).p", "refs(google).p"} <= {p.name for p in (out / "synth").iterdir()}
    assert "kept its other files" in err
    # a previous export is ours: exporting again (another split-by too) needs no --force and keeps the others
    code, _, err = export(capsys, synth_cache, out, "refer", "--split-by", "umd")
    assert code == 0, err
    assert user.read_bytes() == b"the user's own refs"
    assert (out / "synth" / "refs(unc).p").is_file() and (out / "synth" / "refs(umd).p").is_file()


def test_refer_export_refuses_a_foreign_instances_json(capsys, synth_cache, tmp_path):
    out = tmp_path / "X"
    (out / "synth").mkdir(parents=True)
    (out / "synth" / "instances.json").write_text('{"images": []}')
    err = fail(capsys, "data", "export", "--format", "refer", "--out-dir", str(out), "--cache", str(synth_cache))
    assert "instances.json exists and was not written by refground export" in err
    assert (out / "synth" / "instances.json").read_text() == '{"images": []}'


def test_flickr_export_keeps_a_user_file_in_sentences(capsys, synth_cache, tmp_path):
    out = tmp_path / "Y"
    code, _, err = export(capsys, synth_cache, out, "flickr30k")
    assert code == 0, err
    code, _, err = export(capsys, synth_cache, out, "flickr30k")  # over a previous export: fine
    assert code == 0, err
    mine = out / "Sentences" / "mine.txt"
    mine.write_text("my notes\n")
    before = sorted(p.name for p in (out / "Sentences").iterdir())
    err = fail(capsys, "data", "export", "--format", "flickr30k", "--out-dir", str(out), "--cache", str(synth_cache))
    assert "mine.txt" in err and "--force" in err
    assert mine.read_text() == "my notes\n" and sorted(p.name for p in (out / "Sentences").iterdir()) == before
    code, _, err = export(capsys, synth_cache, out, "flickr30k", "--force")
    assert code == 0, err
    assert mine.read_text() == "my notes\n" and "kept 1 files" in err
    assert sorted(p.name for p in (out / "Sentences").iterdir()) == before


def test_flickr_export_refuses_split_files_it_did_not_write(capsys, synth_cache, tmp_path):
    out = tmp_path / "Y"
    out.mkdir()
    (out / "train.txt").write_text("12345\n")
    err = fail(capsys, "data", "export", "--format", "flickr30k", "--out-dir", str(out), "--cache", str(synth_cache))
    assert "train.txt exists and was not written by refground export" in err
    assert (out / "train.txt").read_text() == "12345\n" and not (out / "Sentences").exists()


def test_exported_images_are_copies_not_links_into_the_cache(capsys, synth_cache, synth_ds, tmp_path):
    src = synth_cache / "synth" / "dataset" / "images" / synth_ds.image_files[0]
    original = src.read_bytes()
    out = tmp_path / "X"
    # an export made before copies were the rule: a hard link into the cache, replaced by a copy now
    (out / "images").mkdir(parents=True)
    os.link(src, out / "images" / synth_ds.image_files[0])
    code, _, err = export(capsys, synth_cache, out, "refer")
    assert code == 0, err
    for name in synth_ds.image_files:
        exported = out / "images" / name
        assert not os.path.samefile(exported, synth_cache / "synth" / "dataset" / "images" / name)
    exported = out / "images" / synth_ds.image_files[0]
    assert exported.read_bytes() == original
    exported.write_bytes(b"edited by the user")
    assert src.read_bytes() == original  # editing the export leaves the cache alone


def test_export_refuses_an_image_file_with_other_content(capsys, synth_cache, synth_ds, tmp_path):
    out = tmp_path / "X"
    name = synth_ds.image_files[1]
    (out / "images").mkdir(parents=True)
    (out / "images" / name).write_bytes(b"not the dataset's picture")
    err = fail(capsys, "data", "export", "--format", "refer", "--out-dir", str(out), "--cache", str(synth_cache))
    assert name in err and "--force" in err
    assert (out / "images" / name).read_bytes() == b"not the dataset's picture" and not (out / "synth").exists()
    code, _, err = export(capsys, synth_cache, out, "refer", "--force")
    assert code == 0, err
    assert (out / "images" / name).read_bytes() == (synth_cache / "synth" / "dataset" / "images" / name).read_bytes()


@pytest.mark.parametrize("fmt", ["refer", "flickr30k"])
def test_export_out_dir_that_is_a_file(capsys, synth_cache, tmp_path, fmt):
    target = tmp_path / "afile"
    target.write_text("keep")
    err = fail(capsys, "data", "export", "--format", fmt, "--out-dir", str(target), "--cache", str(synth_cache))
    assert err == f"error: {target}: exists and is not a folder; --out-dir must name a folder (new or existing)"
    err = fail(capsys, "data", "export", "--format", fmt, "--out-dir", str(target / "sub"), "--cache",
               str(synth_cache))
    assert f"{target} is a file, not a folder" in err
    assert target.read_text() == "keep"


def test_export_refuses_image_names_outside_the_image_folder(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "evil.png").write_bytes(b"x")
    ds = Dataset.from_records("evil", [Image(1, "../evil.png", 9, 9, "train")], [],
                              [Query(1, 1, "expression", "a", (), split="train")],
                              meta={"image_root": str(tmp_path / "root")})
    with pytest.raises(DataError, match=r"image file name '\.\./evil\.png' is not a relative path"):
        export_refer(ds, tmp_path / "out", "evil")
    with pytest.raises(DataError, match=r"image file name '\.\./evil\.png' is not a relative path"):
        export_flickr30k(ds, tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_refer_export_refuses_a_split_the_format_cannot_hold(tmp_path):
    """import_refer refuses unknown split names, so export does not write them."""
    ds = Dataset.from_records("odd", [Image(1, "a.png", 9, 9, "")], [Object(10, 1, "a", (0.0, 0.0, 5.0, 5.0))],
                              [Query(1, 1, "expression", "a", (Mention(0, 1, "referent", (10,)),), split="")])
    with pytest.raises(DataError, match=r"dataset odd: query 1 has split '', which the refer format cannot hold"):
        export_refer(ds, tmp_path / "out", "odd")
    assert not (tmp_path / "out" / "odd").exists()


# ------------------------------------------------------------------------------------------ eval --out, show --out
@pytest.fixture()
def preds(synth_ds, tmp_path) -> Path:
    q = synth_ds.queries("testA", "expression")[0]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"query_id": q.id, "box": [0, 0, 10, 10]}) + "\n")
    return path


def _eval(synth_cache, preds, *extra) -> list[str]:
    return ["eval", "-p", str(preds), "--split", "testA", "--cache", str(synth_cache), *map(str, extra)]


def test_eval_out_never_overwrites_the_predictions_it_scores(capsys, synth_cache, preds, tmp_path):
    original = preds.read_bytes()
    err = fail(capsys, *_eval(synth_cache, preds, "--out", preds))
    assert f"{preds}: is the input file this command reads; choose another --out" in err
    link = tmp_path / "link.jsonl"
    link.symlink_to(preds)
    hard = tmp_path / "hard.jsonl"
    os.link(preds, hard)
    for other in (link, hard):  # the same file under another name: refused even with --force
        err = fail(capsys, *_eval(synth_cache, preds, "--out", other, "--force"))
        assert "is the input file this command reads" in err
    assert preds.read_bytes() == original


def test_eval_out_folder_and_foreign_files(capsys, synth_cache, preds, tmp_path):
    folder = tmp_path / "adir"
    folder.mkdir()
    err = fail(capsys, *_eval(synth_cache, preds, "--out", folder))
    assert err == f"error: {folder}: is a folder; --out must name a file (e.g. {folder / 'out.json'})"
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    err = fail(capsys, *_eval(synth_cache, preds, "--out", notes))
    assert "exists and is not an output of this command; pass --force to overwrite it or choose another --out" in err
    assert notes.read_text() == "my notes"
    config = tmp_path / "config.json"  # JSON, but not a figures file written by refground
    config.write_text(json.dumps({"lr": 0.1}))
    fail(capsys, *_eval(synth_cache, preds, "--out", config))
    assert json.loads(config.read_text()) == {"lr": 0.1}
    payload = run_json(capsys, *_eval(synth_cache, preds, "--out", notes, "--force"))
    assert json.loads(notes.read_text()) == payload


def test_eval_rerun_overwrites_its_own_figures(capsys, synth_cache, preds):
    first = run_json(capsys, *_eval(synth_cache, preds))
    default = preds.with_name("p.eval-testA.json")
    assert json.loads(default.read_text()) == first
    assert run_json(capsys, *_eval(synth_cache, preds)) == first  # the default path again: no --force needed
    explicit = preds.with_name("mine.json")
    run_json(capsys, *_eval(synth_cache, preds, "--out", explicit))
    assert run_json(capsys, *_eval(synth_cache, preds, "--out", explicit)) == first


def test_emit_json_out_of_other_commands_is_checked_too(capsys, synth_cache, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    err = fail(capsys, "data", "stats", "--cache", str(synth_cache), "--out", str(notes))
    assert "delete it or choose another --out" in err and notes.read_text() == "my notes"
    err = fail(capsys, "data", "stats", "--cache", str(synth_cache), "--out", str(tmp_path))
    assert "is a folder" in err
    stats = tmp_path / "stats.json"
    first = run_json(capsys, "data", "stats", "--cache", str(synth_cache), "--out", str(stats))
    assert run_json(capsys, "data", "stats", "--cache", str(synth_cache), "--out", str(stats)) == first


def test_show_out_writes_only_png(capsys, synth_cache, tmp_path):
    base = ["show", "--cache", str(synth_cache), "--split", "testA"]
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    err = fail(capsys, *base, "--out", str(model))
    assert "--out must end in .png" in err and model.read_bytes() == b"weights"
    err = fail(capsys, *base, "--out", str(tmp_path))
    assert "is a folder" in err
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a picture")
    err = fail(capsys, *base, "--out", str(fake))
    assert "pass --force" in err and fake.read_bytes() == b"not a picture"
    png = tmp_path / "q.png"
    for _ in range(2):  # an existing PNG (an earlier picture) is overwritten
        code, _, err = run(capsys, *base, "--out", png)
        assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(capsys, *base, "--out", fake, "--force")
    assert code == 0, err
    assert fake.read_bytes()[:4] == b"\x89PNG"



def test_report_out_refuses_a_file_of_another_kind(tmp_path, capsys):
    """`report --out model.pt` used to overwrite the weights with markdown; now only a .md is written."""
    from conftest import fail

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    msg = fail(capsys, "report", "cmrin", "--cache", str(tmp_path), "--out", str(weights))
    assert "model.pt" in msg and ".md" in msg
    assert weights.read_bytes() == b"weights"
    msg = fail(capsys, "report", "vlnms", "--cache", str(tmp_path), "--out", str(tmp_path))
    assert "is a folder" in msg
