"""Which data to read and how to filter it: the options shared by every command that reads a dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dalle.config import check, option
from dalle.data.images import DEFAULT_MAX_PIXELS

SPLITS = ("train", "val", "heldout")


@dataclasses.dataclass
class DataConfig:
    source: str = option("shapes", "built-in dataset (shapes, emoji, openmoji, fashion-mnist) or a path: a folder "
                         "of images with same-named .txt captions, a .jsonl/.csv/.tsv/.json manifest (path + caption), "
                         "WebDataset .tar shards (a file, a folder of them or a brace pattern like "
                         "data-{000..009}.tar), or a COCO captions_*.json")
    split: str = option("train", "which split to read; 'heldout' holds the combinations kept out of training "
                        "(shapes, emoji)", choices=SPLITS)
    resolution: int = option(64, "side of the square image in pixels after resize and crop")
    crop: str = option("center", "square crop after resizing the shorter side", choices=("center", "random"))
    seed: int = option(0, "seed of procedural data, splits and random crops")
    size: int | None = option(None, "number of records to read (shapes: images generated per split, default 20000 "
                              "train / 1000 val and heldout); default: all")
    val_fraction: float = option(0.02, "fraction of a user dataset's records (chosen by a hash of their key) that "
                                 "form the 'val' split")
    image_root: Path | None = option(None, "COCO: folder with the images (default: guessed next to the JSON file)")
    min_caption_words: int = option(1, "skip captions with fewer words")
    max_caption_chars: int | None = option(None, "skip captions longer than this many characters")
    max_aspect_ratio: float | None = option(None, "skip images whose long side / short side exceeds this "
                                            "(the paper filters at 2)")
    min_image_side: int | None = option(None, "skip images whose shorter side is below this many pixels")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "decompression-bomb guard: skip images with more pixels than this")
    decoded_memory_mb: int = option(1024, "MiB of resized images a training stream keeps so that later epochs do not "
                                    "decode them again (shared by its data-loading processes; 0 = decode every time)")
    shapes_heldout: tuple[str, ...] = option(("red triangle", "blue circle", "yellow square"), "shapes: "
                                             "combinations kept out of train/val that form the 'heldout' split, each "
                                             "'COLOUR SHAPE' or 'COLOUR SHAPE RELATION COLOUR SHAPE' (e.g. 'red "
                                             "circle above blue square')")
    shapes_two_object_fraction: float = option(0.5, "shapes: fraction of images with two objects in a spatial "
                                               "relation (the rest hold one object)")

    @property
    def decode_side(self) -> int:
        """Side a large JPEG may be decoded down to (see :func:`dalle.data.images.open_image`): three times the
        resolution, where the resize's box pre-shrink would take it anyway, and never under ``min_image_side``, so the
        size filter decides as it would at full size."""
        return max(3 * self.resolution, self.min_image_side or 0)

    def __post_init__(self) -> None:
        check(self.split in SPLITS, self, "split", f"must be one of {', '.join(SPLITS)}")
        check(self.resolution >= 8, self, "resolution", "must be at least 8")
        check(self.crop in ("center", "random"), self, "crop", "must be 'center' or 'random'")
        check(self.size is None or self.size > 0, self, "size", "must be positive")
        check(0.0 <= self.val_fraction < 1.0, self, "val_fraction", "must be in [0, 1)")
        check(self.min_caption_words >= 0, self, "min_caption_words", "must be >= 0")
        check(self.max_caption_chars is None or self.max_caption_chars > 0, self, "max_caption_chars",
              "must be positive")
        check(self.max_aspect_ratio is None or self.max_aspect_ratio >= 1.0, self, "max_aspect_ratio",
              "must be >= 1")
        check(self.max_pixels > 0, self, "max_pixels", "must be positive")
        check(self.decoded_memory_mb >= 0, self, "decoded_memory_mb", "must be >= 0")
        check(0.0 <= self.shapes_two_object_fraction <= 1.0, self, "shapes_two_object_fraction", "must be in [0, 1]")
        self.shapes_heldout = tuple(self.shapes_heldout)
        if self.source == "shapes":
            from dalle.data.shapes import check_options  # imported here: shapes imports this module

            check_options(self)
        if self.image_root is not None:
            self.image_root = Path(self.image_root)
