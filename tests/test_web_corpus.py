"""The web corpus (the built-in CLIP's pretraining data): deterministic, captions true to their images, and
sharing no image and no sentence with the synthetic world."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from refground.data.store import dataset_remedy, image_path, is_complete_with, load_dataset, read_manifest
from refground.data.synth import (CATEGORIES, COLORS, ensure_web_corpus, generate_dataset, generate_web_corpus,
                                  web_summary, write_web_corpus)
from refground.data.synth.render import WEB_BACKGROUNDS
from refground.data.synth.web import web_params
from refground.data.synth.web_language import (BACKGROUND_PHRASES, LAYOUT_PHRASES, WEB_COUNT_WORDS, WEB_FILLERS,
                                               WEB_MARKERS, WEB_RELATION_WORDS, alt_texts, relation_matrix,
                                               world_words)
from refground.data.synth.web_scene import LAYOUTS, sample_web_scene
from refground.data.synth.world import PLURALS
from refground.data.validate import validate_dataset
from refground.errors import UsageError
from refground.masks import decode, to_bbox

SIZE = 64
COLOUR_NAMES = set(COLORS)
NOUNS = set(CATEGORIES) | set(PLURALS.values())
PLURAL_OF = {v: k for k, v in PLURALS.items()}
# Relation words -> relation key, longest phrase first (so "to the left of" is not read as "left of").
REL_OF = {w: r for r, words in WEB_RELATION_WORDS.items() for w in words}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 rendered images of 64 px."""
    return write_web_corpus(tmp_path_factory.mktemp("web") / "web", num_images=40, seed=0, image_size=SIZE,
                            workers=1)


@pytest.fixture(scope="module")
def sample():
    """300 images' annotations (no pixels): enough of every layout and caption form."""
    return generate_web_corpus(num_images=300, seed=1, image_size=SIZE, workers=1)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and p.name != "manifest.json"}


def test_deterministic_and_independent_of_workers(tmp_path):
    a = write_web_corpus(tmp_path / "a", num_images=24, seed=5, image_size=SIZE, workers=1)
    write_web_corpus(tmp_path / "b", num_images=24, seed=5, image_size=SIZE, workers=2)  # 2 chunks: a real pool
    write_web_corpus(tmp_path / "c", num_images=24, seed=6, image_size=SIZE, workers=1)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert sum(k.startswith("images/") for k in fa) == 24 and any(k.startswith("annotations/") for k in fa)
    assert fa == fb  # byte-identical annotations and PNGs whatever the worker count
    assert fa["annotations/query_texts.json"] != fc["annotations/query_texts.json"]
    assert all(fa[k] != fc[k] for k in fa if k.startswith("images/"))
    # Annotations do not depend on whether pixels are rendered.
    assert generate_web_corpus(num_images=24, seed=5, image_size=SIZE, workers=1).to_json_records() == \
        a.to_json_records()
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["complete"] and man["params"] == web_params("web", 24, 5, SIZE) and "workers" not in man["params"]


def test_records_and_splits(corpus, sample):
    validate_dataset(corpus)
    for ds, n in ((corpus, 40), (sample, 300)):
        assert ds.meta["source"] == "synthetic-web" and ds.meta["generator"]["params"]["num_images"] == n
        assert Counter(ds.image_splits) == {"train": n - round(0.05 * n), "val": round(0.05 * n)}
        split_of = dict(zip(ds.image_ids.tolist(), ds.image_splits))
        qs = ds.queries()
        assert len(qs) == 2 * n and Counter(q.image_id for q in qs) == {i: 2 for i in split_of}
        assert all(q.task == "caption" and q.kind == "alt-text" and q.split == split_of[q.image_id] for q in qs)
    assert sum(sample.meta["layouts"].values()) == 300 and all(sample.meta["layouts"][k] > 0 for k in LAYOUTS)
    assert set(sample.meta["backgrounds"]) == set(WEB_BACKGROUNDS) and all(sample.meta["backgrounds"].values())
    # Two validation images: the seeded permutation differs between seeds.
    other = generate_web_corpus(num_images=40, seed=3, image_size=SIZE, workers=1)
    assert other.image_splits != corpus.image_splits


def test_objects_masks_and_layouts(corpus, sample):
    for ds in (corpus, sample):
        per_image = np.diff(ds.image_object_offsets)
        assert per_image.min() >= 1 and per_image.max() <= 6
        for image_id in ds.image_ids.tolist():
            objs = ds.objects_of(image_id)
            masks = np.stack([decode(o.mask) for o in objs])
            assert masks.sum(axis=0).max() <= 1  # no occlusion: masks are disjoint whole shapes
            for o, m in zip(objs, masks):
                assert o.box == to_bbox(o.mask) and m.sum() >= 6
                assert o.category in CATEGORIES and o.attributes["color"] in COLOUR_NAMES
                assert o.attributes["size"] in ("small", "medium", "large")
    assert set(Counter(np.diff(sample.image_object_offsets).tolist())) == {1, 2, 3, 4, 5, 6}
    # Close-ups: one object filling a good part of the image (the CLIP later sees crops of single objects).
    side = np.maximum(sample.object_boxes[:, 2] - sample.object_boxes[:, 0],
                      sample.object_boxes[:, 3] - sample.object_boxes[:, 1]) / SIZE
    single = np.diff(sample.image_object_offsets) == 1
    big_single = single[np.repeat(np.arange(sample.num_images), np.diff(sample.image_object_offsets))] & (side >= 0.24)
    assert big_single.sum() >= sample.meta["layouts"]["closeup"] and (side[big_single] >= 0.6).any()
    assert side.min() < 0.12  # and small objects elsewhere


def test_pixels_match_the_objects(corpus):
    names, rgb = list(COLORS), np.array(list(COLORS.values()), dtype=np.float64)
    chroma = rgb / np.linalg.norm(rgb, axis=1, keepdims=True)
    for image_id in corpus.image_ids[:12].tolist():
        img = np.asarray(PILImage.open(image_path(corpus, image_id)).convert("RGB"), dtype=np.float64)
        assert img.shape == (SIZE, SIZE, 3)
        for o in corpus.objects_of(image_id):
            px = img[decode(o.mask)]
            # Outlines are black, white or darker: only coloured pixels vote. Shading and grain change
            # brightness: most coloured pixels keep the named colour's chromaticity.
            px = px[px.max(axis=1) - px.min(axis=1) > 40]
            assert len(px) >= 3
            c = px / np.maximum(np.linalg.norm(px, axis=1, keepdims=True), 1e-6)
            votes = Counter(np.argmin(((c[:, None] - chroma[None]) ** 2).sum(-1), axis=1).tolist())
            assert names[votes.most_common(1)[0][0]] == o.attributes["color"], (image_id, o.id)


def _mention_words(q, m) -> list[str]:
    return q.tokens[m.start:m.end]


def test_captions_name_what_is_there(sample):
    colour_named = Counter()
    by_image: dict[int, list] = {}
    for q in sample.queries():
        by_image.setdefault(q.image_id, []).append(q)
    for image_id in sample.image_ids.tolist():
        objs = {o.id: o for o in sample.objects_of(image_id)}
        full, short = by_image[image_id]
        assert full.text != short.text
        # The full caption names every object exactly once; the short one some of them.
        linked = [i for m in full.mentions for i in m.object_ids]
        assert sorted(linked) == sorted(objs)
        assert {i for m in short.mentions for i in m.object_ids} <= set(objs)
        for q in (full, short):
            outside = set(q.tokens)
            for m in q.mentions:
                words = _mention_words(q, m)
                outside -= set(words)
                group = [objs[i] for i in m.object_ids]
                assert m.object_ids and m.role == "referent"
                assert len({(o.category, o.attributes["color"]) for o in group}) == 1  # one group
                cat, col = group[0].category, group[0].attributes["color"]
                assert m.type == cat
                said = [w for w in words if w in COLOUR_NAMES]
                assert said in ([], [col]), (q.text, words)
                noun = words[-1]
                assert noun in (cat, PLURALS[cat]) or noun in WEB_FILLERS or noun in WEB_FILLERS.values()
                assert (noun in PLURAL_OF or noun in WEB_FILLERS.values()) == (len(group) > 1)
                if noun in WEB_FILLERS or noun in WEB_FILLERS.values():
                    assert said  # a filler noun always comes with the colour
                if q is full:  # a determiner for one object, the exact count for several
                    assert words[0] == (WEB_COUNT_WORDS[len(group)] if len(group) > 1 else
                                        ("an" if words[1][0] in "aeiou" else "a"))
                    if said:
                        colour_named.update(m.object_ids)
                else:
                    assert words[0] not in ("a", "an", *WEB_COUNT_WORDS.values())
            # No colour or shape word outside the phrases (none names an absent object).
            assert not outside & (COLOUR_NAMES | NOUNS), q.text
    assert len(colour_named) >= 0.85 * sample.num_objects  # most objects named with their colour
    s = web_summary(sample)
    assert s["objects_named_with_colour"] >= 0.85 and s["objects_named_with_category"] >= 0.85
    assert s["colour_share"] >= 0.85 and 0.05 <= s["spatial_share"] <= 0.5


def _size_class_slow(d: list[float], k: int) -> str:
    """Relative size class of object ``k`` among nominal diameters ``d``, from its definition."""
    if len(d) == 1:
        return "big" if d[0] >= 0.45 else "small" if d[0] <= 0.15 else ""
    if max(d) < 1.6 * min(d):
        return ""
    return "big" if d[k] * 1.25 >= max(d) else "small" if d[k] <= 1.25 * min(d) else ""


def test_words_agree_with_the_scene(sample):
    """Regenerate the sample's scenes from their streams: size, layout and background words tell the truth
    about the scene (nominal diameters, layout, background kind), and the texts are the stored ones."""
    bg_of = {p: k for k, ps in BACKGROUND_PHRASES.items() for p in ps}
    layout_of = {p: k for k, ps in LAYOUT_PHRASES.items() for p in ps}
    seen = Counter()
    for index in range(100):
        rng = np.random.default_rng([1, index, 101])
        ws = sample_web_scene(rng, SIZE)
        caps = alt_texts(ws, rng)
        assert [c.text for c in caps] == [q.text for q in sample.queries() if q.image_id == index + 1]
        d = ws.diameter.tolist()
        for c in caps:
            for start, end, _, objs, _, _ in c.mentions:
                words = set(c.tokens[start:end])
                said = "big" if words & {"large", "big"} else "small" if words & {"small", "tiny"} else ""
                if said:
                    seen[said] += 1
                    assert all(_size_class_slow(d, k) == said for k in objs), c.text
                if "tiny" in words:
                    assert all(d[k] < 0.1 for k in objs), c.text
            for phrase, kind in bg_of.items():
                if f" {phrase}" in f" {c.text}":
                    seen["background"] += 1
                    assert kind == ws.background, c.text
            for phrase, kind in layout_of.items():
                if f" {phrase}" in f" {c.text}":
                    seen["layout"] += 1
                    assert kind == ws.layout, c.text
    assert min(seen["big"], seen["small"], seen["background"], seen["layout"]) >= 5, seen


def _holds_slow(rel: str, a: np.ndarray, b: np.ndarray, side: float) -> bool:
    """The relation between two boxes (xyxy) from its definition, one pair at a time."""
    ax, ay = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    bx, by = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    dx, dy = ax - bx, ay - by
    if rel == "next":
        gap_x = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
        gap_y = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
        return abs(dx) > abs(dy) and (gap_x ** 2 + gap_y ** 2) ** 0.5 <= 0.15 * side
    major, minor, sign = {"left": (abs(dx), abs(dy), dx < 0), "right": (abs(dx), abs(dy), dx > 0),
                          "above": (abs(dy), abs(dx), dy < 0), "below": (abs(dy), abs(dx), dy > 0)}[rel]
    return sign and major >= 1.3 * minor and major >= 0.04 * side


def test_relation_matrix_matches_the_slow_definition():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (12, 2))
    wh = rng.uniform(2, 30, (12, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[3] = boxes[2]  # a repeated box: no relation to itself nor its twin's centre
    for rel in WEB_RELATION_WORDS:
        fast = relation_matrix(boxes, 128.0, rel)
        slow = np.array([[i != j and _holds_slow(rel, boxes[i], boxes[j], 128.0) for j in range(12)]
                         for i in range(12)])
        assert (fast == slow).all(), rel
        assert fast.any() and not fast.all()


def test_spatial_and_layout_words_hold(sample):
    n_rel = n_layout = 0
    layout_words = {w: k for k, words in LAYOUT_PHRASES.items() for w in words}
    for q in sample.queries():
        boxes = {i: sample.object_boxes[sample.object_row(i)] for m in q.mentions for i in m.object_ids}
        # Between consecutive phrases: "and", "with" or the relation recorded in the triples, which holds.
        rels = {(r.subject, r.object): r.predicate for r in q.relations}
        for k in range(1, len(q.mentions)):
            between = " ".join(q.tokens[q.mentions[k - 1].end:q.mentions[k].start])
            if between in ("and", "with"):
                assert (k - 1, k) not in rels
                continue
            assert rels[(k - 1, k)] == between, q.text
            n_rel += 1
            for a in q.mentions[k - 1].object_ids:
                for b in q.mentions[k].object_ids:
                    assert _holds_slow(REL_OF[between], boxes[a], boxes[b], SIZE), q.text
        tail = " ".join(q.tokens[q.mentions[-1].end:])
        for phrase, layout in layout_words.items():
            if f" {phrase}" in f" {tail}":
                n_layout += 1
                b = sample.object_boxes[sample.object_slice(q.image_id)]
                c = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
                d = np.abs(c[:, None] - c[None])
                off = ~np.eye(len(c), dtype=bool)
                assert len(c) >= 2
                if layout == "row":
                    assert (d[..., 0] > d[..., 1])[off].all(), q.text
                elif layout == "column":
                    assert (d[..., 1] > d[..., 0])[off].all(), q.text
                else:  # a grid: at least two columns and two rows of centres
                    assert np.ptp(c[:, 0]) > SIZE / 4 and np.ptp(c[:, 1]) > SIZE / 4, q.text
    assert n_rel >= 20 and n_layout >= 10
    assert {REL_OF[r.predicate] for q in sample.queries() for r in q.relations} == set(WEB_RELATION_WORDS)


def test_every_caption_is_marked_as_web_text(sample):
    world = world_words()
    assert not WEB_MARKERS & world
    for q in sample.queries():
        assert WEB_MARKERS & set(q.tokens), q.text


def test_disjoint_from_the_world(tmp_path, corpus):
    """Same seed, size and count as the corpus: no image's pixels and no sentence of the world appear in it."""
    world = generate_dataset(num_images=40, seed=0, image_size=SIZE, image_dir=tmp_path / "world", workers=1)

    def pixel_hashes(ds, root: Path) -> set[str]:
        return {hashlib.sha256(np.asarray(PILImage.open(root / im.file).convert("RGB")).tobytes()).hexdigest()
                for im in ds.images()}

    web_px = pixel_hashes(corpus, Path(corpus.meta["image_root"]))
    world_px = pixel_hashes(world, tmp_path / "world")
    assert len(web_px) == 40 and len(world_px) == 40 and not web_px & world_px
    world_texts = set(world.query_texts)
    assert len(world_texts) > 100 and not world_texts & set(corpus.query_texts)
    # The marker argument rests on world_words() covering the world's grammar: check it on real sentences.
    assert {w for t in world_texts for w in t.split(" ")} <= world_words()


def test_ensure_reuses_and_forces(tmp_path):
    d = tmp_path / "w"
    a, written = ensure_web_corpus(d, num_images=3, seed=2, image_size=SIZE, workers=1)
    assert written and a.num_images == 3
    b, written = ensure_web_corpus(d, num_images=3, seed=2, image_size=SIZE, workers=1)
    assert not written and b.to_json_records() == a.to_json_records()
    _, written = ensure_web_corpus(d, num_images=3, seed=2, image_size=SIZE, workers=1, force=True)
    assert written
    _, written = ensure_web_corpus(d, num_images=3, seed=3, image_size=SIZE, workers=1)
    assert written and load_dataset(d).meta["generator"]["params"]["seed"] == 3
    assert "--preset web" in dataset_remedy(d, read_manifest(d))


@pytest.mark.parametrize("kw, word", [({"num_images": 0}, "--num-images"), ({"image_size": 32}, "--image-size"),
                                     ({"seed": -1}, "--seed"), ({"workers": 0}, "--workers"),
                                     ({"name": "a/b"}, "dataset name")])
def test_bad_parameters(kw, word):
    with pytest.raises(UsageError, match=word):
        generate_web_corpus(**{"num_images": 2, **kw})


def test_cli(tmp_path, capsys):
    from typer.testing import CliRunner

    from refground.cli.main import build_app, main

    assert main(["data", "synth", "--preset", "web", "--num-images", "0", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--num-images" in err and len(err.strip().splitlines()) == 1
    assert main(["data", "synth", "--preset", "photos", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and "world, web" in err and len(err.strip().splitlines()) == 1
    args = ["data", "synth", "--preset", "web", "--num-images", "6", "--image-size", "64", "--cache", str(tmp_path),
            "--workers", "1"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "web" and out["preset"] == "web" and out["images"] == 6 and out["captions"] == 12
    assert not out["skipped"] and out["vocabulary_size"] > 5
    d = tmp_path / "web" / "dataset"
    assert (d / "images" / "000006.png").is_file() and is_complete_with(d, web_params("web", 6, 0, 64))
    assert main(args + ["--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["skipped"] and "--force" in cap.err
    # A world dataset of the same numbers under the same name is not the corpus: regenerated, not reused.
    world = ["data", "synth", "--num-images", "6", "--image-size", "64", "--cache", str(tmp_path), "-d", "same",
             "--workers", "1", "--json"]
    assert main(world) == 0 and json.loads(capsys.readouterr().out)["preset"] == "world"
    assert main(args + ["-d", "same", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["skipped"]
    assert load_dataset(tmp_path / "same" / "dataset").meta["source"] == "synthetic-web"
    # The table (through the whole app, as a user runs it).
    res = CliRunner().invoke(build_app(), args + ["--seed", "1"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    assert "web corpus" in res.output and "vocabulary size" in res.output and "share of objects named with colour" in res.output
