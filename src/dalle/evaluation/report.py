"""The evaluation report: one self-contained ``report.html`` beside the PNGs it shows.

Every image is embedded as a base64 ``data:`` URI, so the HTML file can be mailed or moved on its own; each figure
also links to its PNG by a relative name in the same folder. The page is built from the ``metrics.json`` dict that
:mod:`dalle.evaluation.run_eval` writes (the report never computes a number itself) plus the sample images:

1. the headline numbers, reranked (best of N) against unreranked (first draw) and real images;
2. compositional accuracy per stated attribute (shapes only, where a pixel checker exists);
3. the paper's two curves: metrics against Gaussian blur radius and against the reranking sample size;
4. samples for held-out and for training captions: first draw, reranked pick and all N candidates;
5. dVAE reconstructions, the prior's validation loss and the training curves of every stage.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import html
import io
import math
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dalle.checkpoint import write_text_atomic

REPORT = "report.html"
MARK = (230, 120, 0)  # frame of the reranker's pick in a candidate strip
GAP = (190, 190, 190)  # between images in grids and strips: grey, so that white-background images stay apart
ATTRIBUTE_NAMES = {"color": "colour", "shape": "shape", "size": "size", "position": "position",
                   "relation": "relation", "all": "all stated"}


@dataclasses.dataclass
class SampleRow:
    """One caption's samples: ``candidates`` ``(N, H, W, 3)`` uint8 in draw order, ``pick`` the reranked index."""

    caption: str
    unreranked: np.ndarray  # (H, W, 3) uint8: the first draw
    reranked: np.ndarray  # (H, W, 3) uint8: the reranker's pick
    candidates: np.ndarray  # (N, H, W, 3) uint8
    pick: int
    verdict_unreranked: Mapping[str, bool | None] | None = None  # checker verdict per attribute (shapes only)
    verdict_reranked: Mapping[str, bool | None] | None = None


@dataclasses.dataclass
class SampleSection:
    title: str
    note: str
    rows: Sequence[SampleRow]
    grids: Sequence[tuple[str, str]] = ()  # (label, PNG file name in the report's folder)


@dataclasses.dataclass
class Figure:
    title: str
    file: str  # PNG file name in the report's folder
    caption: str = ""


# ----------------------------------------------------------------------------------------------------- images

def png_bytes(image: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def candidate_strip(candidates: np.ndarray, pick: int | None = None, pad: int = 2) -> np.ndarray:
    """``(N, H, W, 3)`` images side by side, the ``pick`` framed in orange: ``(H + 2·pad, ·, 3)``."""
    n, h, w, _ = candidates.shape
    strip = np.empty((h + 2 * pad, n * (w + pad) + pad, 3), np.uint8)
    strip[:] = GAP
    for i, image in enumerate(candidates):
        x = pad + i * (w + pad)
        if i == pick:
            strip[:, x - pad:x + w + pad] = MARK
        strip[pad:pad + h, x:x + w] = image
    return strip


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 2) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images in rows of ``columns``, row-major: ``(rows·(H + pad) + pad, ·, 3)``."""
    n, h, w, _ = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    canvas = np.empty((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), np.uint8)
    canvas[:] = GAP
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    return canvas


def save_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path


def _img(image: np.ndarray, scale: int = 2, alt: str = "") -> str:
    h, w = image.shape[:2]
    return (f'<img src="{data_uri(png_bytes(image))}" width="{w * scale}" height="{h * scale}" '
            f'alt="{html.escape(alt)}" class="px">')


def _figure_file(out_dir: Path, name: str, alt: str) -> str:
    """A figure embedded from its PNG, linked to the same file by a relative name."""
    src = data_uri((out_dir / name).read_bytes())
    return f'<a href="{html.escape(name)}"><img src="{src}" alt="{html.escape(alt)}" class="fig"></a>'


# ----------------------------------------------------------------------------------------------------- formatting

def fmt(value: Any, digits: int = 2, percent: bool = False) -> str:
    """A number for a table cell; ``—`` for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def _verdict(verdict: Mapping[str, bool | None] | None) -> str:
    if verdict is None:
        return ""
    marks = [f'{ATTRIBUTE_NAMES.get(k, k)} {"✓" if v else "✗"}' for k, v in verdict.items() if v is not None]
    return '<div class="verdict">' + " · ".join(marks) + "</div>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------------------------------- sections

def _headline(m: Mapping[str, Any]) -> str:
    d = m["distribution"]
    n = m["counts"]
    rows = [[html.escape(d["fd_label"]) + " ↓", fmt(d["fd"]["reranked"]), fmt(d["fd"]["unreranked"]),
             fmt(d["fd"]["real_floor"]) + f' <span class="note">({n["floor_images"]} real training images)</span>']]
    if d.get("is") is not None:
        rows.append([html.escape(d["is_label"]) + " ↑", fmt(d["is"]["reranked"]), fmt(d["is"]["unreranked"]),
                     fmt(d["is"]["real"]) + ' <span class="note">(real validation images)</span>'])
    cs = d["contrastive"]
    rows.append([html.escape(d["cs_label"]) + " ↑", fmt(cs["reranked"]), fmt(cs["unreranked"]),
                 fmt(cs["real"]) + ' <span class="note">(real validation pairs)</span>'])
    comp = m.get("compositional") or {}
    for entry in (comp.get("sets") or {}).values():
        rows.append([f"compositional accuracy, {html.escape(entry['title'])} (all stated attributes) ↑",
                     fmt(entry["reranked"].get("all"), percent=True), fmt(entry["unreranked"].get("all"), percent=True),
                     ""])
    header = ["metric", f"reranked (best of {n['candidates']})", "unreranked (first draw)", "reference"]
    return (f"<h2>Headline numbers</h2><p>{n['generated_val']} generated images for validation captions against "
            f"{n['real_images']} real validation images.</p>" + _table(header, rows))


def ratio_line(ratio: dict[str, Any] | None) -> str | None:
    """The headline's and report's line for ``metrics["compositional"]["heldout_vs_train"]`` (None without it)."""
    if not ratio or ratio["ratio"] is None:
        return None
    low, high = ratio["interval"]
    high_text = f"{high:.0%}" if high is not None else "unbounded"
    return (f"held-out / training captions' accuracy after reranking: {ratio['ratio']:.0%} ({ratio['level']:.0%} "
            f"bootstrap interval over the captions drawn: {low:.0%} to {high_text})")


# The rows of the compositional table per caption set: which samples were judged.
SAMPLE_KINDS = (("reranked", "reranked"), ("unreranked", "unreranked"), ("every_candidate", "every candidate"))


def _compositional(m: Mapping[str, Any]) -> str:
    comp = m.get("compositional") or {}
    if not comp.get("sets"):
        return f'<h2>Compositional accuracy</h2><p>{html.escape(comp.get("reason", "not measured"))}</p>'
    names = [a for a in ATTRIBUTE_NAMES if any(a in e[k] for e in comp["sets"].values()
                                               for k in ("reranked", "unreranked"))]
    rows = []
    for entry in comp["sets"].values():
        for kind, label in SAMPLE_KINDS:
            if kind in entry:
                rows.append([html.escape(entry["title"]), label,
                             *(fmt(entry[kind].get(a), percent=True) for a in names)])
    note = ("Judged from the pixels by the shapes checker: the fraction of images that show what the caption states. "
            "Held-out captions name combinations never seen in training (combinatorial generalisation, paper §3.3). "
            "'Every candidate' is the prior's own rate, over all the samples drawn.")
    if ceiling := comp.get("ceiling"):
        for kind, label in (("real", "real images"), ("reconstructions", "their dVAE reconstructions")):
            rows.append([f"validation captions ({ceiling['images']})", label,
                         *(fmt(ceiling[kind].get(a), percent=True) for a in names)])
        note += (" The last two rows are the ceiling: the checker on real validation images, and on the same images "
                 "encoded to codes and decoded. Samples are decoded from codes too, so no prior can beat the "
                 "reconstructions' row with this dVAE.")
    html_out = ("<h2>Compositional accuracy</h2><p>" + note + "</p>"
                + _table(["captions", "samples", *(ATTRIBUTE_NAMES[a] for a in names)], rows))
    if line := ratio_line(comp.get("heldout_vs_train")):
        html_out += (f"<p><b>{html.escape(line[0].upper() + line[1:])}.</b> The interval resamples each set's "
                     "captions: with a few dozen captions per set it is wide, so compare runs on a few hundred "
                     "(<code>dalle eval --captions 384</code>).</p>")
    kind_rows = [[html.escape(entry["title"]), html.escape(kind), str(k["captions"]),
                  fmt(k["reranked"], percent=True), fmt(k["unreranked"], percent=True),
                  fmt(k.get("any_candidate"), percent=True)]
                 for entry in comp["sets"].values() for kind, k in (entry.get("by_kind") or {}).items()]
    if kind_rows:
        html_out += ("<p>By caption kind (all stated attributes). The training captions are chosen with the held-out "
                     "set's mix of kinds, so that the two sets' accuracies compare. The last column is the fraction "
                     "of captions with at least one right candidate: what a perfect reranker would reach.</p>"
                     + _table(["captions", "kind", "count", "reranked", "unreranked (first draw)", "any candidate"],
                              kind_rows))
    return html_out


def _figures(out_dir: Path, title: str, figures: Sequence[Figure], side_by_side: bool = False) -> str:
    if not figures:
        return ""
    parts = [f"<h2>{html.escape(title)}</h2><div class='{'row' if side_by_side else 'column'}'>"]
    for f in figures:
        parts.append(f'<figure>{_figure_file(out_dir, f.file, f.title)}<figcaption><b>{html.escape(f.title)}</b>'
                     f'{": " + html.escape(f.caption) if f.caption else ""}</figcaption></figure>')
    return "".join(parts) + "</div>"


def _samples(out_dir: Path, section: SampleSection) -> str:
    rows = []
    for r in section.rows:
        rows.append([html.escape(r.caption), _img(r.unreranked, alt="first draw") + _verdict(r.verdict_unreranked),
                     _img(r.reranked, alt="reranked") + _verdict(r.verdict_reranked),
                     _img(candidate_strip(r.candidates, r.pick), scale=1, alt="candidates")])
    grids = "".join(f'<p><a href="{html.escape(file)}">{html.escape(label)} (PNG)</a></p>' for label, file in
                    section.grids if (out_dir / file).is_file())
    return (f"<h2>{html.escape(section.title)}</h2><p>{html.escape(section.note)}</p>"
            + _table(["caption", "first draw", "reranked", "all candidates in draw order (pick framed)"], rows) + grids)


def _models(m: Mapping[str, Any]) -> str:
    parts = ["<h2>dVAE and prior</h2>"]
    v = m.get("dvae")
    if v:
        parts.append(f"<p>dVAE reconstructions of {v['images']} validation images: PSNR {fmt(v['psnr_db'])} dB; "
                     f"{v['codes_used']} of {v['codebook_size']} codes used, code perplexity "
                     f"{fmt(v['perplexity'], 1)}.</p>")
    rows = [[html.escape(split), str(p["records"]), fmt(p["loss"], 4), fmt(p["text_loss"], 4), fmt(p["image_loss"], 4),
             fmt(p["image_bits_per_token"], 3)] for split, p in (m.get("prior") or {}).items()]
    if rows:
        parts.append("<p>Prior loss (nats per token; total = 1/8 text + 7/8 image, paper §2.2):</p>"
                     + _table(["split", "records", "loss", "text loss", "image loss", "image bits/token"], rows))
    return "".join(parts)


def _notes(m: Mapping[str, Any]) -> str:
    notes = m.get("notes") or []
    return "<h2>How to read these numbers</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 14px; }
th { background: #f3f3f3; }
img.px { image-rendering: pixelated; }
img.fig { max-width: 100%; }
figure { margin: 1em 0; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
.row figure { width: 360px; margin: 0; }
.note, .verdict { color: #666; font-size: 12px; }
"""


def write_report(out_dir: str | Path, metrics: Mapping[str, Any], sections: Sequence[SampleSection] = (),
                 curves: Sequence[Figure] = (), models: Sequence[Figure] = (),
                 training: Sequence[Figure] = ()) -> Path:
    """Write ``out_dir/report.html`` from the metrics dict, the sample sections and figures (PNGs in ``out_dir``)."""
    out_dir = Path(out_dir)
    title = f"DALL·E evaluation of {metrics['run']}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>Dataset <b>{html.escape(str(metrics['dataset']))}</b>; {metrics['counts']['candidates']} samples "
             f"per caption reranked by the contrastive model; written {html.escape(metrics['created'])}.</p>",
             _headline(metrics), _compositional(metrics),
             _figures(out_dir, "The paper's curves", curves),
             *(_samples(out_dir, s) for s in sections),
             _models(metrics), _figures(out_dir, "dVAE reconstructions", models),
             _figures(out_dir, "Training curves", training, side_by_side=True), _notes(metrics), "</body></html>"]
    path = out_dir / REPORT
    write_text_atomic(path, "\n".join(p for p in parts if p))
    path.chmod(0o644)  # written through a private temporary file; a report is for sharing
    return path


# ----------------------------------------------------------------------------------------------------- checking

class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"img": "src", "a": "href"}.get(tag)
        self.targets += [v for k, v in attrs if k == wanted and v]


def unresolved_links(path: str | Path) -> list[str]:
    """The image sources and links of an HTML report that do not resolve: a ``data:image/png`` URI that is not a
    readable PNG, or a relative name with no file beside the report (a report moved without its PNGs)."""
    path = Path(path)
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    bad = []
    for target in parser.targets:
        if target.startswith("data:image/png;base64,"):
            try:
                Image.open(io.BytesIO(base64.b64decode(target.split(",", 1)[1], validate=True))).verify()
            except (binascii.Error, OSError, SyntaxError):
                bad.append(target[:60] + "...")
        elif not target.startswith("#") and not (path.parent / target).is_file():
            bad.append(target)
    return bad
