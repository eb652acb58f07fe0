"""The shapes checker on dVAE round trips: what share of validation images keeps its colours, shapes, sizes and places
after encode → argmax codes → decode. Samples are decoded from codes, so this bounds what any prior can draw.

    PYTHONPATH= .venv/bin/python bench/dvae_roundtrip.py runs/demo/dvae/model [more models ...] [--images 200]
        [--split val|heldout] [--by-shape] [--by-pair]

Prints one row per model (PSNR, codes used, the checker's rates); the images are the first ``--images`` records of
the shapes validation split (or ``--split heldout``) at the model's resolution (seed 0, as `dalle pipeline` draws
them). ``--by-shape`` adds, per model, how many of the stated objects of each size and shape came back as that shape.
``--by-pair`` does the same for the default held-out colour-shape pairs, next to the objects of the same shape in
other colours: a dVAE is trained without the held-out pairs too, and this shows what that costs their round trip.
"""

from __future__ import annotations

import argparse
import collections
import itertools
from pathlib import Path

import numpy as np
import torch

from dalle.data import shapes
from dalle.data.config import DataConfig
from dalle.data.pipeline import iter_samples
from dalle.data.registry import open_source
from dalle.errors import UserError
from dalle.evaluation.metrics import reconstruction_metrics
from dalle.evaluation.shapes_checker import ShapesChecker, summarize
from dalle.models.dvae import DVAE

ASPECTS = ("color", "shape", "size", "position", "relation", "all")


def split_images(resolution: int, n: int, split: str = "val") -> tuple[np.ndarray, list]:
    cfg = DataConfig(source="shapes", split=split, resolution=resolution, seed=0)
    samples = list(itertools.islice(iter_samples(open_source(cfg).records(), cfg), n))
    return np.stack([s.image for s in samples]), [s.attributes for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="dVAE model directories")
    parser.add_argument("--images", type=int, default=200, help="images per model, the first of the split")
    parser.add_argument("--split", choices=("val", "heldout"), default="val", help="shapes split of the images")
    parser.add_argument("--by-shape", action="store_true", help="also count kept shapes per size and shape")
    parser.add_argument("--by-pair", action="store_true", help="also count kept shapes of the held-out colour-shape "
                        "pairs, and of their shapes in the other colours")
    args = parser.parse_args()
    torch.set_num_threads(2)
    checker, cache, by_shape, by_pair = ShapesChecker(), {}, [], []
    print(f"| model | {args.split} PSNR | codes used | " + " / ".join(ASPECTS) + " |")
    print("| --- | ---: | ---: | --- |")
    for path in args.models:
        dvae = DVAE.from_pretrained(path, "cpu").eval()
        resolution = dvae.config.resolution
        if resolution not in cache:
            cache[resolution] = split_images(resolution, args.images, args.split)
        images, attributes = cache[resolution]
        stats, recons = reconstruction_metrics(dvae, images)
        results = [checker.check(image, a) for image, a in zip(recons, attributes)]
        rates = summarize(results)
        cells = " / ".join("-" if rates.get(a) is None else f"{rates[a]:.1%}" for a in ASPECTS)
        print(f"| {path} | {stats['psnr_db']:.1f} | {stats['codes_used']} | {cells} |", flush=True)
        if args.by_shape:
            by_shape.append((path, kept_shapes(results, attributes)))
        if args.by_pair:
            by_pair.append((path, kept_shapes(results, attributes, by_color=True)))
    for path, kept in by_shape:
        print(f"\nshapes kept by {path} (objects that came back as their stated shape / objects stated):\n")
        print("| size | " + " | ".join(shapes.SHAPES) + " | all |")
        print("| --- |" + " ---: |" * (len(shapes.SHAPES) + 1))
        for size in shapes.SIZES:
            counts = [kept[size, shape] for shape in shapes.SHAPES]
            total = [sum(c[0] for c in counts), sum(c[1] for c in counts)]
            print(f"| {size} | " + " | ".join(f"{k}/{n}" for k, n in counts + [total]) + " |")
    for path, kept in by_pair:
        print_pairs(path, kept, args.split)


def print_pairs(path: Path, kept: dict, split: str) -> None:
    pairs = [entry.split() for entry in DataConfig().shapes_heldout if len(entry.split()) == 2]
    print(f"\nheld-out pairs' shapes kept by {path} ({split} images; kept / stated):\n")
    print("| pair | size | the pair | its shape in other colours |")
    print("| --- | --- | ---: | ---: |")
    for color, shape in pairs:
        for size in shapes.SIZES:
            own = kept[size, shape, color]
            others = [sum(kept[size, shape, c][i] for c in shapes.COLORS if c != color) for i in (0, 1)]
            print(f"| {color} {shape} | {size} | {own[0]}/{own[1]} | {others[0]}/{others[1]} |")


def kept_shapes(results: list, attributes: list, by_color: bool = False) -> dict:
    """(size, shape) → [objects read back as that shape, objects stated]; (size, shape, colour) with ``by_color``."""
    kept: dict = collections.defaultdict(lambda: [0, 0])
    for result, attrs in zip(results, attributes):
        for stated, found in zip(attrs["objects"], result.found):
            key = (stated["size"], stated["shape"]) + ((stated["color"],) if by_color else ())
            cell = kept[key]
            cell[0] += found is not None and found.shape == stated["shape"]
            cell[1] += 1
    return kept


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"dvae_roundtrip: {err}") from None
