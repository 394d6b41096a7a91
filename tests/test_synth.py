"""The synthetic world, checked by an independent oracle (tests/synth_oracle.py) that parses every
expression and evaluates it against the stored objects."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

import synth_oracle as oracle
from refground.data.model import Dataset, Image, Object, Query, Mention
from refground.data.store import image_path, load_dataset
from refground.data.synth import (CATEGORY_GROUPS, COLORS, KINDS, generate_dataset, summary, write_synthetic)
from refground.data.validate import validate_dataset
from refground.errors import UsageError
from refground.masks import decode, encode, to_bbox

GROUP_A = set(CATEGORY_GROUPS["A"])


# --------------------------------------------------------------------------------- the oracle itself
def _toy(objs: list[tuple[str, str, str, tuple[float, float, float, float], int]], size: int = 100) -> Dataset:
    """A one-image dataset; each object a square-ish mask of ``area`` pixels in its box's corner."""
    objects = []
    for k, (cat, col, sz, box, area) in enumerate(objs):
        m = np.zeros((size, size), dtype=np.uint8)
        x1, y1 = int(box[0]), int(box[1])
        side = int(round(area ** 0.5))
        m[y1:y1 + side, x1:x1 + side] = 1
        objects.append(Object(k + 1, 1, cat, box, encode(m), {"color": col, "size": sz}))
    q = Query(1, 1, "expression", "the circle", (Mention(0, 2, "referent", (1,), "circle"),))
    return Dataset.from_records("toy", [Image(1, "x.png", size, size, "train")], objects, [q])


def test_oracle_semantics_on_a_toy_scene():
    ds = _toy([
        ("circle", "red", "small", (10, 40, 20, 50), 100),     # 1: centre (15, 45)
        ("circle", "blue", "large", (50, 40, 60, 50), 81),     # 2: centre (55, 45)
        ("square", "red", "small", (30, 41, 40, 51), 16),      # 3: centre (35, 46)
        ("circle", "red", "medium", (20, 80, 30, 90), 9),      # 4: centre (25, 85)
        ("star", "green", "small", (80, 0, 90, 10), 25),       # 5: centre (85, 5)
    ])
    v = oracle.View.of(ds, 1)
    ev = lambda t: oracle.evaluate(v, t)  # noqa: E731
    assert ev("the square") == {3}
    assert ev("the circle") == {1, 2, 4}
    assert ev("a blue circle") == {2} and ev("the small red circle") == {1} and ev("an orange circle") == set()
    assert ev("the circle left of the square") == {1}
    assert ev("please find the circle that is to the right of the red square") == {2}
    assert ev("the circle below the square") == {4}
    # Chain: the circle below the square is 4; circles above 4 are 1 (dy -40, dx -10) and 2 (dy -40, dx 30).
    assert ev("the circle above the circle that is below the square") == {1, 2}
    assert ev("the red circle over the circle which is under the red square") == {1}
    assert ev("the star above the square") == set()  # |dx| 50 > |dy| 41: "right", not "above"
    assert ev("the leftmost circle") == {1} and ev("the circle on the right") == {2}
    assert ev("the upper circle") == set()  # comparative needs exactly two candidates
    assert ev("the top red circle") == {1} and ev("the lower red circle") == {4}
    assert ev("the biggest circle") == set()  # 100 vs 81: ratio below 1.5
    assert ev("the smallest circle") == {4} and ev("the bigger red circle") == {1}
    assert oracle.kind_of(oracle.parse_expression("the circle over the square that is left of the star")) \
        == "relation2"
    for bad in ("circle", "the circle left", "the red", "a orange circle", "the circle that is the star",
                "the circle on the left of the square"):
        with pytest.raises(oracle.ParseError):
            oracle.parse_expression(bad)
    # Margin: two circles whose centres differ by less than 8% of the width are not "leftmost".
    close = _toy([("circle", "red", "small", (10, 10, 20, 20), 50), ("circle", "red", "small", (15, 30, 25, 40), 50)])
    assert oracle.evaluate(oracle.View.of(close, 1), "the leftmost circle") == set()
    assert oracle.evaluate(oracle.View.of(close, 1), "the top circle") == {1}
    # Distance: beyond half the diagonal there is no relation.
    far = _toy([("circle", "red", "small", (0, 0, 4, 4), 9), ("square", "red", "small", (90, 2, 94, 6), 9)])
    assert oracle.evaluate(oracle.View.of(far, 1), "the circle left of the square") == set()
    phrases, links = oracle.parse_caption("there is a red square right of two circles and a star")
    assert [oracle.evaluate_phrase(v, p) for p in phrases] == [{3}, set(), {5}]  # three circles, not two
    assert oracle.evaluate_phrase(v, oracle.parse_caption("two red circles and three circles")[0][0]) == {1, 4}
    assert links == [(0, "right", "right of", 1)]


# --------------------------------------------------------------------------------- generated data
@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Dataset:
    d = tmp_path_factory.mktemp("synth") / "dataset"
    write_synthetic(d, num_images=60, image_size=96, seed=3, workers=1)
    return load_dataset(d)


@pytest.fixture(scope="module")
def large() -> Dataset:
    return generate_dataset(num_images=400, image_size=128, seed=11, workers=1)


def _check_expressions(ds: Dataset) -> Counter:
    views: dict[int, oracle.View] = {}
    kinds: Counter = Counter()
    for q in ds.queries(task="expression"):
        v = views.setdefault(q.image_id, oracle.View.of(ds, q.image_id))
        head = oracle.parse_expression(q.text)
        sat = oracle.evaluate_phrase(v, head)
        assert sat == {q.referent_object_id}, (q.id, q.text, sat, q.referent_object_id)
        assert oracle.kind_of(head) == q.kind, (q.text, q.kind)
        kinds[q.kind] += 1
        chain = head.chain()
        # Mentions: the referent head then each landmark, spans exactly the parsed phrases.
        assert [(m.start, m.end) for m in q.mentions] == [(p.start, p.end) for p in chain], q.text
        assert [m.role for m in q.mentions] == ["referent"] + ["context"] * (len(chain) - 1)
        assert [m.type for m in q.mentions] == [p.noun for p in chain]
        for m, p in zip(q.mentions, chain):
            assert len(m.object_ids) == 1 and v.get(m.object_ids[0]).category == p.noun
            assert oracle.evaluate_phrase(v, p) == set(m.object_ids), (q.text, p)
        assert [(r.subject, r.object) for r in q.relations] == [(i, i + 1) for i in range(len(chain) - 1)]
        assert [r.predicate for r in q.relations] == [p.clause[1] for p in chain[:-1]]
        # What the expression needs, it needs.
        n_head = len(oracle.base_set(v, head))
        if q.kind == "category":
            assert n_head == 1
        elif q.kind == "attribute":
            assert len(oracle.base_set(v, oracle.Phrase(0, 0, head.noun))) >= 2
        else:
            assert n_head >= 2, q.text  # location, size and relations single out one of several
        if q.kind == "relation2":
            assert len(oracle.base_set(v, chain[1])) >= 2, q.text
    return kinds


def test_every_expression_denotes_exactly_its_referent(sample):
    kinds = _check_expressions(sample)
    assert set(kinds) == set(KINDS)


def test_large_sample_kind_shares_and_oracle(large):
    s = summary(large)
    n = s["expressions"]
    assert 9.0 <= s["objects_per_image"]["mean"] <= 11.0
    assert s["objects_per_image"]["min"] >= 4 and s["objects_per_image"]["max"] <= 20
    assert 5.5 <= n / s["images"] <= 9.0
    assert s["relation_share"] >= 0.30 and s["second_order_share"] >= 0.10
    assert all(s["expressions_by_kind"][k] >= 0.03 * n for k in KINDS)
    kinds = _check_expressions(large)
    assert sum(kinds.values()) == n
    # About three referents per image, 2-3 expressions each, sharing a group id.
    per_group = Counter(large.query_groups[large.query_tasks == 0].tolist())
    assert set(per_group.values()) <= {1, 2, 3} and np.mean(list(per_group.values())) >= 2.0
    assert 2.0 <= len(per_group) / s["images"] <= 3.0


OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under",
            "under": "over", "beneath": "above", "leftmost": "rightmost", "rightmost": "leftmost", "top": "bottom",
            "bottom": "top", "topmost": "bottommost", "bottommost": "topmost", "lowest": "topmost", "upper": "lower",
            "lower": "upper", "biggest": "smallest", "largest": "smallest", "smallest": "biggest",
            "bigger": "smaller", "larger": "smaller", "smaller": "bigger"}


def test_flipping_the_decisive_word_loses_the_referent(large):
    """Mutation check of generator and oracle together: the opposite relation, location or size word
    never denotes the referent alone (the referent satisfies its relation clearly, so not the opposite)."""
    views: dict[int, oracle.View] = {}
    flipped = 0
    for q in large.queries(task="expression"):
        if q.kind not in ("location", "size", "relation1", "relation2"):
            continue
        tokens = q.tokens
        ref = q.mentions[0]
        if q.kind in ("location", "size"):
            span = range(ref.start, ref.end)
        else:  # the first relation's words follow the referent's phrase (after an optional connector)
            span = range(ref.end, q.mentions[1].start)
        k = next(i for i in span if tokens[i] in OPPOSITE)
        mutated = " ".join(tokens[:k] + [OPPOSITE[tokens[k]]] + tokens[k + 1:])
        v = views.setdefault(q.image_id, oracle.View.of(large, q.image_id))
        assert oracle.evaluate(v, mutated) != {q.referent_object_id}, (q.text, mutated)
        flipped += 1
    assert flipped > 1000


def test_masks_boxes_and_objects(sample):
    validate_dataset(sample)
    for im in sample.images():
        objs = sample.objects_of(im.id)
        assert 4 <= len(objs) <= 20
        cover = np.zeros((im.height, im.width), dtype=np.int32)
        for o in objs:
            m = decode(o.mask)
            cover += m
            assert o.mask["size"] == [im.height, im.width]
            assert np.allclose(to_bbox(o.mask), o.box, atol=1.0) and to_bbox(o.mask) == o.box
            assert o.attributes["color"] in COLORS and o.attributes["size"] in ("small", "medium", "large")
            assert all(float(v).is_integer() for v in o.box)
        assert cover.max() <= 1  # a pixel belongs to at most one object
    # Same-category distractors are common: most images have a category shared by two or more objects.
    shared = [max(Counter(o.category for o in sample.objects_of(i)).values()) >= 2 for i in sample.image_ids]
    assert np.mean(shared) >= 0.8


def test_rendered_pixels_match_masks(sample):
    names, rgbs = list(COLORS), np.array(list(COLORS.values()), dtype=np.float64)
    for image_id in sample.image_ids[:6].tolist():
        img = np.asarray(PILImage.open(image_path(sample, image_id)).convert("RGB"), dtype=np.float64)
        assert img.shape == (96, 96, 3)
        for o in sample.objects_of(image_id):
            mean = img[decode(o.mask)].mean(axis=0)
            # Shading and outline darken; compare chromaticity to the named colours.
            chroma = lambda c: c / max(np.linalg.norm(c), 1e-6)  # noqa: E731
            best = names[int(np.argmin([np.linalg.norm(chroma(mean) - chroma(c)) for c in rgbs]))]
            assert best == o.attributes["color"], (image_id, o.id)


def test_default_size_images(tmp_path):
    ds = generate_dataset(num_images=3, image_size=256, seed=1, image_dir=tmp_path, workers=1)
    small = generate_dataset(num_images=3, image_size=96, seed=1, workers=1)
    for i, im in enumerate(ds.images()):
        assert im.file == f"{i + 1:06d}.png" and (im.width, im.height) == (256, 256)
        with PILImage.open(tmp_path / im.file) as f:
            assert f.size == (256, 256) and f.mode == "RGB"
        for o in ds.objects_of(im.id):
            assert to_bbox(o.mask) == o.box and o.mask["size"] == [256, 256]
    # Object sizes scale with the image: same scenes at 96 px have boxes about 96/256 as large.
    w256 = np.median(ds.object_boxes[:, 2] - ds.object_boxes[:, 0])
    w96 = np.median(small.object_boxes[:, 2] - small.object_boxes[:, 0])
    assert 0.3 < w96 / w256 < 0.45


def test_captions(sample):
    caps = sample.queries(task="caption")
    assert len(caps) >= 2.5 * sample.num_images
    n_phrases = Counter()
    for q in caps:
        v = oracle.View.of(sample, q.image_id)
        phrases, links = oracle.parse_caption(q.text)
        assert 2 <= len(phrases) <= 4 and q.kind == "caption" and q.group == -1
        n_phrases[len(phrases)] += 1
        assert [(m.start, m.end) for m in q.mentions] == [(p.start, p.end) for p in phrases]
        assert all(m.role == "referent" for m in q.mentions)
        linked = [set(m.object_ids) for m in q.mentions]
        link_of = {s: (rel, words, o) for s, rel, words, o in links}
        for k, (m, p, ids) in enumerate(zip(q.mentions, phrases, linked)):
            if m.kind == "needs-relation":  # its head alone is ambiguous: it denotes its object with its relation
                rel, words, o = link_of[k]
                p = oracle.Phrase(p.start, p.end, p.noun, p.colour, p.size, clause=(rel, words, phrases[o]))
            assert oracle.evaluate_phrase(v, p) == ids and m.type == p.noun, (q.text, p)
            assert all(sample.object(i).image_id == q.image_id for i in ids)
        assert all(not (a & b) for k, a in enumerate(linked) for b in linked[k + 1:])
        assert [(r.subject, r.predicate, r.object) for r in q.relations] == [(s, w, o) for s, _, w, o in links]
        for s, rel, _, o in links:
            assert all(oracle.relation_holds(v, rel, v.get(a), v.get(b)) for a in linked[s] for b in linked[o])
    assert set(n_phrases) == {2, 3, 4}
    assert any(len(m.object_ids) > 1 for q in caps for m in q.mentions)  # "two blue stars"


def test_splits(sample, large):
    for ds, n in ((sample, 60), (large, 400)):
        counts = Counter(ds.image_splits)
        assert counts == {"train": round(0.7 * n), "val": round(0.1 * n), "testA": round(0.1 * n),
                          "testB": n - round(0.7 * n) - 2 * round(0.1 * n)}
        split_of = dict(zip(ds.image_ids.tolist(), ds.image_splits))
        for q in ds.queries():
            assert q.split == split_of[q.image_id]
            if q.task == "expression" and q.split in ("testA", "testB"):
                cat = ds.object(q.referent_object_id).category
                assert (cat in GROUP_A) == (q.split == "testA"), (q.split, cat)
        assert set(ds.meta["category_groups"]["A"]) == GROUP_A
        assert ds.meta["testA_group"] == "A" and ds.meta["testB_group"] == "B"
        assert len(ds.queries("testA", "expression")) > 0 and len(ds.queries("testB", "expression")) > 0
    assert "image_root" not in json.loads((Path(sample.meta["image_root"]).parent / "annotations" / "meta.json")
                                          .read_text())["meta"]
    voc = sample.meta["vocabulary"]
    assert len(voc["categories"]) == 8 and len(voc["colors"]) == 8 and voc["sizes"] == ["small", "medium", "large"]
    assert sample.meta["generator"]["params"]["num_images"] == 60


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and p.name != "manifest.json"}


def test_deterministic_and_independent_of_workers(tmp_path):
    a = write_synthetic(tmp_path / "a", num_images=20, image_size=64, seed=5, workers=1)
    write_synthetic(tmp_path / "b", num_images=20, image_size=64, seed=5, workers=2)
    write_synthetic(tmp_path / "c", num_images=20, image_size=64, seed=6, workers=1)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert any(k.startswith("annotations/") for k in fa) and any(k.startswith("images/") for k in fa)
    assert fa == fb  # byte-identical annotations and images, whatever the worker count
    ann = [k for k in fa if k.startswith("annotations/")]
    assert any(fa[k] != fc.get(k) for k in ann)
    assert fa["annotations/query_texts.json"] != fc["annotations/query_texts.json"]
    # Annotations do not depend on whether pixels are rendered.
    assert generate_dataset(num_images=20, image_size=64, seed=5, workers=1).to_json_records() == a.to_json_records()
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["complete"] and man["params"]["seed"] == 5 and "workers" not in man["params"]


@pytest.mark.parametrize("kw, word", [({"num_images": 0}, "--num-images"), ({"image_size": 32}, "--image-size"),
                                     ({"seed": -1}, "--seed"), ({"workers": 0}, "--workers"),
                                     ({"split_fractions": (0.5, 0.5, 0.5, 0.0)}, "split fractions")])
def test_bad_parameters(kw, word):
    with pytest.raises(UsageError, match=word):
        generate_dataset(**{"num_images": 2, **kw})


def test_cli(tmp_path, capsys):
    from refground.cli.main import main

    assert main(["data", "synth", "--num-images", "0", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--num-images" in err and len(err.strip().splitlines()) == 1
    assert main(["data", "synth", "--image-size", "63", "--cache", str(tmp_path)]) == 2
    assert "--image-size" in capsys.readouterr().err
    args = ["data", "synth", "--num-images", "6", "--image-size", "64", "--cache", str(tmp_path), "-d", "tiny",
            "--workers", "1", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 6 and not out["skipped"] and out["expressions"] == sum(out["expressions_by_kind"].values())
    assert (tmp_path / "tiny" / "dataset" / "images" / "000006.png").is_file()
    assert main(args) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["skipped"] and "--force" in cap.err
    assert main(args + ["--force"]) == 0
    assert not json.loads(capsys.readouterr().out)["skipped"]
    assert main(args[:-1] + ["--seed", "1"]) == 0  # other parameters: regenerated, table output
    cap = capsys.readouterr()
    assert "expressions" in cap.out and "skipping" not in cap.err
    assert load_dataset(tmp_path / "tiny" / "dataset").meta["generator"]["params"]["seed"] == 1
