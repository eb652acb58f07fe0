"""``dalle generate`` and ``dalle complete``: images from captions, and completions of an image's lower rows.

    dalle generate "a red circle above a blue square" --run runs/pipeline --n 64 --keep 8 --out samples/
    dalle generate --captions-file captions.txt --run runs/pipeline --temperature 0.9 --top-k 64
    dalle complete photo.png --caption "a red circle above a blue square" --keep-rows 4 --run runs/pipeline

Both draw ``--n`` candidates per caption with the KV-cached sampler, decode them with the dVAE, score them with the
run's contrastive reranker (when there is one) and keep the best ``--keep`` (paper, "Sampling and evaluation").
They write OUT/<caption slug>/<rank>.png (rank 1 = best), OUT/contact_sheet.png (scores under the images) and
OUT/generations.json (captions, seeds, settings, scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dalle import clip_options, sample_options
from dalle.config import add_options, check, from_args, option, to_dict
from dalle.errors import UserError

if TYPE_CHECKING:  # imported lazily at run time: `dalle --help` should not load torch models
    from dalle.generation import Generation, Generator
    from dalle.models.sampling import SampleConfig
    from dalle.tokenizers.text import TextTokenizer

MAX_SLUG = 60  # characters of a caption kept in its folder name
SHEET_MIN_SIDE = 128  # images smaller than this are enlarged (nearest neighbour) on the contact sheet


@dataclasses.dataclass
class ModelsConfig:
    """Where a command that draws images (generate, complete, serve) finds its models, and where it runs them."""

    run: Path | None = option(None, "run directory of `dalle pipeline` (RUN/tokenizer, RUN/dvae/model, "
                              "RUN/prior/model, RUN/reranker/model); or give the parts below")
    prior: Path | None = option(None, "prior model directory (default: RUN/prior/model)")
    dvae: Path | None = option(None, "dVAE model directory (default: RUN/dvae/model)")
    tokenizer: Path | None = option(None, "text tokenizer directory (default: RUN/tokenizer, else the prior's own)")
    reranker: Path | None = option(None, "reranker: a model directory of `dalle reranker train` or a CLIP checkpoint "
                                   "(OpenAI's ViT-B-32.pt / RN50.pt, an open_clip .bin / .safetensors or directory); "
                                   "default: RUN/reranker/model if it exists")
    clip_vocab: Path | None = clip_options.clip_vocab("--reranker")
    clip_activation: str | None = clip_options.clip_activation()
    rerank: bool = option(True, "score the draws with the reranker (if any) and keep the best; --no-rerank keeps "
                          "the first draws")
    batch_size: int = option(64, "(caption, candidate) rows sampled at once; bounds memory (lower it for a large "
                             "prior)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    precision: str = sample_options.sampling_precision()
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice; on a busy 2-core machine one "
                                  "thread sampled the tiny preset faster than two)")

    def __post_init__(self) -> None:
        check(self.run is not None or (self.prior is not None and self.dvae is not None), self, "run",
              "is required unless both --prior and --dvae are given")
        for name in ("run", "prior", "dvae", "tokenizer", "reranker", "clip_vocab"):
            value = getattr(self, name)
            setattr(self, name, Path(value) if value is not None else None)
        check(self.batch_size >= 1, self, "batch_size", "must be at least 1")
        check(self.threads is None or self.threads >= 1, self, "threads", "must be at least 1")
        check(self.precision in sample_options.PRECISIONS, self, "precision",
              f"must be one of {', '.join(sample_options.PRECISIONS)}")


@dataclasses.dataclass
class GenerateConfig(ModelsConfig):
    n: int = option(8, "candidates drawn per caption (the paper: 512)")
    keep: int | None = option(None, "images kept per caption, best first (default: min(n, 8))")
    out: Path = option(Path("samples"), "output directory")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.out = Path(self.out)
        check(self.n >= 1, self, "n", "must be at least 1")
        check(self.keep is None or 1 <= self.keep <= self.n, self, "keep", f"must be between 1 and n = {self.n}")

    @property
    def kept(self) -> int:
        return self.keep if self.keep is not None else min(self.n, 8)


@dataclasses.dataclass
class CompleteConfig:
    caption: str | None = option(None, "what the completed image shows (required)")
    keep_rows: int | None = option(None, "rows of the image's code grid kept as the prompt: 0 (plain generation) "
                                   "to grid_size (the dVAE reconstruction); default: the top half")

    def __post_init__(self) -> None:
        check(self.caption is not None and self.caption.strip() != "", self, "caption", "is required and not empty")
        check(self.keep_rows is None or self.keep_rows >= 0, self, "keep_rows", "must be >= 0")


def register(sub: argparse._SubParsersAction) -> None:
    from dalle.models.sampling import SampleConfig

    gen = sub.add_parser(
        "generate", help="draw images for captions with the prior, decode them and keep the reranker's best",
        description="Draw --n candidates per caption (KV-cached sampling), decode them with the dVAE, score them "
        "with the reranker and keep the best --keep. Writes OUT/<slug>/<rank>.png, OUT/contact_sheet.png and "
        "OUT/generations.json. The same --seed gives the same images, whatever --batch-size.")
    gen.add_argument("captions", nargs="*", help="captions (or --captions-file)")
    gen.add_argument("--captions-file", type=Path, help="a text file with one caption per line (blank lines skipped)")
    add_options(gen, GenerateConfig, title="generation")
    add_options(gen, SampleConfig, title="sampling")
    gen.set_defaults(func=run_generate)

    comp = sub.add_parser(
        "complete", help="keep the top rows of an image's codes and let the prior draw the rest for a caption",
        description="Encode IMAGE with the dVAE (resized and centre-cropped to its resolution), keep the first "
        "--keep-rows rows of its codes as a prompt and draw the remaining rows --n times given --caption (the "
        "paper's zero-shot image-to-image translation); rerank and write the outputs as `dalle generate` does, plus "
        "OUT/input.png.")
    comp.add_argument("image", type=Path, help="image file to complete")
    add_options(comp, CompleteConfig, title="completion")
    add_options(comp, GenerateConfig, title="generation")
    add_options(comp, SampleConfig, title="sampling")
    comp.set_defaults(func=run_complete)


# --- handlers --------------------------------------------------------------------------------------------------


def load_generator(cfg: ModelsConfig) -> tuple[Generator, dict[str, str | None]]:
    """The Generator of ``cfg`` and the model directories it was loaded from."""
    import torch

    from dalle.generation import RUN_LAYOUT, Generator

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    parts = {name: getattr(cfg, name) for name in RUN_LAYOUT}
    if cfg.run is not None:
        if not cfg.run.is_dir():
            raise UserError(f"run directory {cfg.run} does not exist (make one with `dalle pipeline --out {cfg.run}`)")
        for name, sub in RUN_LAYOUT.items():
            if parts[name] is None and (name != "reranker" or (cfg.run / sub).is_dir()):
                parts[name] = cfg.run / sub
    if not cfg.rerank:
        parts["reranker"] = None
    generator = Generator.from_paths(parts["prior"], parts["dvae"], parts["tokenizer"], parts["reranker"],
                                     device=cfg.device, batch_size=cfg.batch_size, clip_vocab=cfg.clip_vocab,
                                     clip_activation=cfg.clip_activation, precision=cfg.precision)
    if parts["tokenizer"] is None:
        parts["tokenizer"] = parts["prior"]  # from_paths took the tokenizer saved beside the prior
    return generator, {name: None if path is None else str(path) for name, path in parts.items()}


def read_captions(positional: list[str], captions_file: Path | None) -> list[str]:
    captions = list(positional)
    if captions_file is not None:
        try:
            lines = captions_file.read_text(encoding="utf-8-sig").splitlines()  # a BOM is not a caption
        except FileNotFoundError:
            raise UserError(f"captions file {captions_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read captions file {captions_file}: {e}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UserError(f"captions file {captions_file} holds no captions")
        captions += from_file
    if not captions:
        raise UserError("no captions: give them as arguments or with --captions-file")
    return captions


def run_generate(args: argparse.Namespace) -> int:
    from dalle.models.sampling import SampleConfig

    cfg, sample = from_args(GenerateConfig, args), from_args(SampleConfig, args)
    captions = read_captions(args.captions, args.captions_file)
    generator, models = load_generator(cfg)
    lengths = caption_lengths(generator.tokenizer, captions)
    results = generator.generate(captions, n=cfg.n, keep=cfg.kept, sample=sample)
    record = {"command": "generate", "models": models, "precision": generator.precision}
    write_outputs(cfg, sample, results, record, lengths=lengths)
    return 0


def caption_lengths(tokenizer: TextTokenizer, captions: list[str]) -> list[dict[str, Any]]:
    """Each caption's BPE token count, for the record; says which captions are longer than the prior reads (its text
    length), so that a user knows the end of such a caption had no effect."""
    info = []
    for i, caption in enumerate(captions, 1):
        n = len(tokenizer.token_ids(caption))
        info.append({"caption_tokens": n, "caption_truncated": n > tokenizer.text_len})
        if n > tokenizer.text_len:
            text = tokenizer.normalize(caption)
            print(f"note: caption {i} is {n} tokens; the prior reads the first {tokenizer.text_len}, so its end is "
                  f"ignored ({text[:60]!r}{'...' if len(text) > 60 else ''})")
    return info


def run_complete(args: argparse.Namespace) -> int:
    from dalle.data.images import BadRecord, open_image
    from dalle.data.transforms import to_rgb
    from dalle.models.sampling import SampleConfig

    cfg, sample, comp = from_args(GenerateConfig, args), from_args(SampleConfig, args), from_args(CompleteConfig, args)
    try:
        image = np.asarray(to_rgb(open_image(args.image)), dtype=np.uint8)
    except BadRecord as e:
        raise UserError(f"cannot use {args.image} as an image: {e}") from None
    generator, models = load_generator(cfg)
    lengths = caption_lengths(generator.tokenizer, [comp.caption])
    keep_rows = generator.prompt_rows(comp.keep_rows)
    result = generator.complete(image, comp.caption, keep_rows, n=cfg.n, keep=cfg.kept, sample=sample)
    cfg.out.mkdir(parents=True, exist_ok=True)
    reconstruction = generator.reconstruct(image)  # what the prompt rows were taken from
    Image.fromarray(reconstruction).save(cfg.out / "input.png")
    write_outputs(cfg, sample, [result], {"command": "complete", "models": models, "precision": generator.precision,
                                          "image": str(args.image), "keep_rows": keep_rows, "input": "input.png"},
                  first_cell=(reconstruction, "input (dVAE)"), lengths=lengths)
    return 0


# --- outputs ---------------------------------------------------------------------------------------------------


def slugs(captions: list[str]) -> list[str]:
    """A folder name per caption (lower case, ``-`` for other characters), ``-2``, ``-3`` ... for repeats."""
    names: list[str] = []
    for caption in captions:
        base = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")[:MAX_SLUG].strip("-") or "caption"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def write_outputs(cfg: GenerateConfig, sample: SampleConfig, results: list[Generation], record: dict,
                  first_cell: tuple[np.ndarray, str] | None = None,
                  lengths: list[dict[str, Any]] | None = None) -> None:
    """The PNGs, the contact sheet and the JSON record of a run (with each caption's token count, given
    ``lengths``: :func:`caption_lengths`); prints where they went."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for index, (result, slug) in enumerate(zip(results, slugs([r.caption for r in results]))):
        folder = cfg.out / slug
        folder.mkdir(exist_ok=True)
        files = []
        for rank, image in enumerate(result.images, 1):
            Image.fromarray(image).save(folder / f"{rank}.png")
            files.append(f"{slug}/{rank}.png")
        scores = result.scores if result.scores is not None else [None] * len(result.images)
        cells = [(image, f"#{rank}" if score is None else f"#{rank}  {score:.2f}")
                 for rank, (image, score) in enumerate(zip(result.images, scores), 1)]
        rows.append((result.caption, ([first_cell] if first_cell else []) + cells))
        entries.append({"caption": result.caption, "caption_index": index, "files": files,
                        "scores": _floats(result.scores), "candidate_scores": _floats(result.candidate_scores)})
        if lengths is not None:
            entries[-1].update(lengths[index])
        best = f"best score {result.scores[0]:.2f}" if result.scores is not None else "no reranker: draw order"
        print(f"{result.caption!r}: {len(files)} of {len(result.candidates)} kept ({best}) -> {folder}/")
    contact_sheet(rows).save(cfg.out / "contact_sheet.png")
    settings = {**to_dict(cfg), "keep": cfg.kept, "sample": to_dict(sample),
                "seeding": "candidate j of caption i draws from its own stream, seeded from (seed, i, j)"}
    (cfg.out / "generations.json").write_text(json.dumps(
        {**record, "seed": sample.seed, "settings": settings, "generations": entries}, indent=2) + "\n")
    print(f"contact sheet: {cfg.out / 'contact_sheet.png'}; record: {cfg.out / 'generations.json'}")


def _floats(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else [round(float(v), 4) for v in values]


def contact_sheet(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], pad: int = 4) -> Image.Image:
    """One row per caption (its text above), each image with its label (rank and score) under it."""
    font = ImageFont.load_default()
    side = max(img.shape[0] for _, cells in rows for img, _ in cells)
    scale = max(1, -(-SHEET_MIN_SIDE // side))  # ceil: small images are enlarged to be legible
    cell = side * scale
    line = 14  # pixels per text line of the default font
    columns = max(len(cells) for _, cells in rows)
    width = pad + columns * (cell + pad)
    height = pad + len(rows) * (line + cell + line + pad)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    max_chars = max(8, width // 6)
    for r, (title, cells) in enumerate(rows):
        top = pad + r * (line + cell + line + pad)
        text = title if len(title) <= max_chars else title[: max_chars - 3] + "..."
        draw.text((pad, top), _drawable(text, font), fill="black", font=font)
        for c, (image, label) in enumerate(cells):
            left = pad + c * (cell + pad)
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (left, top + line))
            draw.text((left, top + line + cell + 1), label, fill="black", font=font)
    return sheet


def _drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """Pillow's bitmap fallback font (without FreeType) encodes text as Latin-1; replace what it cannot draw."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")
