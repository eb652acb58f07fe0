"""Does a generated image show what its shapes caption says? Judged from the pixels alone, no learned model.

This is the held-out accuracy of the combinatorial-generalisation experiment (paper section 3.3 on a dataset where
every caption is checkable, see :mod:`dalle.data.shapes`). For each stated object the checker answers: is its colour
there, is it the stated shape and size, is it in the stated 3×3 cell; for two objects, does the stated relation hold.

How it reads an image:

1. **Coverage per palette colour.** Every shape is drawn in a palette colour on a white background and anti-aliased,
   so each pixel is ``α·colour + (1 − α)·background``. Projecting the pixel on each background→colour segment gives
   that colour's coverage α and the distance from the segment; a pixel belongs to the colour with the nearest segment
   (an edge pixel of a red shape is half-covered red, not pink) if that distance is small.
2. **Blobs.** Pixels at least half covered form connected components per colour; tiny ones (noise) are dropped. A
   blob's soft mask is its colour's coverage over the component and a margin of a few pixels (the anti-aliased or
   blurred rim), so its area and centroid are sub-pixel accurate even for a 5-px object at 32 px.
3. **Shape by analysis-by-synthesis.** For each candidate shape, the blob's area and centroid fix the pose (extent and
   centre, from the shape's fill ratio and centroid offset — circle π/4, square 1, triangle ½ with its centroid a sixth
   of the extent below the centre, …); the candidate is rendered at that pose with the dataset's own renderer and
   compared with the soft mask, sharp and blurred by a few sigmas (samples decoded by a dVAE are blurry). The best
   match is the shape read. Fill ratio alone cannot separate a triangle (½), a diamond (½) and a cross (5/9) of five
   pixels; comparing the whole silhouette can.
4. **Size, position, relation** from the matched pose: extent against the geometric mean of the dataset's size
   fractions, centre in the 3×3 grid, and for a relation the offset of the centres along the relation's axis, which
   must be positive and larger than the offset across it (the same rule the dataset draws relations with).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle.config import check, option
from dalle.data import shapes
from dalle.errors import UserError
from dalle.evaluation.blur import blur_matrix

ATTRIBUTES = ("color", "shape", "size", "position", "relation")
_PALETTE = np.array(list(shapes.COLORS.values()), dtype=np.float64)  # (K, 3)
_COLOR_NAMES = tuple(shapes.COLORS)
_BACKGROUND = np.array(shapes.BACKGROUND, dtype=np.float64)
_CELLS = {cell: name for name, cell in shapes.POSITIONS.items()}
SPLIT_COVERAGE = 0.85  # core threshold used to separate two same-colour objects that blur into one blob


@dataclasses.dataclass
class CheckerConfig:
    max_residual: float = option(60.0, "largest RGB distance (0-255 scale) of a pixel from the background-to-colour "
                                       "line for it to count as that palette colour")
    core_coverage: float = option(0.5, "coverage of a colour above which a pixel belongs to a blob's core")
    min_area: float = option(0.0025, "smallest blob counted as an object, as a fraction of the image area "
                                     "(the smallest drawn object covers about 0.01)")
    margin: int = option(3, "pixels around a blob's core whose partial coverage counts (anti-aliasing, blur)")
    # A 5-px shape is recognisable under blur only against a template blurred about as much (a 0.25-px mismatch in
    # sigma costs ~15 points of shape accuracy at 32 px), hence the fine grid.
    template_blurs: tuple[float, ...] = option(tuple(0.25 * i for i in range(9)), "Gaussian blurs (sigma, pixels) "
                                               "tried on each shape template, so that blurry samples (dVAE decodes) "
                                               "still match")

    def __post_init__(self) -> None:
        check(self.max_residual > 0, self, "max_residual", "must be positive")
        check(0 < self.core_coverage < 1, self, "core_coverage", "must lie in (0, 1)")
        check(0 <= self.min_area < 0.1, self, "min_area", "must lie in [0, 0.1)")
        check(self.margin >= 0, self, "margin", "must be >= 0")
        check(len(self.template_blurs) > 0 and min(self.template_blurs) >= 0, self, "template_blurs",
              "must hold at least one sigma, all >= 0")


@dataclasses.dataclass(frozen=True)
class FoundObject:
    """What the checker read for one stated object; geometry in unit coordinates (image side = 1)."""

    color: str
    shape: str
    size: str
    position: str
    cx: float
    cy: float
    extent: float
    shape_errors: Mapping[str, float]  # silhouette mismatch per candidate shape (lower is better)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Per-attribute verdicts; ``None`` for an attribute the caption does not state.

    ``color`` says each stated colour is there; which object wears it is judged through the other attributes, so
    "a red circle above a blue square" drawn as a blue circle above a red square passes ``color`` and fails ``shape``.
    """

    color: bool
    shape: bool
    size: bool
    position: bool | None
    relation: bool | None
    found: tuple[FoundObject | None, ...]

    @property
    def all_correct(self) -> bool:
        return all(v for v in self.as_dict().values() if v is not None)

    def as_dict(self) -> dict[str, bool | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def summarize(results: Sequence[CheckResult]) -> dict[str, float]:
    """Accuracy per attribute over the results that state it, and the fraction entirely correct (``"all"``)."""
    out = {}
    for name in ATTRIBUTES:
        verdicts = [getattr(r, name) for r in results if getattr(r, name) is not None]
        if verdicts:
            out[name] = sum(verdicts) / len(verdicts)
    if results:
        out["all"] = sum(r.all_correct for r in results) / len(results)
    return out


# ----------------------------------------------------------------------------------------------------- captions

_OBJECT = re.compile(r"\b(?P<size>{})\s+(?P<color>{})\s+(?P<shape>{})\b".format(
    "|".join(shapes.SIZES), "|".join(shapes.COLORS), "|".join(shapes.SHAPES)))


def parse_caption(caption: str) -> dict[str, Any]:
    """Read a shapes caption back into the ``attributes`` layout of :mod:`dalle.data.shapes` records.

    >>> parse_caption("a small red circle to the left of a large blue square")["relation"]
    'left of'
    """
    text = " ".join(caption.lower().split())
    found = list(_OBJECT.finditer(text))
    objects = [{k: m.group(k) for k in ("color", "shape", "size")} for m in found]
    if len(found) == 1:
        rest = text[found[0].end():]
        for name, phrase in sorted(shapes.POSITION_PHRASES.items(), key=lambda kv: -len(kv[1])):
            if phrase in rest:
                objects[0]["position"] = name
                return {"objects": objects, "relation": None, "stated": ["color", "shape", "size", "position"]}
    elif len(found) == 2:
        between = text[found[0].end():found[1].start()]
        for name, phrase in sorted(shapes.RELATION_PHRASES.items(), key=lambda kv: -len(kv[1])):
            if re.search(rf"\b{phrase}\b", between):
                return {"objects": objects, "relation": name, "stated": ["color", "shape", "size", "relation"]}
    raise UserError(f"not a shapes caption (expected 'a SIZE COLOUR SHAPE' with a position, or two such objects "
                    f"with a relation): {caption!r}")


# ----------------------------------------------------------------------------------------------------- segmentation

def _pixels(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` float64 on the 0–255 scale from a PIL image, a uint8 array or a ``(3, H, W)`` float tensor."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"expected a (3, H, W) float tensor in [0, 1], got {tuple(image.shape)} {image.dtype}")
        arr = image.detach().double().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"shapes images are square, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def coverage(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per palette colour: coverage α and distance from the background→colour segment, each ``(K, H, W)``.

    α is the pixel's projection on the segment, left unclipped below 0 so that noise on the background averages out
    of a blob's area instead of adding to it; the distance is measured to the segment itself (α clipped to [0, 1]).
    """
    direction = _PALETTE - _BACKGROUND  # (K, 3)
    offset = pixels - _BACKGROUND  # (H, W, 3)
    alpha = np.einsum("hwc,kc->khw", offset, direction) / (direction ** 2).sum(1)[:, None, None]  # (K, H, W)
    on_segment = alpha.clip(0, 1)[..., None] * direction[:, None, None]  # (K, H, W, 3)
    residual = np.linalg.norm(offset[None] - on_segment, axis=-1)  # (K, H, W)
    return np.minimum(alpha, 1), residual


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean ``(H, W)`` mask, as boolean masks (label propagation + pointer jumping)."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    flat_mask = mask.ravel()
    while True:
        new = labels.copy()
        new[1:] = np.minimum(new[1:], labels[:-1])
        new[:-1] = np.minimum(new[:-1], labels[1:])
        new[:, 1:] = np.minimum(new[:, 1:], labels[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], labels[:, 1:])
        new = np.where(mask, new, big)
        flat = new.ravel()
        flat[flat_mask] = flat[flat[flat_mask]]  # jump to the label's own label: halves the remaining path
        if np.array_equal(new, labels):
            break
        labels = new
    return [labels == v for v in np.unique(labels[mask])]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


@dataclasses.dataclass
class Blob:
    color: str
    alpha: np.ndarray  # (H, W) this colour's coverage over the blob and its rim, 0 elsewhere
    area: float  # Σ α, in pixels
    cx: float  # centroid, pixels (pixel j spans [j, j + 1])
    cy: float


def find_blobs(pixels: np.ndarray, cfg: CheckerConfig) -> list[Blob]:
    """All blobs of palette colours in an ``(H, W, 3)`` image, largest first."""
    alpha, residual = coverage(pixels)
    nearest = residual.argmin(0)  # (H, W)
    side = pixels.shape[0]
    smallest = cfg.min_area * side * side / 2  # a core holds at least half of its blob's area
    cores = []
    for k, name in enumerate(_COLOR_NAMES):
        core = (nearest == k) & (alpha[k] >= cfg.core_coverage) & (residual[k] <= cfg.max_residual)
        if core.any():
            cores += [(k, name, comp) for comp in connected_components(core) if comp.sum() >= smallest]
    all_cores = np.zeros((side, side), bool)
    for _, _, comp in cores:
        all_cores |= comp
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    blobs = []
    for k, name, comp in cores:
        others = all_cores & ~comp
        # The rim holds the anti-aliased or blurred edge: pixels near the core that are a blend of this colour and
        # the background (so not the rim of a neighbouring object of another colour), and not another blob's core.
        region = _dilate(comp, cfg.margin) & ~others & (residual[k] <= cfg.max_residual)
        a = np.where(region, alpha[k], 0.0)
        area = float(a.sum())
        if area < cfg.min_area * side * side:
            continue
        blobs.append(Blob(name, a, area, float((a * xs).sum() / area), float((a * ys).sum() / area)))
    return sorted(blobs, key=lambda b: -b.area)


# ----------------------------------------------------------------------------------------------------- shape matching

@functools.cache
def _shape_geometry(shape: str) -> tuple[float, float, float]:
    """(fill ratio, centroid x offset, centroid y offset) of ``shape`` relative to its bounding box, measured on the
    dataset's renderer at high resolution so that the checker and the data agree on what each shape is."""
    side, extent = 256, 0.75
    area, x, y = _moments(_render_alpha(shape, 0.5, 0.5, extent, side))
    return area / (extent * side) ** 2, (x / side - 0.5) / extent, (y / side - 0.5) / extent


def _template_alpha(img: Image.Image) -> np.ndarray:
    black = shapes.COLORS["black"][0]
    return (shapes.BACKGROUND[0] - np.asarray(img, dtype=np.float64)[..., 0]) / (shapes.BACKGROUND[0] - black)


def _render_alpha(shape: str, cx: float, cy: float, extent: float, side: int) -> np.ndarray:
    return _template_alpha(shapes.render([shapes.Shape("black", shape, "large", "center", cx, cy, extent)], side))


def _moments(alpha: np.ndarray) -> tuple[float, float, float]:
    """Area (pixels) and centroid (pixels, pixel j spanning [j, j + 1]) of a coverage map."""
    side = alpha.shape[0]
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    area = float(alpha.sum())
    if area <= 0:
        return 0.0, math.nan, math.nan
    return area, float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)


def _fit(blob: Blob, shape: str, side: int, blurs: Sequence[float]) -> tuple[float, float, float, float]:
    """Pose (cx, cy, extent in unit coordinates) of ``shape`` with the blob's area and centroid, and the silhouette
    mismatch Σ|α_blob − α_template| / area, the smallest over the template blurred by each of ``blurs``.

    The pose from the shape's geometry is corrected once by the rendered template's own area and centroid: at 32 px
    the renderer's rounding moves a 5-px shape by a fraction of a pixel, which is as large as the differences
    between shapes.
    """
    fill, off_x, off_y = _shape_geometry(shape)
    extent = math.sqrt(blob.area / fill) / side
    cx, cy = blob.cx / side - off_x * extent, blob.cy / side - off_y * extent
    area, tx, ty = _moments(_render_alpha(shape, cx, cy, extent, side))
    if not area > 0:  # nothing drawn inside the image at that pose
        return cx, cy, extent, math.inf
    extent *= math.sqrt(blob.area / area)
    cx, cy = cx + (blob.cx - tx) / side, cy + (blob.cy - ty) / side
    template = _render_alpha(shape, cx, cy, extent, side)
    # Compare inside a window around both silhouettes, wide enough that the blur sees only background beyond it.
    ys, xs = np.nonzero((template > 0) | (blob.alpha != 0))
    pad = math.ceil(3 * max(blurs)) + 1
    y0, y1, x0, x1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, side), max(xs.min() - pad, 0), min(
        xs.max() + pad + 1, side)
    target, template = blob.alpha[y0:y1, x0:x1], template[y0:y1, x0:x1]
    errors = [np.abs(target - _blur_matrix(y1 - y0, s).T @ template @ _blur_matrix(x1 - x0, s)).sum() for s in blurs]
    return cx, cy, extent, float(min(errors) / blob.area)


@functools.lru_cache(maxsize=1024)
def _blur_matrix(side: int, sigma: float) -> np.ndarray:
    return blur_matrix(side, sigma)


def _size_name(extent: float) -> str:
    """The dataset's size class nearest in log scale (boundary at the geometric mean of neighbouring sizes)."""
    return min(shapes.SIZES, key=lambda s: abs(math.log(extent / shapes.SIZES[s])))


def read_object(blob: Blob, side: int, blurs: Sequence[float] = (0.0,)) -> FoundObject:
    """What one blob shows: its best-matching shape and, from that shape's pose, its size and 3×3 cell."""
    fits = {s: _fit(blob, s, side, blurs) for s in shapes.SHAPES}
    best = min(fits, key=lambda s: fits[s][3])
    cx, cy, extent, _ = fits[best]
    cell = (min(max(int(cy * 3), 0), 2), min(max(int(cx * 3), 0), 2))
    return FoundObject(blob.color, best, _size_name(extent), _CELLS[cell], cx, cy, extent,
                       {s: f[3] for s, f in fits.items()})


def relation_holds(first: FoundObject, relation: str, second: FoundObject) -> bool:
    """``first`` is ``relation`` ``second``: offset along the relation's axis positive and larger than across it."""
    dx, dy = second.cx - first.cx, second.cy - first.cy  # from first to second; y grows downwards
    along, across = {"above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy)}[relation]
    return along > 0 and along > abs(across)


# ----------------------------------------------------------------------------------------------------- the checker

class ShapesChecker:
    """``ShapesChecker().check(image, caption_or_attributes) -> CheckResult``."""

    def __init__(self, cfg: CheckerConfig | None = None):
        self.cfg = cfg or CheckerConfig()

    def read(self, image: Image.Image | np.ndarray | torch.Tensor) -> list[FoundObject]:
        """Every object in the image, largest first."""
        pixels = _pixels(image)
        return [read_object(b, pixels.shape[0], self.cfg.template_blurs) for b in find_blobs(pixels, self.cfg)]

    def check(self, image: Image.Image | np.ndarray | torch.Tensor,
              stated: str | Mapping[str, Any]) -> CheckResult:
        attrs = parse_caption(stated) if isinstance(stated, str) else stated
        objects = attrs["objects"]
        if not 1 <= len(objects) <= 2:
            raise UserError(f"a shapes caption states one or two objects, got {len(objects)}")
        pixels = _pixels(image)
        found = self._match(objects, pixels)
        pairs = list(zip(objects, found))
        said = attrs.get("stated") or ["color", "shape", "size",
                                       "position" if attrs.get("relation") is None else "relation"]
        relation = None
        if "relation" in said:
            a, b = found
            relation = a is not None and b is not None and relation_holds(a, attrs["relation"], b)
        return CheckResult(
            color=all(f is not None for f in found),
            shape=all(f is not None and f.shape == o["shape"] for o, f in pairs),
            size=all(f is not None and f.size == o["size"] for o, f in pairs),
            position=all(f is not None and f.position == o["position"] for o, f in pairs) if "position" in said
            else None,
            relation=relation,
            found=tuple(found))

    def check_batch(self, images: torch.Tensor, stated: Sequence[str | Mapping[str, Any]]) -> list[CheckResult]:
        """``(B, 3, H, W)`` float images in [0, 1] (the evaluation convention) against B captions or attributes."""
        if images.ndim != 4 or images.shape[0] != len(stated):
            raise ValueError(f"{tuple(images.shape)} images for {len(stated)} captions")
        return [self.check(img, s) for img, s in zip(images, stated)]

    def _match(self, objects: Sequence[Mapping[str, Any]], pixels: np.ndarray) -> list[FoundObject | None]:
        """Give each stated object the largest blob of its colour; two objects of one colour take the two largest
        blobs of it, in whichever order their stated shapes match better."""
        side = pixels.shape[0]
        by_color: dict[str, list[Blob]] = {}
        for blob in find_blobs(pixels, self.cfg):
            by_color.setdefault(blob.color, []).append(blob)
        colors = [o["color"] for o in objects]
        if len(objects) == 2 and colors[0] == colors[1]:
            candidates = by_color.get(colors[0], [])
            if len(candidates) == 1:  # two blurred neighbours may have merged: split them at a higher coverage
                strict = dataclasses.replace(self.cfg, core_coverage=max(self.cfg.core_coverage, SPLIT_COVERAGE))
                candidates = [b for b in find_blobs(pixels, strict) if b.color == colors[0]] or candidates
            if len(candidates) < 2:
                return [read_object(candidates[0], side, self.cfg.template_blurs) if candidates else None, None]
            reads = [read_object(b, side, self.cfg.template_blurs) for b in candidates[:2]]
            keep = sum(r.shape_errors[o["shape"]] for r, o in zip(reads, objects))
            swap = sum(r.shape_errors[o["shape"]] for r, o in zip(reversed(reads), objects))
            return reads if keep <= swap else reads[::-1]
        return [read_object(by_color[c][0], side, self.cfg.template_blurs) if c in by_color else None for c in colors]
