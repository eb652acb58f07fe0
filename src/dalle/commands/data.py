"""``dalle data stats`` and ``dalle data preview``: look at a dataset before training on it.

``stats`` streams a split through the same pipeline as training (:func:`dalle.data.pipeline.iter_samples`) and reports
what is kept and skipped (and why), caption lengths and the original image sizes. ``preview`` draws a grid of samples
*after* preprocessing, at the model's resolution, so what you see is what the model sees.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dalle.cli import add_group
from dalle.config import add_options, check, from_args, option
from dalle.data.config import DataConfig
from dalle.data.pipeline import iter_samples
from dalle.data.records import Record, Sample, SkipStats
from dalle.data.registry import open_source
from dalle.errors import UserError

HIST_BINS = 8
BAR_WIDTH = 40
MIN_CELL = 128  # preview images are upscaled by a whole factor (nearest) to at least this many pixels
PAD = 6
FONT_SIZE = 11
LINE_HEIGHT = FONT_SIZE + 3
CAPTION_LINES = 4


@dataclasses.dataclass
class StatsOptions:
    limit: int | None = option(None, "stop after reading this many records (default: the whole split)")
    json: bool = option(False, "print machine-readable JSON instead of text")

    def __post_init__(self) -> None:
        check(self.limit is None or self.limit > 0, self, "limit", "must be positive")


@dataclasses.dataclass
class PreviewOptions:
    out: Path = option(Path("preview.png"), "PNG file to write the grid to")
    n: int = option(16, "number of samples to show")
    cols: int = option(4, "samples per row")

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        check(self.n > 0, self, "n", "must be positive")
        check(self.cols > 0, self, "cols", "must be positive")


# ------------------------------------------------------------------------------------------------------------ stats

def describe(values: Sequence[float]) -> dict[str, float]:
    """min / median / p95 / max / mean of a non-empty sequence."""
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max()), "mean": float(a.mean())}


def histogram(values: Sequence[int], bins: int = HIST_BINS) -> list[dict[str, int]]:
    """Counts in at most ``bins`` integer ranges ``[lo, hi]`` covering min..max."""
    lo, hi = int(min(values)), int(max(values))
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = collections.Counter((v - lo) // width for v in values)
    return [{"lo": lo + i * width, "hi": min(hi, lo + (i + 1) * width - 1), "count": counts.get(i, 0)}
            for i in range((hi - lo) // width + 1)]


def _with_size_probe(records: Iterable[Record], sizes: list[tuple[int, int]]) -> Iterator[Record]:
    """Records whose ``load`` also notes the decoded image's original size (before any resize)."""
    def probed(load: Callable[[], Image.Image]) -> Callable[[], Image.Image]:
        def load_and_measure() -> Image.Image:
            img = load()
            sizes.append(img.size)
            return img
        return load_and_measure

    for record in records:
        yield dataclasses.replace(record, load=probed(record.load))


def _nothing_left(cfg: DataConfig, stats: SkipStats) -> UserError:
    reasons = ", ".join(f"{n} × {r}" for r, n in stats.reasons.most_common(4))
    return UserError(f"{cfg.source} ({cfg.split} split) yields no usable record: {stats.seen} read"
                     + (f", skipped: {reasons}" if reasons else ""))


def collect_stats(cfg: DataConfig, limit: int | None = None) -> dict[str, Any]:
    """Stream a split through the training pipeline and summarise it (raises :class:`UserError` if nothing is
    usable)."""
    sizes: list[tuple[int, int]] = []
    records: Iterable[Record] = _with_size_probe(open_source(cfg).records(), sizes)
    if limit is not None:
        records = itertools.islice(records, limit)
    stats = SkipStats()
    words, chars = [], []
    for sample in iter_samples(records, cfg, stats):
        words.append(len(sample.caption.split()))
        chars.append(len(sample.caption))
    if not words:
        raise _nothing_left(cfg, stats)
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    aspect = [max(w, h) / min(w, h) for w, h in sizes]
    common = collections.Counter(f"{w}x{h}" for w, h in sizes).most_common(5)
    return {
        "source": cfg.source, "split": cfg.split, "limit": limit, "records": stats.to_dict(),
        "caption_words": {**describe(words), "histogram": histogram(words)},
        "caption_chars": {**describe(chars), "histogram": histogram(chars)},
        "image_sizes": {"decoded": len(sizes), "width": describe(widths), "height": describe(heights),
                        "aspect_ratio": describe(aspect), "most_common": dict(common)},
        "summary": stats.summary(),
    }


def _dist_line(label: str, d: dict[str, float], unit: str = "") -> str:
    def fmt(v: float) -> str:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"
    return (f"{label:<16} min {fmt(d['min'])}{unit}  median {fmt(d['median'])}{unit}  p95 {fmt(d['p95'])}{unit}  "
            f"max {fmt(d['max'])}{unit}")


def _hist_lines(hist: list[dict[str, int]]) -> list[str]:
    top = max(b["count"] for b in hist) or 1
    lines = []
    for b in hist:
        span = f"{b['lo']}" if b["lo"] == b["hi"] else f"{b['lo']}-{b['hi']}"
        lines.append(f"  {span:>11} | {'#' * math.ceil(BAR_WIDTH * b['count'] / top):<{BAR_WIDTH}} {b['count']}")
    return lines


def format_stats(s: dict[str, Any]) -> str:
    sizes = s["image_sizes"]
    lines = [f"{s['source']} ({s['split']} split" + (f", first {s['limit']} records)" if s["limit"] else ")"),
             s["summary"], "",
             _dist_line("caption words", s["caption_words"]), *_hist_lines(s["caption_words"]["histogram"]),
             _dist_line("caption chars", s["caption_chars"]), *_hist_lines(s["caption_chars"]["histogram"]), "",
             f"original image sizes ({sizes['decoded']} decoded, before resize):",
             _dist_line("  width", sizes["width"], " px"), _dist_line("  height", sizes["height"], " px"),
             _dist_line("  aspect ratio", sizes["aspect_ratio"]),
             "  most common: " + ", ".join(f"{k} ({n})" for k, n in sizes["most_common"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- preview

def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words are cut; an ellipsis marks text left out."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        while font.getlength(word) > width:  # a word wider than the cell: cut it
            cut = max(1, next((i for i in range(len(word), 0, -1) if font.getlength(word[:i]) <= width), 1))
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def grid_size(n: int, cols: int, resolution: int) -> tuple[int, int]:
    """Pixel size of the preview grid of ``n`` samples (``cols`` per row, fewer if ``n`` is smaller)."""
    cols = min(cols, n)
    side = resolution * max(1, math.ceil(MIN_CELL / resolution))
    return cols * (side + 2 * PAD), math.ceil(n / cols) * (side + 2 * PAD + CAPTION_LINES * LINE_HEIGHT)


def make_grid(samples: Sequence[Sample], cols: int) -> Image.Image:
    """Samples (at the model's resolution) upscaled by a whole factor, nearest-neighbour, captions wrapped under."""
    resolution = samples[0].image.shape[0]
    scale = max(1, math.ceil(MIN_CELL / resolution))
    side, cols = resolution * scale, min(cols, len(samples))
    grid = Image.new("RGB", grid_size(len(samples), cols, resolution), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    cell_w, cell_h = side + 2 * PAD, side + 2 * PAD + CAPTION_LINES * LINE_HEIGHT
    for i, sample in enumerate(samples):
        x, y = (i % cols) * cell_w + PAD, (i // cols) * cell_h + PAD
        grid.paste(Image.fromarray(sample.image).resize((side, side), Image.NEAREST), (x, y))
        for j, line in enumerate(_wrap(sample.caption, font, side, CAPTION_LINES)):
            draw.text((x, y + side + 2 + j * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return grid


def write_preview(cfg: DataConfig, opts: PreviewOptions) -> tuple[int, SkipStats]:
    stats = SkipStats()
    samples = list(itertools.islice(iter_samples(open_source(cfg).records(), cfg, stats), opts.n))
    if not samples:
        raise _nothing_left(cfg, stats)
    if opts.out.parent and not opts.out.parent.is_dir():
        raise UserError(f"output folder does not exist: {opts.out.parent}")
    make_grid(samples, opts.cols).save(opts.out, format="PNG")
    return len(samples), stats


# ---------------------------------------------------------------------------------------------------------- command

def _data_config(args: argparse.Namespace) -> DataConfig:
    if args.source_arg is not None:
        return from_args(DataConfig, args, source=args.source_arg)
    return from_args(DataConfig, args)


def cmd_stats(args: argparse.Namespace) -> int:
    cfg, opts = _data_config(args), from_args(StatsOptions, args)
    s = collect_stats(cfg, opts.limit)
    print(json.dumps(s, indent=2) if opts.json else format_stats(s))
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    cfg, opts = _data_config(args), from_args(PreviewOptions, args)
    n, stats = write_preview(cfg, opts)
    print(f"wrote {opts.out}: {n} samples at {cfg.resolution}x{cfg.resolution} ({cfg.source}, {cfg.split} split; "
          f"{stats.skipped} skipped on the way)")
    return 0


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source_arg", nargs="?", metavar="SOURCE", default=None,
                        help="dataset: a built-in name or a path (overrides --source)")
    add_options(parser, DataConfig, title="data")


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "data", "inspect datasets: record counts, skips, caption and image statistics, previews")
    stats = group.add_parser("stats", help="count records, skips (with reasons), caption lengths and image sizes",
                             description="Stream a split through the training pipeline (decode, caption checks, "
                             "filters) and report record counts, skips with their reasons, caption lengths and the "
                             "original image sizes.")
    _add_source(stats)
    add_options(stats, StatsOptions, title="stats")
    stats.set_defaults(func=cmd_stats)
    preview = group.add_parser("preview", help="write a PNG grid of preprocessed samples with their captions",
                               description="Write a PNG grid of the first samples of a split, after the model's "
                               "preprocessing (resize, crop, resolution), each with its caption underneath.")
    _add_source(preview)
    add_options(preview, PreviewOptions, title="preview")
    preview.set_defaults(func=cmd_preview)
