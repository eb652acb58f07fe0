"""Stage 2 as a :class:`~dalle.training.loop.Task`: the transformer prior on a token cache (paper §2.2, appendix B.2).

The data are the argmax image codes and captions that ``dalle vae encode`` cached, so no dVAE runs in the loop.
Captions are tokenized per batch, with BPE dropout (paper: 0.1) on training batches only. The loss is the model's:
cross-entropy on text and on image tokens, each averaged over its own tokens, weighted 1/8 : 7/8.

Optimiser (appendix B.2): AdamW with β = (0.9, 0.96), ε = 1e-8 and weight decay 4.5e-2 on the weight matrices only
(not on gains, biases or embeddings), gradient norm clipped to 4, a linear learning-rate warm-up. The paper then halves
the rate on plateaus over 430k updates; a short run decays it by a cosine instead (the trainer's schedule).

Evaluation (EMA weights) on the first ``eval_examples`` records of the validation cache, without BPE dropout: text,
image and total loss. Samples: with a dVAE, images for a few fixed validation captions drawn by :func:`sample_codes`
(the KV-cached sampler of :mod:`dalle.models.sampling`, re-exported here) and decoded by the dVAE, as a PNG grid with
the captions in a sidecar ``.txt``.

BPE dropout draws, for each caption of each update, from a stream seeded by (run seed, update, record index): a run
with BPE dropout on is reproducible from its seed and resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dalle.checkpoint import save_model_dir
from dalle.config import check, option, to_dict
from dalle.data.token_cache import TokenCache, cache_batches
from dalle.data.transforms import to_uint8
from dalle.errors import UserError
from dalle.models.attention import IMPLS
from dalle.models.sampling import sample_codes
from dalle.models.transformer import KIND, PRESETS, TEXT_LOSS_WEIGHT, PriorConfig, PriorTransformer
from dalle.tokenizers.text import CONFIG_FILE, TOKENIZER_FILE, TextTokenizer
from dalle.training.config import TrainConfig, with_defaults
from dalle.training.loop import Task

DEFAULT_PRESET = "tiny"
PAPER_BPE_DROPOUT = 0.1

# Defaults of `dalle train`: the paper's optimiser (appendix B.2) with a learning rate and warm-up for short runs of the
# tiny preset (the paper warms up to 4.5e-4 over 5,000 of 430k updates at batch 1024).
PriorTrainLoopConfig = with_defaults(TrainConfig, "PriorTrainLoopConfig", out=Path("runs/prior"), steps=2000,
                                     batch_size=32, lr=1e-3, lr_min=1e-5, warmup_fraction=0.05,
                                     adam_betas=(0.9, 0.96), adam_eps=1e-8, weight_decay=4.5e-2, grad_clip=4.0,
                                     eval_every=250, checkpoint_every=250, log_every=25)


@dataclasses.dataclass
class PriorTrainConfig:
    cache: Path | None = option(None, "token cache of the training split (written by `dalle vae encode`; required)")
    val_cache: Path | None = option(None, "token cache of the validation split (evaluation and sample captions)")
    tokenizer: Path | None = option(None, "text tokenizer directory (`dalle tokenizer train`; required); it sets "
                                    "text_len and the text vocabulary")
    dvae: Path | None = option(None, "dVAE model directory that made the cache: decodes the sample grids")
    preset: str | None = option(None, f"prior architecture preset (default: {DEFAULT_PRESET}, with the cache's grid "
                                "and codebook; a preset given explicitly must match the cache)",
                                choices=tuple(PRESETS))
    dim: int | None = option(None, "model width (default: the preset's)")
    n_layers: int | None = option(None, "transformer blocks (default: the preset's)")
    n_heads: int | None = option(None, "attention heads (default: the preset's)")
    head_dim: int | None = option(None, "width of each head (default: the preset's)")
    dropout: float | None = option(None, "dropout on embeddings and residual branches (default: the preset's)")
    attn_impl: str | None = option(None, "attention implementation (default: the preset's; all are exact)",
                                   choices=IMPLS)
    attn_schedule: str | None = option(None, "attention kind per layer (default: the preset's, 'paper'): "
                                       "'paper', 'dense', or a comma-separated list of dense/row/column/conv")
    compile: bool = option(False, "compile each transformer block with torch.compile (faster steps after a "
                           "compilation of about a minute; needs a C compiler on CPU)")
    bpe_dropout: float = option(PAPER_BPE_DROPOUT, "BPE dropout on training captions (paper: 0.1; 0 = off, which "
                                "makes runs exactly reproducible)")
    text_loss_weight: float = option(TEXT_LOSS_WEIGHT, "weight of the text loss; the image's is 1 minus it "
                                     "(paper: 1/8)")
    eval_examples: int = option(512, "validation records used by each evaluation")
    sample_captions: int = option(8, "validation captions drawn in each sample grid (0 = no samples)")
    temperature: float = option(1.0, "sampling temperature of the sample grids")
    top_k: int | None = option(None, "sample only among the k most likely codes (default: all)")

    def __post_init__(self) -> None:
        check(self.cache is not None, self, "cache", "is required (--cache DIR, from `dalle vae encode`)")
        check(self.tokenizer is not None, self, "tokenizer", "is required (--tokenizer DIR, from `dalle tokenizer "
              "train`)")
        self.cache, self.tokenizer = Path(self.cache), Path(self.tokenizer)
        self.val_cache = Path(self.val_cache) if self.val_cache is not None else None
        self.dvae = Path(self.dvae) if self.dvae is not None else None
        check(self.preset is None or self.preset in PRESETS, self, "preset", f"must be one of {', '.join(PRESETS)}")
        for name in ("dim", "n_layers", "n_heads", "head_dim"):
            check(getattr(self, name) is None or getattr(self, name) >= 1, self, name, "must be at least 1")
        check(self.dropout is None or 0.0 <= self.dropout < 1.0, self, "dropout", "must be in [0, 1)")
        check(self.attn_impl is None or self.attn_impl in IMPLS, self, "attn_impl",
              f"must be one of {', '.join(IMPLS)}")
        check(0.0 <= self.bpe_dropout < 1.0, self, "bpe_dropout", "must be in [0, 1)")
        check(0.0 <= self.text_loss_weight <= 1.0, self, "text_loss_weight", "must be in [0, 1]")
        check(self.eval_examples >= 1, self, "eval_examples", "must be at least 1")
        check(self.sample_captions >= 0, self, "sample_captions", "must be >= 0")
        check(self.temperature > 0, self, "temperature", "must be positive")
        check(self.top_k is None or self.top_k >= 1, self, "top_k", "must be at least 1")

    def model_config(self, tokenizer: TextTokenizer, grid_size: int, codebook_size: int) -> PriorConfig:
        """The preset with this config's overrides, the tokenizer's text sizes and the cache's image sizes."""
        base = PRESETS[self.preset or DEFAULT_PRESET]
        if self.preset is not None and (base.grid_size, base.codebook_size) != (grid_size, codebook_size):
            raise UserError(f"prior preset {self.preset!r} models a {base.grid_size}x{base.grid_size} grid of "
                            f"{base.codebook_size} codes but the token cache holds {grid_size}x{grid_size} codes of "
                            f"{codebook_size}; leave out --preset to take the cache's sizes")
        overrides = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "head_dim", "dropout", "attn_impl",
                                                   "attn_schedule") if getattr(self, k) is not None}
        return dataclasses.replace(base, text_vocab_size=tokenizer.vocab_size, text_len=tokenizer.text_len,
                                   grid_size=grid_size, codebook_size=codebook_size, **overrides)


def open_cache(path: Path, what: str) -> TokenCache:
    if not path.exists():
        raise UserError(f"{what} {path} does not exist; write it with `dalle vae encode --out {path}`")
    return TokenCache(path)


# --- sample grids ---------------------------------------------------------------------------------------------------


def save_sample_grid(images: np.ndarray, captions: list[str], path: Path, columns: int = 8, pad: int = 2) -> None:
    """``(N, H, W, 3)`` uint8 images as a PNG grid, with ``path.txt`` listing the caption of each cell in order."""
    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"row {i // columns + 1}, column {i % columns + 1}: {text}" for i, text in enumerate(captions)]
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    tmp.replace(path)


# --- the task ------------------------------------------------------------------------------------------------------


class PriorTask(Task):
    progress_keys = ("text_loss", "image_loss")
    meta_init = True  # PriorTransformer builds on the meta device and initialises itself with init_weights()

    def __init__(self, prior: PriorTrainConfig, model: PriorConfig | None = None):
        self.prior = prior
        self.tokenizer = TextTokenizer.load(prior.tokenizer)
        # BPE dropout is the tokenizer's setting at encode time; ours replaces the one it was saved with.
        self.tokenizer.config = dataclasses.replace(self.tokenizer.config, dropout=prior.bpe_dropout)
        self.cache = open_cache(prior.cache, "token cache")
        self.val = open_cache(prior.val_cache, "validation token cache") if prior.val_cache is not None else None
        if self.val is not None and (self.val.grid_size, self.val.codebook_size) != (self.cache.grid_size,
                                                                                     self.cache.codebook_size):
            raise UserError(f"{prior.val_cache} holds {self.val.grid_size}x{self.val.grid_size} codes of "
                            f"{self.val.codebook_size} but {prior.cache} holds {self.cache.grid_size}x"
                            f"{self.cache.grid_size} of {self.cache.codebook_size}: encode both with the same dVAE")
        self.model_cfg = model or prior.model_config(self.tokenizer, self.cache.grid_size, self.cache.codebook_size)
        if (self.model_cfg.grid_size, self.model_cfg.codebook_size) != (self.cache.grid_size,
                                                                        self.cache.codebook_size):
            raise UserError("the prior's grid_size / codebook_size differ from the token cache's")
        self._dvae: nn.Module | None = None

    def config(self) -> dict[str, Any]:
        return {"model": to_dict(self.model_cfg), "prior": to_dict(self.prior)}

    def build_model(self) -> nn.Module:
        model = PriorTransformer(self.model_cfg)
        if self.prior.compile:
            for block in model.blocks:  # in place: parameter names, and so checkpoints, stay those of the model
                block.compile()
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # Appendix B.2: weight decay on the weight matrices only, never on gains, biases or embeddings.
        decay, no_decay = model.weight_decay_groups()
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    # --- training ----------------------------------------------------------------------------------------------

    def train_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        return cache_batches(self.cache, self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch, shuffle=True,
                             workers=self.cfg.workers, drop_last=True)

    def _tokens(self, batch: dict[str, Any], dropout: bool,
                step: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seeds = [f"{self.cfg.seed}/{step}/{int(i)}" for i in batch["indices"]] if dropout else None
        ids, pad_mask = self.tokenizer.encode_batch(batch["captions"], dropout=dropout, seeds=seeds)  # (B, text_len)
        codes = batch["codes"].to(self.device, non_blocking=True)  # (B, g, g)
        return ids.to(self.device), pad_mask.to(self.device), codes

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, pad_mask, codes = self._tokens(batch, dropout=self.prior.bpe_dropout > 0, step=step)
        out = model.loss(ids, pad_mask, codes, self.prior.text_loss_weight)
        return out.total, {"text_loss": out.text.detach(), "image_loss": out.image.detach()}

    # --- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        if self.val is None:
            return {}
        model.eval()
        n = min(self.prior.eval_examples, len(self.val))
        sums = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
        for batch in cache_batches(self.val, self.cfg.batch_size, shuffle=False, drop_last=False):
            keep = min(len(batch["captions"]), n - int(batch["indices"][0]))
            if keep <= 0:
                break
            batch = {"captions": batch["captions"][:keep], "codes": batch["codes"][:keep]}
            ids, pad_mask, codes = self._tokens(batch, dropout=False)
            out = model.loss(ids, pad_mask, codes, self.prior.text_loss_weight)
            for k, v in zip(("loss", "text_loss", "image_loss"), out, strict=True):
                sums[k] += float(v) * keep  # each term is a mean over the batch's tokens; batches differ in size
        values = {k: v / n for k, v in sums.items()}
        values["image_bits_per_token"] = values["image_loss"] / math.log(2)
        return values

    def _sample_captions(self) -> list[str]:
        source = self.val if self.val is not None else self.cache
        return [source.record(i)["caption"] for i in range(min(self.prior.sample_captions, len(source)))]

    def _decoder(self) -> nn.Module:
        if self._dvae is None:
            from dalle.models.dvae import DVAE

            dvae = DVAE.from_pretrained(self.prior.dvae, device=self.device).eval()
            if (dvae.config.grid_size, dvae.config.codebook_size) != (self.cache.grid_size, self.cache.codebook_size):
                raise UserError(f"the dVAE {self.prior.dvae} makes {dvae.config.grid_size}x{dvae.config.grid_size} "
                                f"codes of {dvae.config.codebook_size}, not the token cache's")
            self._dvae = dvae
        return self._dvae

    def write_samples(self, model: nn.Module, step: int, out_dir: Path) -> Path | None:
        if self.prior.dvae is None or self.prior.sample_captions == 0:
            return None
        model.eval()
        captions = self._sample_captions()
        ids, pad_mask = self.tokenizer.encode_batch(captions)  # (B, text_len), no dropout
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed)  # the same draws at every evaluation
        codes = sample_codes(model, ids.to(self.device), pad_mask.to(self.device), temperature=self.prior.temperature,
                             top_k=self.prior.top_k, generator=gen)  # (B, g, g)
        images = self._decoder().decode(codes)  # (B, 3, H, W) in [0, 1]
        path = out_dir / f"step-{step:08d}.png"
        save_sample_grid(to_uint8(images), captions, path)
        return path

    def export(self, model: nn.Module, path: Path) -> None:
        """The model directory (``config.json`` of kind "prior" + ``model.safetensors``) with the tokenizer's files."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        src = self.prior.tokenizer if self.prior.tokenizer.is_dir() else self.prior.tokenizer.parent
        extra = {name: (src / name).read_text(encoding="utf-8") for name in (TOKENIZER_FILE, CONFIG_FILE)
                 if (src / name).is_file()}
        save_model_dir(path, {"kind": KIND, **to_dict(model.config)}, state, extra_files=extra)

    def data_summary(self) -> str:
        stats = self.tokenizer.stats
        if not stats.captions:
            return ""
        return (f"{stats.captions} captions tokenized, {stats.mean_tokens:.1f} tokens on average (max "
                f"{stats.max_tokens}), {stats.truncated_fraction:.1%} cut to {self.tokenizer.text_len}")
