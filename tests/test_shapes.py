import argparse
import itertools
import math
import re

import numpy as np
import pytest

from dalle.config import add_options, from_args
from dalle.data import shapes
from dalle.data.config import DataConfig
from dalle.data.registry import open_source
from dalle.errors import ConfigError

HELDOUT_WITH_TRIPLE = ("red triangle", "blue circle", "green square above pink cross")


def source(**kw):
    kw.setdefault("size", 300)
    return shapes.from_config(DataConfig(**kw))


def pairs_of(record):
    return [(o["color"], o["shape"]) for o in record.attributes["objects"]]


def centre(obj):
    x0, y0, x1, y1 = obj["bbox"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def test_vocabulary_is_distinct_and_registered():
    for (a, ca), (b, cb) in itertools.combinations(shapes.COLORS.items(), 2):
        assert math.dist(ca, cb) > 100, (a, b)
    assert all(math.dist(c, shapes.BACKGROUND) > 140 for c in shapes.COLORS.values())
    assert len(shapes.POSITIONS) == 9 and set(shapes.RELATIONS) == {"above", "below", "left of", "right of"}
    assert isinstance(open_source(DataConfig(size=4)), shapes.ShapesSource)


def test_same_seed_same_records_and_pixels():
    a, b = list(source(size=20).records()), list(source(size=20).records())
    assert [r.caption for r in a] == [r.caption for r in b]
    assert [r.attributes for r in a] == [r.attributes for r in b]
    for ra, rb in zip(a, b):
        assert np.array_equal(np.asarray(ra.load()), np.asarray(rb.load()))
    other = list(source(size=20, seed=1).records())
    assert [r.caption for r in other] != [r.caption for r in a]


def test_splits_differ():
    train, val = source(size=20, split="train"), source(size=20, split="val")
    assert [r.caption for r in train.records()] != [r.caption for r in val.records()]


@pytest.mark.parametrize("num_shards", [2, 3, 7])
def test_any_shard_layout_gives_the_same_records(num_shards):
    src = source(size=50)
    whole = {r.key: (r.caption, r.attributes) for r in src.records()}
    sharded = {}
    for shard in range(num_shards):
        for r in src.records(shard, num_shards):
            assert int(r.key.rsplit("/", 1)[1]) % num_shards == shard
            assert r.key not in sharded
            sharded[r.key] = (r.caption, r.attributes)
    assert sharded == whole and len(whole) == 50


@pytest.mark.parametrize("split", ["train", "val"])
def test_heldout_combinations_never_in_train_or_val(split):
    heldout = shapes.parse_heldout(HELDOUT_WITH_TRIPLE)
    src = source(size=3000, split=split, shapes_heldout=HELDOUT_WITH_TRIPLE, shapes_two_object_fraction=0.7)
    n_relations = 0
    for r in src.records():
        assert not set(pairs_of(r)) & {("red", "triangle"), ("blue", "circle")}, r.caption
        assert r.attributes["heldout"] == []
        if r.attributes["relation"]:
            n_relations += 1
            (a, b), rel = pairs_of(r), r.attributes["relation"]
            assert shapes.canonical_triple(a, rel, b) not in heldout[1], r.caption
    assert n_relations > 1500


def test_every_heldout_record_contains_a_heldout_combination():
    src = source(size=400, split="heldout", shapes_heldout=HELDOUT_WITH_TRIPLE)
    seen = set()
    for r in src.records():
        found = r.attributes["heldout"]
        assert found, r.caption
        for item in found:
            seen.add(item)
            words = item.split()
            if len(words) == 2:
                assert tuple(words) in pairs_of(r)
            else:
                (a, b), rel = pairs_of(r), r.attributes["relation"]
                assert shapes.canonical_triple(a, rel, b) == ((words[0], words[1]), "above", (words[-2], words[-1]))
    assert seen == {"red triangle", "blue circle", "green square above pink cross"}


def test_empty_heldout_set_is_allowed_for_training_but_not_for_the_heldout_split():
    assert all(not r.attributes["heldout"] for r in source(size=50, shapes_heldout=()).records())
    with pytest.raises(ConfigError, match="shapes_heldout"):
        source(split="heldout", shapes_heldout=())


def expected_caption(attrs):
    """An independent reading of the caption from the attributes: which phrases it must contain, in order."""
    objs = attrs["objects"]
    phrases = [f"a {o['size']} {o['color']} {o['shape']}" for o in objs]
    if attrs["relation"] is None:
        where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom", "left": "on the left",
                 "right": "on the right"}.get(objs[0]["position"], f"in the {objs[0]['position']}")
        return rf"^(there is |a picture of )?{phrases[0]} {where}( of the image)?$"
    rel = {"left of": "to the left of", "right of": "to the right of"}.get(attrs["relation"], attrs["relation"])
    return rf"^(there is )?{phrases[0]} (is )?{rel} {phrases[1]}$"


def test_captions_match_attributes_and_vary():
    records = list(source(size=400).records()) + list(source(size=200, split="heldout").records())
    for r in records:
        assert re.match(expected_caption(r.attributes), r.caption), (r.caption, r.attributes)
        assert r.attributes["stated"][-1] == ("position" if r.attributes["relation"] is None else "relation")
        for o in r.attributes["objects"]:
            assert tuple(o["rgb"]) == shapes.COLORS[o["color"]]
    relations = {r.attributes["relation"] for r in records}
    assert relations == {None, "above", "below", "left of", "right of"}
    starts = {r.caption.split()[0] for r in records}
    assert {"a", "there"} <= starts and any(" is " in r.caption for r in records)


def test_relations_and_positions_are_geometrically_true():
    for r in source(size=1000, shapes_two_object_fraction=0.6).records():
        objs = r.attributes["objects"]
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            row, col = shapes.POSITIONS[o["position"]]
            cx, cy = centre(o)
            assert col / 3 <= cx <= (col + 1) / 3 and row / 3 <= cy <= (row + 1) / 3, (o, r.caption)
        widths = {o["size"]: o["bbox"][2] - o["bbox"][0] for o in objs}
        assert widths.get("small", 0) < 0.2 and widths.get("large", 1) > 0.26
        if r.attributes["relation"] is None:
            continue
        (ax, ay), (bx, by) = centre(objs[0]), centre(objs[1])
        # Offset of the first object from the second along the relation's axis, and across it.
        along, across = {"above": (by - ay, ax - bx), "below": (ay - by, ax - bx),
                         "left of": (bx - ax, ay - by), "right of": (ax - bx, ay - by)}[r.attributes["relation"]]
        assert along > 0.15 and along > abs(across), r.caption


@pytest.mark.parametrize("resolution", [32, 64, 96])
def test_renders_at_any_resolution_and_pixels_match_attributes(resolution):
    src = source(size=40, resolution=resolution)
    assert [r.caption for r in src.records()] == [r.caption for r in source(size=40).records()]
    for r in src.records():
        img = r.load()
        assert img.size == (resolution, resolution) and img.mode == "RGB"
        pixels = np.asarray(img).astype(int)  # (H, W, 3)
        for o in r.attributes["objects"]:
            cx, cy = centre(o)
            at_centre = pixels[int(cy * resolution), int(cx * resolution)]
            assert np.abs(at_centre - o["rgb"]).max() <= 40, (r.caption, o, at_centre)
        outside = np.ones((resolution, resolution), bool)  # pixels at least one pixel clear of every bbox
        for o in r.attributes["objects"]:
            x0, y0, x1, y1 = (round(v * resolution) for v in o["bbox"])
            outside[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = False
        assert (pixels[outside] == shapes.BACKGROUND).all()


@pytest.mark.parametrize("entries, message", [
    (("mauve triangle",), "unknown colour 'mauve'"),
    (("red hexagon",), "unknown shape 'hexagon'"),
    (("red",), "expected 'COLOUR SHAPE'"),
    (("red circle beside blue square",), "RELATION one of"),
    (("red circle above red circle",), "two different objects"),
    (tuple(f"{c} {s}" for c in shapes.COLORS for s in shapes.SHAPES)[1:], "at least 2 must remain"),
])
def test_bad_heldout_entries_raise_config_error_naming_the_field(entries, message):
    with pytest.raises(ConfigError, match=message) as info:
        DataConfig(shapes_heldout=entries)
    assert info.value.field == "shapes_heldout"


def test_bad_two_object_fraction():
    with pytest.raises(ConfigError, match="shapes_two_object_fraction"):
        DataConfig(shapes_two_object_fraction=1.5)


def test_heldout_entries_are_normalised():
    pairs, triples = shapes.parse_heldout(["Red_Triangle", "pink cross to the right of green square"])
    assert pairs == {("red", "triangle")}
    assert triples == {(("green", "square"), "left of", ("pink", "cross"))}


def test_heldout_option_from_the_command_line():
    parser = argparse.ArgumentParser()
    add_options(parser, DataConfig)
    args = parser.parse_args(["--shapes-heldout", "green cross", "red circle left of blue square"])
    cfg = from_args(DataConfig, args)
    assert cfg.shapes_heldout == ("green cross", "red circle left of blue square")
    assert shapes.from_config(cfg).heldout_triples == {(("red", "circle"), "left of", ("blue", "square"))}
