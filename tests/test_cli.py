"""The CLI as a user meets it: entry point, error lines and exit codes, stats, show, bench, README/CI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image as PILImage

from refground.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert block[0].startswith("# main job") and block[2] == "# tests"
    assert "refground" in block[1] and "pytest" in block[3]
    # .ci/run extracts the line after "# tests" from the README's first code block and runs it.
    assert "# tests" in ci and "README.md" in ci


def test_console_script_runs_help():
    out = subprocess.run([sys.executable, "-m", "refground.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("data", "eval", "show", "bench"):
        assert command in out.stdout


def test_missing_dataset_is_one_line_and_exit_2(capsys, tmp_path):
    code, out, err = run(capsys, "data", "stats", "--dataset", "nope", "--cache", str(tmp_path))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing manifest.json" in lines[0]
    assert str(tmp_path / "nope" / "dataset") in lines[0]
    assert "Traceback" not in err


def test_debug_flag_shows_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "data", "stats", "--dataset", "nope", "--cache", str(tmp_path), "--debug")
    assert code == 2 and "Traceback" in err


def test_unknown_option_is_a_usage_error(capsys):
    code, _, err = run(capsys, "data", "stats", "--no-such-option")
    assert code == 2 and "No such option" in err


def test_stats_table_and_json(capsys, synth_cache, synth_ds):
    code, out, _ = run(capsys, "data", "stats", "--cache", str(synth_cache), "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["images"] == synth_ds.num_images == 24
    assert stats["objects"] == synth_ds.num_objects
    assert sum(v["count"] for v in stats["kinds"].values()) == stats["expressions"]
    assert sum(v["images"] for v in stats["splits"].values()) == 24
    assert 4 <= stats["objects_per_image"]["min"] and stats["objects_per_image"]["max"] <= 20
    code, out, _ = run(capsys, "data", "stats", "--cache", str(synth_cache))
    assert code == 0 and "per expression kind" in out and "relation1" in out


def test_show_writes_png(capsys, synth_cache, synth_ds, tmp_path):
    q = synth_ds.queries("train", task="expression")[0]
    png = tmp_path / "q.png"
    code, _, err = run(capsys, "show", "--cache", str(synth_cache), "--query", str(q.id), "--out", str(png))
    assert code == 0, err
    with PILImage.open(png) as im:
        assert im.width >= 512 and im.height > im.width  # scaled image plus the text band
    code, _, err = run(capsys, "show", "--cache", str(synth_cache), "--split", "val", "--index", "100000")
    assert code == 2 and "outside split 'val'" in err
    code, _, err = run(capsys, "show", "--cache", str(synth_cache), "--query", "-5")
    assert code == 2 and "unknown query id -5" in err


def test_bench_lists_and_runs_quick(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "--list")
    assert code == 0 and "nms" in out.split()
    code, out, _ = run(capsys, "bench", "box_iou", "--quick", "--json", "--out", str(tmp_path / "b.json"))
    assert code == 0
    payload = json.loads(out)
    assert payload["results"] and all(r["figure"] > 0 for r in payload["results"])
    assert json.loads((tmp_path / "b.json").read_text()) == payload
    code, _, err = run(capsys, "bench", "no_such_bench")
    assert code == 2 and "unknown benchmark(s) no_such_bench" in err


def _copy_dataset(src_cache: Path, dst_cache: Path, name: str = "synth") -> Path:
    import shutil

    dst = dst_cache / name / "dataset"
    shutil.copytree(src_cache / "synth" / "dataset", dst)
    return dst


def test_half_written_dataset_is_refused(capsys, synth_cache, tmp_path):
    ds_dir = _copy_dataset(synth_cache, tmp_path)
    manifest = ds_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "complete": False}))
    code, _, err = run(capsys, "data", "stats", "--cache", str(tmp_path))
    assert code == 2 and err.count("\n") == 1
    assert str(manifest) in err and "incomplete" in err and "re-run the step that made it" in err

    manifest.write_text(json.dumps(data))
    (ds_dir / "annotations" / "object_boxes.npy").unlink()
    code, _, err = run(capsys, "data", "stats", "--cache", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "object_boxes.npy: missing" in err and "--force" in err


def test_interrupted_synth_leaves_nothing_and_keeps_the_old_dataset(capsys, synth_cache, tmp_path, monkeypatch):
    import refground.data.synth.generate as generate

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "validate_dataset", interrupt)  # after all images are written to staging
    args = ("data", "synth", "--num-images", "6", "--image-size", "64", "--workers", "1", "--cache", str(tmp_path))
    code, _, err = run(capsys, *args)
    assert code == 130 and "interrupted" in err
    # No dataset, no staging folder (the writer's lock file, free now, may stay).
    assert [p.name for p in (tmp_path / "synth").iterdir()] in ([], [".dataset.lock"])

    ds_dir = _copy_dataset(synth_cache, tmp_path, "kept")
    before = sorted(p.name for p in (ds_dir / "annotations").iterdir())
    code, _, _ = run(capsys, *args[:-2], "--dataset", "kept", "--force", "--cache", str(tmp_path))
    assert code == 130
    assert sorted(p.name for p in (ds_dir / "annotations").iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) in (["dataset"], [".dataset.lock", "dataset"])
    code, out, _ = run(capsys, "data", "stats", "--dataset", "kept", "--cache", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["images"] == 24


@pytest.mark.parametrize("command", [
    ("data", "synth"), ("data", "stats"), ("data", "import-refcoco"), ("data", "import-referit"),
    ("data", "import-flickr30k"), ("data", "export"), ("eval",), ("bench",),
])
def test_every_command_reporting_figures_has_json(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and "--json" in out


def test_show_draws_predictions_and_proposals(capsys, synth_cache, synth_ds, tmp_path):
    import numpy as np

    from refground.eval.predictions import write_predictions
    from refground.viz import PRED, PROPOSAL

    q = synth_ds.queries("train", task="expression")[0]
    others = [o.box for o in synth_ds.objects_of(q.image_id) if o.id != q.referent_object_id]
    preds = tmp_path / "p.jsonl"
    write_predictions(preds, [{"query_id": q.id, "boxes": [list(b) for b in others]}])

    def colour_pixels(png: Path, colour) -> int:
        with PILImage.open(png) as im:
            return int((np.asarray(im.convert("RGB")) == np.array(colour)).all(axis=2).sum())

    plain, drawn = tmp_path / "plain.png", tmp_path / "drawn.png"
    assert run(capsys, "show", "--cache", str(synth_cache), "-q", str(q.id), "-o", str(plain))[0] == 0
    code, _, err = run(capsys, "show", "--cache", str(synth_cache), "-q", str(q.id), "-o", str(drawn),
                       "--predictions", str(preds), "--proposals", "3")
    assert code == 0, err
    assert colour_pixels(plain, PRED) == 0 and colour_pixels(drawn, PRED) > 100
    assert colour_pixels(plain, PROPOSAL) == 0 and colour_pixels(drawn, PROPOSAL) > 20
    other = synth_ds.queries("train", task="expression")[1]
    code, _, err = run(capsys, "show", "--cache", str(synth_cache), "-q", str(other.id), "--predictions", str(preds))
    assert code == 2 and f"no prediction for query {other.id}" in err
