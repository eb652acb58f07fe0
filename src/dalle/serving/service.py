"""What the web UI and its JSON API do, without HTTP: a request's fields in, the kept images (PNG, base64) out.

A request is a JSON object. ``generate`` takes::

    {"caption": "a red circle", "n": 16, "keep": 4, "temperature": 1.0, "top_k": null, "top_p": null, "seed": 7}

and ``complete`` the same plus ``"image"`` (a PNG / JPEG / ... file as base64, or a ``data:`` URL) and ``"keep_rows"``
(default: half the code grid). Only ``caption`` (and, for ``complete``, ``image``) is required. Every mistake is a
:class:`dalle.errors.UserError` whose message names the field, which the HTTP layer answers with 400.

One generation runs at a time: the sampler keeps its key/value cache between calls, and two callers sharing the
cores would each run at half speed anyway. Without a seed in the request, one is drawn and returned, so that any
image shown can be drawn again.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from dalle.errors import ConfigError, UserError

if TYPE_CHECKING:
    from dalle.generation import Generation, Generator
    from dalle.models.sampling import SampleConfig

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 2_000  # far beyond any text_len; guards the tokenizer against a pasted book
MAX_UPLOAD_PIXELS = 64 * 1024 * 1024  # an 8k × 8k upload at most: a server decodes what strangers send
SEED_LIMIT = 2**31  # seeds drawn for requests without one stay small enough to retype

# Field → (its JSON kind, may be null).
SAMPLE_FIELDS: dict[str, tuple[str, bool]] = {
    "caption": ("string", False),
    "n": ("integer", False),
    "keep": ("integer", True),
    "temperature": ("number", False),
    "top_k": ("integer", True),
    "top_p": ("number", True),
    "seed": ("integer", True),
}
# bool is a subclass of int in Python, and JSON's true is no number: refused separately.
KINDS: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float)}
COMPLETE_FIELDS = {**SAMPLE_FIELDS, "image": ("string", False), "keep_rows": ("integer", False)}


@dataclass
class ServiceLimits:
    max_n: int = 64  # candidates per request; a request's time grows linearly with it
    default_n: int = 8
    default_keep: int = 4


class GenerationService:
    """Serves one :class:`Generator`: ``info()``, ``generate(request)`` and ``complete(request)`` return JSON-ready
    dicts. With ``save_dir``, every answer's images and settings are also written to a folder of their own there."""

    def __init__(self, generator: Generator, limits: ServiceLimits | None = None, save_dir: Path | None = None,
                 models: dict[str, str | None] | None = None):
        self.generator = generator
        self.limits = limits or ServiceLimits()
        if not 1 <= self.limits.default_n <= self.limits.max_n:
            raise UserError(f"max_n must be at least {self.limits.default_n}, got {self.limits.max_n}")
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.models = models or {}
        self._lock = threading.Lock()
        self._served = 0

    def info(self) -> dict[str, Any]:
        g = self.generator
        return {
            "resolution": g.dvae.config.resolution,
            "grid_size": g.grid_size,
            "text_len": g.tokenizer.text_len,
            "reranker": g.reranker is not None,
            "models": self.models,
            "limits": {"max_n": self.limits.max_n, "max_caption_chars": MAX_CAPTION_CHARS},
            "defaults": {"n": self.limits.default_n, "keep": self.limits.default_keep, "temperature": 1.0},
        }

    def generate(self, request: Any) -> dict[str, Any]:
        fields = _fields(request, SAMPLE_FIELDS, required=("caption",))
        caption, n, keep, sample = self._sampling(fields)
        start = time.perf_counter()
        with self._lock:
            self.generator.tokenizer.reset_stats()
            result = self.generator.generate([caption], n=n, keep=keep, sample=sample)[0]
            stats = self.generator.tokenizer.reset_stats()
        answer = self._answer(result, n, sample.seed, time.perf_counter() - start, stats.max_tokens)
        return self._saved(answer, result, "generate", {})

    def complete(self, request: Any) -> dict[str, Any]:
        fields = _fields(request, COMPLETE_FIELDS, required=("caption", "image"))
        caption, n, keep, sample = self._sampling(fields)
        image = decode_image(fields["image"])
        keep_rows = self.generator.prompt_rows(fields.get("keep_rows"))
        start = time.perf_counter()
        with self._lock:
            self.generator.tokenizer.reset_stats()
            result = self.generator.complete(image, caption, keep_rows, n=n, keep=keep, sample=sample)
            stats = self.generator.tokenizer.reset_stats()
            reconstruction = self.generator.reconstruct(image)
        answer = self._answer(result, n, sample.seed, time.perf_counter() - start, stats.max_tokens)
        answer.update(keep_rows=keep_rows, input=png_base64(reconstruction))
        return self._saved(answer, result, "complete", {"keep_rows": keep_rows, "input": reconstruction})

    # --- helpers -------------------------------------------------------------------------------------------------

    def _sampling(self, fields: dict[str, Any]) -> tuple[str, int, int, SampleConfig]:
        """The request's caption, n, keep and sampling settings, checked against this server's limits."""
        from dalle.models.sampling import SampleConfig

        caption = fields["caption"].strip()
        if not caption:
            raise UserError("caption: must not be empty")
        if len(caption) > MAX_CAPTION_CHARS:
            raise UserError(f"caption: at most {MAX_CAPTION_CHARS} characters, got {len(caption)}")
        n = fields.get("n", self.limits.default_n)
        if not 1 <= n <= self.limits.max_n:
            raise UserError(f"n: must be between 1 and {self.limits.max_n} (this server's --max-n), got {n}")
        keep = fields.get("keep")
        keep = min(n, self.limits.default_keep) if keep is None else keep
        if not 1 <= keep <= n:
            raise UserError(f"keep: must be between 1 and n = {n}, got {keep}")
        seed = fields.get("seed")
        if seed is not None and not 0 <= seed < 2**63:
            raise UserError(f"seed: must be between 0 and 2**63 - 1, got {seed}")
        seed = secrets.randbelow(SEED_LIMIT) if seed is None else seed
        try:
            sample = SampleConfig(temperature=float(fields.get("temperature", 1.0)), top_k=fields.get("top_k"),
                                  top_p=fields.get("top_p"), seed=seed)
        except ConfigError as e:  # "SampleConfig.top_k: ..." → "top_k: ...", the request's own field name
            raise UserError(f"{e.field}: {str(e).split(': ', 1)[1]}") from None
        return caption, n, keep, sample

    def _answer(self, result: Generation, n: int, seed: int, seconds: float, caption_tokens: int) -> dict[str, Any]:
        scores = result.scores if result.scores is not None else [None] * len(result.images)
        text_len = self.generator.tokenizer.text_len
        return {
            "caption": result.caption,
            "seed": seed,
            "drawn": n,
            "seconds": round(seconds, 3),
            "caption_tokens": caption_tokens,
            "caption_truncated": caption_tokens > text_len,
            "reranked": result.scores is not None,
            "images": [{"rank": rank, "score": None if s is None else round(float(s), 4), "png": png_base64(img)}
                       for rank, (img, s) in enumerate(zip(result.images, scores), 1)],
        }

    def _saved(self, answer: dict[str, Any], result: Generation, command: str, extra: dict[str, Any]) -> dict:
        """Write the answer to ``save_dir/NNNNNN-<slug>/`` (1.png, 2.png, ..., request.json) when saving is on."""
        if self.save_dir is None:
            return answer
        from dalle.commands.generate import slugs

        with self._lock:
            self._served += 1
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{self._served:04d}-{slugs([result.caption])[0]}"
        folder = self.save_dir / name
        partial = self.save_dir / f".{name}.partial"
        partial.mkdir(parents=True, exist_ok=False)
        for rank, image in enumerate(result.images, 1):
            Image.fromarray(image).save(partial / f"{rank}.png")
        record = {key: value for key, value in answer.items() if key not in ("images", "input")}
        record.update(command=command, models=self.models, scores=[i["score"] for i in answer["images"]])
        if "input" in extra:
            Image.fromarray(extra.pop("input")).save(partial / "input.png")
            record["input"] = "input.png"
        record.update(extra)
        (partial / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(partial, folder)  # a crash mid-write leaves only a hidden .partial folder
        answer["saved"] = str(folder)
        return answer


def _fields(request: Any, allowed: dict[str, tuple[str, bool]], required: tuple[str, ...]) -> dict:
    """The request's fields after type checks; unknown or missing fields are errors that name them."""
    if not isinstance(request, dict):
        raise UserError(f"the request must be a JSON object, got {type(request).__name__}")
    unknown = sorted(set(request) - set(allowed))
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r} (known: {', '.join(allowed)})")
    missing = [name for name in required if request.get(name) is None]
    if missing:
        raise UserError(f"{missing[0]}: is required")
    for name, value in request.items():
        kind, nullable = allowed[name]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, KINDS[kind]):
            article = "an" if kind == "integer" else "a"
            raise UserError(f"{name}: must be {article} {kind}{' or null' if nullable else ''}, "
                            f"got {json.dumps(value)[:40]}")
    return {name: value for name, value in request.items() if value is not None}


def decode_image(text: str) -> np.ndarray:
    """A base64 image file (or ``data:image/...;base64,`` URL) → ``(H, W, 3)`` uint8, through the safe decoder."""
    from dalle.data.images import BadRecord, open_image
    from dalle.data.transforms import to_rgb

    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("image: is not valid base64") from None
    try:
        return np.asarray(to_rgb(open_image(data, max_pixels=MAX_UPLOAD_PIXELS)), dtype=np.uint8)
    except BadRecord as e:
        raise UserError(f"image: cannot be used ({e})") from None


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
