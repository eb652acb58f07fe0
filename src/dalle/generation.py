"""Text to image, as the paper samples it (Figure 1; "Sampling and evaluation"): the caption's BPE tokens prompt the
prior, which draws N candidate code grids (KV-cached, :mod:`dalle.models.sampling`); the dVAE decodes them; the
contrastive reranker scores each against the caption and the best k are kept (the paper: N = 512).

:meth:`Generator.complete` is the paper's image completion (zero-shot image-to-image translation, §3.3 and Figure 2):
the dVAE codes of an image's first rows are a prompt and the prior draws the rest.

Draws are batched across captions × candidates, ``batch_size`` rows at a time, so memory stays bounded. Every
(caption index, candidate) has its own random stream, seeded from ``SampleConfig.seed``, the caption's index in the
list and the candidate's index: the same call gives the same images whatever the batch size, and asking for more
candidates keeps the first ones unchanged.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle.data.transforms import ImageTransform, to_float, to_uint8
from dalle.errors import UserError
from dalle.models.dvae import DVAE
from dalle.models.reranker import Scorer, load_reranker
from dalle.models.sampling import PriorDecoder, SampleConfig
from dalle.models.transformer import PriorTransformer
from dalle.sample_options import PRECISIONS
from dalle.tokenizers.text import TOKENIZER_FILE, TextTokenizer

# Rows (caption, candidate) sampled at once; the KV cache and activations scale with it. 64, not 16: the candidates of
# a caption share its keys, and with make demo's prior 2 captions x 64 candidates took 1.4-1.9 s instead of 2.3-3.3 s.
DEFAULT_BATCH_SIZE = 64

# Where `dalle pipeline` (src/dalle/commands/pipeline.py) puts each part of a run.
RUN_LAYOUT = {"tokenizer": "tokenizer", "dvae": "dvae/model", "prior": "prior/model", "reranker": "reranker/model"}


@dataclass
class Generation:
    """The images kept for one caption, best first when a reranker scored them, and every draw behind them."""

    caption: str
    images: np.ndarray  # (keep, H, W, 3) uint8
    scores: np.ndarray | None  # (keep,) contrastive scores, None without a reranker
    codes: torch.Tensor  # (keep, g, g)
    candidates: np.ndarray  # (n, H, W, 3) uint8, all draws in draw order
    candidate_scores: np.ndarray | None  # (n,)


def candidate_seed(seed: int, caption_index: int, candidate: int) -> int:
    """The seed of one (caption, candidate) stream: independent streams from one user seed (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, caption_index, candidate]).generate_state(1, np.uint64)[0])


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The prior's dtype for ``precision`` (:data:`PRECISIONS`) on ``device``: ``auto`` decides as training's
    ``--amp auto`` does (:func:`dalle.training.precision.autocast_dtype`)."""
    from dalle.training.precision import autocast_dtype

    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return autocast_dtype("none" if precision == "fp32" else precision, device) or torch.float32


class Generator:
    """Prior + dVAE + text tokenizer (+ reranker): captions in, images out.

    ``precision`` (:data:`PRECISIONS`) sets the prior's arithmetic while sampling: bf16 computes each step's matrix
    products about twice as fast on a CPU with bf16 in hardware, and the codes it draws are those of fp32 but for
    rare near-ties (bench/RESULTS.md, "Sampling for `dalle eval`"). A prior in another dtype is sampled from a copy. In
    bf16 the dVAE decodes under bf16 autocast too (2.3× faster at 48 px on this CPU; pixels within a mean 0.4 of 255
    levels of fp32's); the reranker stays in its own precision.
    """

    def __init__(self, prior: PriorTransformer, dvae: DVAE, tokenizer: TextTokenizer, reranker: Scorer | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, precision: str = "fp32"):
        pc, dc = prior.config, dvae.config
        if (pc.grid_size, pc.codebook_size) != (dc.grid_size, dc.codebook_size):
            raise UserError(f"the prior models {pc.grid_size}x{pc.grid_size} codes of {pc.codebook_size} but the "
                            f"dVAE makes {dc.grid_size}x{dc.grid_size} codes of {dc.codebook_size}: they were not "
                            "trained together")
        if tokenizer.text_len != pc.text_len or tokenizer.vocab_size > pc.text_vocab_size:
            raise UserError(f"the text tokenizer ({tokenizer.vocab_size} tokens, text_len {tokenizer.text_len}) does "
                            f"not fit the prior ({pc.text_vocab_size} tokens, text_len {pc.text_len})")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        dtype = sampling_dtype(precision, prior.image_head.weight.device)
        if prior.image_head.weight.dtype != dtype:
            prior = copy.deepcopy(prior).to(dtype)
        self.prior, self.dvae, self.tokenizer, self.reranker = prior.eval(), dvae.eval(), tokenizer, reranker
        self.batch_size = batch_size
        self.decoder = PriorDecoder(self.prior)  # keeps its KV cache between batches of the same size

    @classmethod
    def from_parts(cls, prior: PriorTransformer, dvae: DVAE, tokenizer: TextTokenizer,
                   reranker: Scorer | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                   precision: str = "fp32") -> Generator:
        return cls(prior, dvae, tokenizer, reranker, batch_size, precision)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu", *,
                 batch_size: int = DEFAULT_BATCH_SIZE, reranker: Scorer | None = None,
                 precision: str = "fp32") -> Generator:
        """Load ``RUN/tokenizer``, ``RUN/dvae/model``, ``RUN/prior/model`` and ``RUN/reranker/model`` (optional;
        ``reranker`` replaces it)."""
        run = Path(run_dir)
        if not run.is_dir():
            raise UserError(f"run directory {run} does not exist (make one with `dalle pipeline --out {run}`)")
        parts = {name: run / sub for name, sub in RUN_LAYOUT.items()}
        for name in ("tokenizer", "dvae", "prior"):
            if not parts[name].is_dir():
                raise UserError(f"{run} has no {name} ({parts[name]} is missing): finish the run with "
                                f"`dalle pipeline --out {run}`")
        own = parts["reranker"] if parts["reranker"].is_dir() and reranker is None else None
        generator = cls.from_paths(parts["prior"], parts["dvae"], parts["tokenizer"], own, device=device,
                                   batch_size=batch_size, precision=precision)
        if reranker is not None:
            generator.reranker = reranker
        return generator

    @classmethod
    def from_paths(cls, prior: str | os.PathLike, dvae: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   reranker: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                   batch_size: int = DEFAULT_BATCH_SIZE, clip_vocab: str | os.PathLike | None = None,
                   clip_activation: str | None = None, precision: str = "fp32") -> Generator:
        """Load model directories; the tokenizer defaults to the one saved beside the prior.

        ``reranker``: our reranker's model directory or a CLIP checkpoint (``clip_vocab``, ``clip_activation``: see
        :func:`dalle.models.reranker.load_reranker`).
        """
        from dalle.training.loop import resolve_device

        device = resolve_device(str(device))
        prior_model = PriorTransformer.from_pretrained(prior, device).to(sampling_dtype(precision, device))
        if tokenizer is None:
            if not (Path(prior) / TOKENIZER_FILE).is_file():
                raise UserError(f"{prior} holds no {TOKENIZER_FILE}: give the text tokenizer explicitly")
            tokenizer = prior
        scorer = load_reranker(reranker, device, clip_vocab, clip_activation) if reranker is not None else None
        return cls(prior_model, DVAE.from_pretrained(dvae, device), TextTokenizer.load(tokenizer), scorer, batch_size,
                   precision)

    @property
    def grid_size(self) -> int:
        return self.prior.config.grid_size

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def precision(self) -> str:
        """The prior's arithmetic while sampling: ``fp32`` or ``bf16``."""
        return "bf16" if self.decoder.dtype == torch.bfloat16 else "fp32"

    # --- generation ----------------------------------------------------------------------------------------------

    def generate(self, captions: list[str], n: int = 1, keep: int | None = None, sample: SampleConfig | None = None,
                 prompt_codes: torch.Tensor | None = None) -> list[Generation]:
        """``n`` draws per caption, the best ``keep`` (default: all) of them kept; one :class:`Generation` each.

        ``prompt_codes``: known leading codes in raster order, ``(P,)`` for every caption or ``(len(captions), P)``.
        """
        captions = _check_captions(captions)
        keep = n if keep is None else keep
        if n < 1 or not 1 <= keep <= n:
            raise UserError(f"need n >= 1 and 1 <= keep <= n, got n={n}, keep={keep}")
        sample = sample or SampleConfig()
        prompts = self._prompts(prompt_codes, len(captions))
        codes = self._draw(captions, n, sample, prompts).view(len(captions), n, self.grid_size, self.grid_size)
        images = self._decode(codes.flatten(0, 1)).reshape(len(captions), n, *self._image_shape())
        return [self._select(caption, codes[c], images[c], keep) for c, caption in enumerate(captions)]

    def prompt_rows(self, keep_rows: int | None) -> int:
        """The code rows a completion keeps: ``keep_rows`` checked against the grid, or the top half when None."""
        g = self.grid_size
        if keep_rows is None:
            return g // 2
        if isinstance(keep_rows, bool) or not isinstance(keep_rows, int | np.integer) or not 0 <= keep_rows <= g:
            raise UserError(f"keep_rows must be a whole number of code rows between 0 and {g}, got {keep_rows!r}")
        return int(keep_rows)

    def complete(self, image: np.ndarray, caption: str, keep_rows: int | None = None, n: int = 1,
                 keep: int | None = None, sample: SampleConfig | None = None) -> Generation:
        """Keep the first ``keep_rows`` rows of ``image``'s codes (default: the top half, :meth:`prompt_rows`) and
        draw the rest ``n`` times, given ``caption``.

        ``keep_rows = 0`` is plain generation; ``keep_rows = grid_size`` gives back the dVAE reconstruction.
        """
        keep_rows = self.prompt_rows(keep_rows)
        codes = self.encode_image(image)  # (g, g)
        return self.generate([caption], n, keep, sample, prompt_codes=codes[:keep_rows].flatten())[0]

    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 → its ``(g, g)`` dVAE codes, after the training pre-processing (resize, centre crop)."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            what = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise UserError(f"the image must be an (H, W, 3) uint8 array, got {what}")
        pixels = ImageTransform(resolution=self.dvae.config.resolution, crop="center")(Image.fromarray(image))
        param = next(self.dvae.parameters())
        batch = to_float(np.array(pixels[None]))  # (1, 3, R, R); a writable copy of the read-only PIL view
        return self.dvae.encode(batch.to(param.device, param.dtype))[0].cpu()  # (g, g)

    def reconstruct(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 → its ``(R, R, 3)`` dVAE reconstruction (what ``keep_rows = grid_size`` gives)."""
        return self._decode(self.encode_image(image)[None])[0]

    def _image_shape(self) -> tuple[int, int, int]:
        r = self.dvae.config.resolution
        return r, r, 3

    def _prompts(self, prompt_codes: torch.Tensor | None, n_captions: int) -> torch.Tensor | None:
        if prompt_codes is None:
            return None
        prompts = torch.as_tensor(prompt_codes)
        if prompts.dim() == 1:
            prompts = prompts.expand(n_captions, -1)
        if prompts.dim() != 2 or prompts.shape[0] != n_captions:
            raise UserError(f"prompt_codes must be (P,) or ({n_captions}, P) leading codes, got "
                            f"{tuple(prompts.shape)}")
        return prompts

    def _draw(self, captions: list[str], n: int, sample: SampleConfig, prompts: torch.Tensor | None) -> torch.Tensor:
        """Codes ``(C·n, g, g)`` in (caption, candidate) order, ``batch_size`` rows at a time."""
        ids, pad_mask = self.tokenizer.encode_batch(captions)  # (C, text_len)
        seed = sample.seed if sample.seed is not None else int(torch.randint(2**62, ()))
        out = []
        for chunk in _chunks(len(captions), n, self.batch_size):
            which = torch.tensor([c for c, _ in chunk])
            gens = [torch.Generator(self.device).manual_seed(candidate_seed(seed, c, j)) for c, j in chunk]
            prompt = prompts[which].to(self.device) if prompts is not None else None
            out.append(self.decoder.sample(ids[which].to(self.device), pad_mask[which].to(self.device), sample,
                                           prompt=prompt, generator=gens).cpu())
        return torch.cat(out)

    def _decode(self, codes: torch.Tensor) -> np.ndarray:
        """``(M, g, g)`` codes → ``(M, H, W, 3)`` uint8 images, ``batch_size`` at a time; under bf16 autocast when
        the prior samples in bf16."""
        device = next(self.dvae.parameters()).device
        bf16 = self.decoder.dtype == torch.bfloat16
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return np.concatenate([to_uint8(self.dvae.decode(codes[i:i + self.batch_size].to(device)))
                                   for i in range(0, len(codes), self.batch_size)])

    def score(self, images: np.ndarray, caption: str) -> np.ndarray | None:
        """Contrastive scores ``(n,)`` of ``(n, H, W, 3)`` uint8 images against one caption (None: no reranker)."""
        if self.reranker is None:
            return None
        image_emb = self.reranker.embed_images(torch.from_numpy(images), self.batch_size)  # (n, E)
        text_emb = self.reranker.embed_captions([caption])[0]  # (E,)
        return (self.reranker.scale * (image_emb @ text_emb)).cpu().numpy()

    def _select(self, caption: str, codes: torch.Tensor, images: np.ndarray, keep: int) -> Generation:
        scores = self.score(images, caption)
        # Best first by score (ties keep draw order); without a reranker, the first `keep` draws.
        order = np.argsort(-scores, kind="stable")[:keep] if scores is not None else np.arange(keep)
        return Generation(caption=caption, images=images[order], scores=None if scores is None else scores[order],
                          codes=codes[torch.from_numpy(order)], candidates=images, candidate_scores=scores)


def _chunks(n_captions: int, n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The (caption, candidate) rows in draw order, in batches of at most ``batch_size`` that never split a caption's
    candidates unevenly: whole captions while they fit, else equal runs of one caption. Each batch then holds blocks
    of one caption of equal size, which the decoder keeps one copy of the caption's keys for."""
    if n <= batch_size:
        per = batch_size // n
        return [[(c, j) for c in range(first, min(first + per, n_captions)) for j in range(n)]
                for first in range(0, n_captions, per)]
    return [[(c, j) for j in range(first, min(first + batch_size, n))]
            for c in range(n_captions) for first in range(0, n, batch_size)]


def _check_captions(captions: list[str]) -> list[str]:
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise UserError("captions must be a list of strings")
    if not captions:
        raise UserError("no captions given")
    for i, caption in enumerate(captions):
        if not caption.strip():
            raise UserError(f"caption {i + 1} is empty")
    return list(captions)
