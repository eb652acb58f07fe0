import copy
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.data import shapes
from dalle.data.config import DataConfig
from dalle.data.transforms import to_float, to_uint8
from dalle.errors import ConfigError, UserError
from dalle.evaluation.blur import gaussian_blur
from dalle.evaluation.shapes_checker import (
    CheckerConfig,
    ShapesChecker,
    connected_components,
    parse_caption,
    summarize,
)

CHECKER = ShapesChecker()


def records(n, resolution, split="val", seed=0):
    src = shapes.from_config(DataConfig(size=n, resolution=resolution, split=split, seed=seed))
    return [(np.asarray(r.load()), r.caption, r.attributes) for r in src.records()]


def accuracy(recs):
    return summarize([CHECKER.check(img, attrs) for img, _, attrs in recs])


@pytest.mark.parametrize("resolution, n", [(32, 300), (64, 200), (128, 80)])
def test_ground_truth_renders_are_judged_correct(resolution, n):
    acc = accuracy(records(n, resolution))
    assert acc["color"] >= 0.95 and acc["position"] >= 0.95 and acc["relation"] >= 0.95, acc
    assert acc["shape"] >= 0.9 and acc["size"] >= 0.9, acc


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_ground_truth_accuracy_on_500_records(resolution):
    acc = accuracy(records(500, resolution))
    assert acc["color"] >= 0.95 and acc["position"] >= 0.95 and acc["relation"] >= 0.95, acc
    assert acc["shape"] >= 0.9 and acc["all"] >= 0.9, acc


def degrade(recs, sigma=1.0, noise=0.05):
    """Reconstruction-like images: blurred, with additive Gaussian noise."""
    x = gaussian_blur(to_float(np.stack([img for img, _, _ in recs])), sigma)  # (B, 3, H, W)
    return [(img, caption, attrs) for img, (_, caption, attrs) in zip(to_uint8(x + noise * torch.randn_like(x)), recs)]


def test_still_works_on_blurred_noisy_images():
    acc = accuracy(degrade(records(200, 64)))
    assert acc["color"] >= 0.95 and acc["position"] >= 0.95 and acc["relation"] >= 0.95, acc
    assert acc["shape"] >= 0.9 and acc["all"] >= 0.85, acc


def corrupt(attrs, kind, rng):
    """The caption made false in one attribute; ``None`` where the caption does not state it."""
    attrs = copy.deepcopy(attrs)
    first = attrs["objects"][0]
    if kind == "color":
        objs = attrs["objects"]
        if len(objs) == 2 and objs[0]["color"] != objs[1]["color"]:  # swapped between the two objects
            objs[0]["color"], objs[1]["color"] = objs[1]["color"], objs[0]["color"]
        else:
            first["color"] = rng.choice([c for c in shapes.COLORS if c != first["color"]])
    elif kind == "shape":
        first["shape"] = rng.choice([s for s in shapes.SHAPES if s != first["shape"]])
    elif kind == "size":
        first["size"] = {"small": "large", "large": "small"}[first["size"]]
    elif kind == "relation":
        if attrs["relation"] is None:
            return None
        attrs["relation"] = shapes.RELATIONS[attrs["relation"]]  # "above" → "below"
    elif kind == "position":
        if attrs["relation"] is not None:
            return None
        first["position"] = rng.choice([p for p in shapes.POSITIONS if p != first["position"]])
    return attrs


@pytest.mark.parametrize("kind", ["color", "shape", "size", "position", "relation"])
def test_mismatched_captions_are_rejected(kind):
    rng = random.Random(0)
    verdicts = []
    for img, _, attrs in records(60, 64):
        wrong = corrupt(attrs, kind, rng)
        if wrong is not None:
            verdicts.append(CHECKER.check(img, wrong).all_correct)
    assert len(verdicts) >= 20 and sum(verdicts) / len(verdicts) <= 0.05


def test_captions_parse_back_to_their_attributes():
    for _, caption, attrs in records(300, 32, split="train") + records(100, 32, split="heldout"):
        parsed = parse_caption(caption)
        assert parsed["relation"] == attrs["relation"] and parsed["stated"] == attrs["stated"]
        for p, o in zip(parsed["objects"], attrs["objects"], strict=True):
            assert (p["color"], p["shape"], p["size"]) == (o["color"], o["shape"], o["size"])
            if attrs["relation"] is None:
                assert p["position"] == o["position"]
    with pytest.raises(UserError, match="not a shapes caption"):
        parse_caption("a photo of a cat")
    with pytest.raises(UserError, match="not a shapes caption"):
        parse_caption("a small red circle beside a large blue square")


def test_check_takes_a_caption_pil_image_or_float_batch():
    recs = records(6, 64)
    img, caption, attrs = recs[0]
    assert CHECKER.check(Image.fromarray(img), caption).all_correct
    batch = to_float(np.stack([r[0] for r in recs]))  # (B, 3, H, W), the evaluation convention
    results = CHECKER.check_batch(batch, [r[1] for r in recs])
    assert all(r.all_correct for r in results)
    single = next(r for r in results if r.relation is None)
    assert single.as_dict()["relation"] is None and single.position is True
    blank = np.full_like(img, 255)
    result = CHECKER.check(blank, caption)
    assert not result.color and not result.all_correct and result.found == (None,) * len(attrs["objects"])


def test_reads_objects_with_their_geometry():
    obj = shapes.Shape("green", "triangle", "large", "bottom right", 0.83, 0.8, 0.28)
    found = CHECKER.read(np.asarray(shapes.render([obj], 64)))
    assert len(found) == 1
    f = found[0]
    assert (f.color, f.shape, f.size, f.position) == ("green", "triangle", "large", "bottom right")
    assert f.cx == pytest.approx(0.83, abs=0.01) and f.cy == pytest.approx(0.8, abs=0.01)
    assert f.extent == pytest.approx(0.28, rel=0.05)


def test_two_objects_of_one_colour_are_told_apart_by_shape():
    a = shapes.Shape("red", "circle", "small", "top left", 0.17, 0.17, 0.16)
    b = shapes.Shape("red", "square", "large", "bottom", 0.5, 0.8, 0.27)
    img = np.asarray(shapes.render([a, b], 64))
    attrs = parse_caption("a small red circle above a large red square")
    assert CHECKER.check(img, attrs).all_correct
    assert not CHECKER.check(img, parse_caption("a small red square above a large red circle")).all_correct


def test_connected_components_on_a_hand_drawn_mask():
    mask = np.array([[1, 1, 0, 0, 1],
                     [0, 1, 0, 1, 1],
                     [0, 0, 0, 0, 0],
                     [1, 0, 1, 1, 1],
                     [1, 0, 1, 0, 1]], bool)
    comps = connected_components(mask)
    assert sorted(int(c.sum()) for c in comps) == [2, 3, 3, 5]
    assert sum(c.astype(int) for c in comps).tolist() == mask.astype(int).tolist()  # a partition of the mask
    assert connected_components(np.zeros((3, 3), bool)) == []


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="core_coverage"):
        CheckerConfig(core_coverage=1.5)
    with pytest.raises(ConfigError, match="template_blurs"):
        CheckerConfig(template_blurs=())
