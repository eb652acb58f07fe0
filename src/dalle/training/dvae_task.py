"""Stage 1 as a :class:`~dalle.training.loop.Task`: the paper's dVAE recipe (section 2.1, appendix A.2).

Loss: the ELB with the KL weighted by β, NLL + β·KL per image in nats (the decoder's likelihood, the paper's
logit-Laplace or the tiny presets' Gaussian, see :data:`dalle.models.dvae.LIKELIHOODS`; KL of the encoder's categorical
to a uniform prior over the K codes), with the decoder fed a Gumbel-softmax sample at temperature τ. τ follows a cosine
from 1 to 1/16 and β a linear ramp from 0 to 6.6 (0.2 with the Gaussian decoder, see :data:`DEFAULT_BETA`); both
lengths scale with the run (see :class:`DVAETrainConfig`). The trainer adds Adam, the cosine learning rate and the EMA
of the weights.

Evaluation (EMA weights, a fixed set of validation images): reconstruction MSE and PSNR from the argmax codes (what the
prior will see), the relaxed ELB (Gumbel sample at the current τ), the true ELB (argmax one-hot, no noise) and their
gap, and the use of the codebook (perplexity of the code histogram, distinct codes). Samples: a PNG of originals over
their reconstructions in ``RUN/samples/``.
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

from dalle.config import check, option, to_dict
from dalle.data.config import DataConfig
from dalle.data.loader import TrainingEpochs, make_loader
from dalle.data.records import SkipStats
from dalle.data.transforms import map_pixels, to_float, to_uint8
from dalle.models.dvae import DVAE, LIKELIHOODS, PRESETS, WIDTH_MULTIPLIERS, DVAEConfig, ResBlock
from dalle.training.code_restarts import CodeRestarts
from dalle.training.config import TrainConfig, with_defaults
from dalle.training.loop import Task
from dalle.training.losses import bits_per_dim, code_usage, dvae_terms, likelihood_nll, psnr
from dalle.training.schedules import cosine, linear, schedule_steps

PAPER_TAU_END = 1 / 16
DATA_INIT_IMAGES = 256
PAPER_BETA = 6.6
# β by likelihood, when --beta is not given. The paper's 6.6 was set against the logit-Laplace, whose learned scale
# makes the reconstruction term large; against the Gaussian of σ = 0.1 the same β kept the encoder's codes vaguer than
# the images need: at tiny-64 and 1,500 updates, β 0.2 kept 32% of small shapes through the round trip over two seeds
# against 22% with 6.6, and 1.0 kept 27% (bench/RESULTS.md, "The KL weight against the Gaussian decoder").
DEFAULT_BETA = {"logit-laplace": PAPER_BETA, "gaussian": 0.2}
PAPER_BETA_FRACTION = 5_000 / 3_000_000  # the ramp's share of the paper's run

# Defaults of `dalle vae train`: the tiny-64 preset on 64-pixel images, in minutes on 2 CPU cores. Adam at 3e-4 (the
# paper: 1e-4 at batch 512) after a 5% warm-up: at 2e-3, or without the warm-up, the encoder saturated one code at
# every position within 40 updates and never recovered (bench/RESULTS.md, "dVAE").
DVAETrainLoopConfig = with_defaults(TrainConfig, "DVAETrainLoopConfig", out=Path("runs/dvae"), steps=3000,
                                    batch_size=32, lr=3e-4, lr_min=1e-5, warmup_fraction=0.05, eval_every=500,
                                    checkpoint_every=500, log_every=50)


@dataclasses.dataclass
class DVAETrainConfig:
    preset: str = option("tiny-64", "dVAE architecture preset", choices=tuple(PRESETS))
    codebook_size: int | None = option(None, "number of codes K (default: the preset's)")
    n_hid: int | None = option(None, "encoder base width (default: the preset's)")
    n_groups: int | None = option(None, "groups of resblocks (default: the preset's); the image is down-sampled "
                                  "2 ** (n_groups - 1) times per side, so one group fewer doubles the code grid")
    n_blk_per_group: int | None = option(None, "resblocks per group (default: the preset's)")
    likelihood: str | None = option(None, "the decoder's likelihood (default: the preset's): logit-laplace (the "
                                    "paper's) or gaussian (fixed σ; see --gaussian-sigma)", choices=LIKELIHOODS)
    gaussian_sigma: float = option(0.1, "with the gaussian likelihood: its standard deviation on the [0, 1] pixel "
                                   "scale, which also sets how much the KL weighs against the reconstruction")
    tau_start: float = option(1.0, "Gumbel-softmax temperature at the start (paper: 1)")
    tau_end: float = option(PAPER_TAU_END, "temperature at the end of the annealing (paper: 1/16)")
    tau_steps: int | None = option(None, "length of the cosine annealing of the temperature in updates "
                                   "(default: --tau-fraction of the steps)")
    tau_fraction: float = option(0.5, "length of the temperature annealing as a fraction of the run (paper: "
                                 "150k of 3M updates = 0.05; short runs need longer to learn at high τ)")
    beta: float | None = option(None, "weight β of the KL term at the end of its ramp (default: the paper's 6.6 "
                                "with the logit-laplace likelihood, 0.2 with the gaussian)")
    beta_steps: int | None = option(None, "length of the linear ramp of β from 0 in updates (default: "
                                    "--beta-fraction of the steps)")
    beta_fraction: float = option(PAPER_BETA_FRACTION, "length of the β ramp as a fraction of the run (paper: 5k "
                                  "of 3M updates; a longer ramp let the codebook collapse before β took hold)")
    dequantize: bool = option(True, "add uniform noise of one 8-bit step to the pixels before the mapping, so the "
                              "continuous likelihood stays bounded on flat regions (see the module doc)")
    data_init: bool = option(True, "data-dependent initialisation of the encoder's last conv: each code's logit "
                             "is standardised over 256 training images (see the module doc)")
    data_init_std: float = option(1.0, "standard deviation of each code's logit after the data-dependent "
                                  "initialisation")
    decoder_lr_scale: float = option(10.0, "the decoder learns at this multiple of --lr (at one rate for both, "
                                     "the encoder collapsed the codebook before the decoder learned colours; see "
                                     "bench/RESULTS.md, \"dVAE\")")
    restart_every: int = option(0, "every this many updates, re-make codes that no image of a fixed training "
                                "sample uses by splitting busy ones (against codebook collapse at small scale; "
                                "not in the paper; 0 = off)")
    restart_fraction: float = option(0.5, "restart dead codes only in this first fraction of the run")
    restart_max: int = option(16, "codes restarted at most per check")
    eval_images: int = option(256, "validation images used by each evaluation")
    sample_images: int = option(16, "validation images in each reconstruction grid")

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, self, "preset", f"must be one of {', '.join(PRESETS)}")
        check(self.codebook_size is None or self.codebook_size >= 2, self, "codebook_size", "must be at least 2")
        check(self.n_hid is None or (self.n_hid >= 4 and self.n_hid % 4 == 0), self, "n_hid",
              "must be a positive multiple of 4")
        check(self.n_groups is None or 1 <= self.n_groups <= len(WIDTH_MULTIPLIERS), self, "n_groups",
              f"must be between 1 and {len(WIDTH_MULTIPLIERS)}")
        check(self.n_blk_per_group is None or self.n_blk_per_group >= 1, self, "n_blk_per_group", "must be at least 1")
        check(self.likelihood is None or self.likelihood in LIKELIHOODS, self, "likelihood",
              f"must be one of {', '.join(LIKELIHOODS)}")
        check(self.gaussian_sigma > 0, self, "gaussian_sigma", "must be positive")
        check(self.tau_start > 0, self, "tau_start", "must be positive")
        check(0 < self.tau_end <= self.tau_start, self, "tau_end", "must be in (0, tau_start]")
        check(self.tau_steps is None or self.tau_steps >= 0, self, "tau_steps", "must be >= 0")
        check(0.0 <= self.tau_fraction <= 1.0, self, "tau_fraction", "must be in [0, 1]")
        check(self.beta is None or self.beta >= 0, self, "beta", "must be >= 0")
        check(self.beta_steps is None or self.beta_steps >= 0, self, "beta_steps", "must be >= 0")
        check(0.0 <= self.beta_fraction <= 1.0, self, "beta_fraction", "must be in [0, 1]")
        check(self.decoder_lr_scale > 0, self, "decoder_lr_scale", "must be positive")
        check(self.restart_every >= 0, self, "restart_every", "must be >= 0")
        check(0.0 <= self.restart_fraction <= 1.0, self, "restart_fraction", "must be in [0, 1]")
        check(self.restart_max >= 1, self, "restart_max", "must be at least 1")
        check(self.eval_images >= 1, self, "eval_images", "must be at least 1")
        check(self.sample_images >= 0, self, "sample_images", "must be >= 0")

    def model_config(self, resolution: int | None = None) -> DVAEConfig:
        """The preset with this config's overrides (and the data's resolution, when given)."""
        overrides = {k: v for k, v in (("codebook_size", self.codebook_size), ("n_hid", self.n_hid),
                                       ("n_groups", self.n_groups), ("n_blk_per_group", self.n_blk_per_group),
                                       ("likelihood", self.likelihood), ("resolution", resolution)) if v is not None}
        return dataclasses.replace(PRESETS[self.preset], **overrides)


class DVAETask(Task):
    progress_keys = ("nll", "kl", "tau", "beta", "perplexity")

    def __init__(self, dvae: DVAETrainConfig, data: DataConfig, model: DVAEConfig | None = None):
        self.dvae, self.data = dvae, data
        self.model_cfg = model or dvae.model_config(data.resolution)
        if self.model_cfg.resolution != data.resolution:
            raise ValueError(f"model resolution {self.model_cfg.resolution} != data resolution {data.resolution}")
        self.epochs: TrainingEpochs | None = None  # epochs after the first decode no image again
        self.stats = SkipStats()
        self._val: torch.Tensor | None = None
        self.restarts: CodeRestarts | None = None
        self.nll = likelihood_nll(self.model_cfg.likelihood, dvae.gaussian_sigma)
        self.beta_end = dvae.beta if dvae.beta is not None else DEFAULT_BETA[self.model_cfg.likelihood]

    def config(self) -> dict[str, Any]:
        return {"model": to_dict(self.model_cfg), "dvae": to_dict(self.dvae), "data": to_dict(self.data)}

    def build_model(self) -> nn.Module:
        # channels_last: oneDNN's convolutions skip a layout conversion per conv, ~1.5x faster per step on CPU; the
        # batches arrive in that layout already ((B, H, W, 3) uint8 permuted to (B, 3, H, W)).
        model = DVAE(self.model_cfg).to(self.device, memory_format=torch.channels_last)
        d = self.dvae
        if d.data_init or d.restart_every > 0:
            with torch.random.fork_rng(devices=[]):  # reading data must not move the training RNG
                x = map_pixels(self._pixels(first_images(self.data, DATA_INIT_IMAGES)))
            if d.data_init:
                standardise_logits(model.encoder, x, d.data_init_std)
            if d.restart_every > 0:
                until = schedule_steps(None, d.restart_fraction, self.cfg.steps)
                self.restarts = CodeRestarts(x, d.restart_every, until, d.restart_max, self.cfg.seed)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # The decoder at decoder_lr_scale × the rate. At one rate the decoder, whose gradient is dominated by
        # sharpening an easy background, learned colours slower than the encoder saturated its codes.
        return [{"params": list(model.encoder.parameters())},
                {"params": list(model.decoder.parameters()), "lr_scale": self.dvae.decoder_lr_scale}]

    def set_steps(self, steps: int) -> None:
        super().set_steps(steps)
        if self.restarts is not None:
            self.restarts.until_step = schedule_steps(None, self.dvae.restart_fraction, steps)

    # --- schedules (paper section 2.1) -------------------------------------------------------------------------

    def tau(self, step: int) -> float:
        d = self.dvae
        return cosine(step, schedule_steps(d.tau_steps, d.tau_fraction, self.cfg.steps), d.tau_start, d.tau_end)

    def beta(self, step: int) -> float:
        d = self.dvae
        return linear(step, schedule_steps(d.beta_steps, d.beta_fraction, self.cfg.steps), 0.0, self.beta_end)

    # --- training ----------------------------------------------------------------------------------------------

    def train_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        if self.epochs is None:  # made on first use: the run's batch size, workers and device are set by then
            self.epochs = TrainingEpochs(self.data, self.cfg.batch_size, self.cfg.workers,
                                         pin_memory=self.device.type == "cuda")
        return self.epochs.epoch(epoch, self.stats)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        return to_float(images.to(self.device, non_blocking=True))  # (B, 3, H, W) in [0, 1]

    def _model_input(self, x01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [0, 1] → the mapped, optionally dequantized input the likelihood is evaluated on."""
        if self.dvae.dequantize:
            noise = torch.rand(x01.shape, generator=generator, device=x01.device)  # (B, 3, H, W)
            x01 = (x01 * 255 + noise) / 256  # a uniform sample from the pixel's 8-bit bin, rescaled to [0, 1]
        return map_pixels(x01)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x = self._model_input(self._pixels(batch["images"]))  # (B, 3, H, W) in [ε, 1 − ε]
        tau, beta = self.tau(step), self.beta(step)
        restarted = self.restarts(step, model.encoder, model.decoder) if self.restarts is not None else 0
        terms, logits, _ = dvae_terms(model.encoder, model.decoder, x, tau, nll=self.nll)
        perplexity, used = code_usage(logits.detach().argmax(1), self.model_cfg.codebook_size)
        nll, kl = terms.nll.detach().mean(), terms.kl.detach().mean()
        metrics = {"nll": nll, "kl": kl, "bpd": bits_per_dim(nll, x[0].numel()), "relaxed_elb": -(nll + kl),
                   "tau": tau, "beta": beta, "perplexity": perplexity, "codes_used": used, "codes_restarted": restarted}
        return terms.objective(beta), metrics

    # --- evaluation --------------------------------------------------------------------------------------------

    def val_images(self) -> torch.Tensor:
        """The first ``eval_images`` images of the validation split, loaded once: ``(N, H, W, 3)`` uint8."""
        if self._val is None:
            self._val = first_images(dataclasses.replace(self.data, split="val", crop="center"),
                                     self.dvae.eval_images)
        return self._val

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed)  # the same Gumbel noise at every evaluation
        tau = self.tau(step)
        sums: dict[str, float] = {}
        codes = []
        images = self.val_images()
        for i in range(0, len(images), self.cfg.batch_size):
            x01 = self._pixels(images[i:i + self.cfg.batch_size])  # (B, 3, H, W)
            x = self._model_input(x01, gen)
            relaxed, _, _ = dvae_terms(model.encoder, model.decoder, x, tau, gen, self.nll)
            true, logits, stats = dvae_terms(model.encoder, model.decoder, x, None, nll=self.nll)
            recon = model.stats_to_image(stats)  # (B, 3, H, W)
            codes.append(logits.argmax(1))
            batch = {"mse": (recon - x01).pow(2).flatten(1).mean(1), "psnr": psnr(x01, recon),
                     "relaxed_elb": relaxed.elb, "true_elb": true.elb, "nll": true.nll, "kl": true.kl}
            for k, v in batch.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        out = {k: v / len(images) for k, v in sums.items()}
        dims = images[0].numel()
        out["elb_gap"] = out["relaxed_elb"] - out["true_elb"]
        out["true_bpd"] = -out["true_elb"] / (dims * math.log(2))
        out["perplexity"], out["codes_used"] = code_usage(torch.cat(codes), self.model_cfg.codebook_size)
        out["tau"], out["beta"] = tau, self.beta(step)
        return out

    def write_samples(self, model: nn.Module, step: int, out_dir: Path) -> Path | None:
        n = min(self.dvae.sample_images, len(self.val_images()))
        if n == 0:
            return None
        x01 = self._pixels(self.val_images()[:n])
        recon = model.decode(model.encode(x01))
        path = out_dir / f"step-{step:08d}.png"
        save_comparison_grid(to_uint8(x01), to_uint8(recon), path)
        return path

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The residual blocks: units of sharding, activation checkpointing and per-block gradient scaling."""
        return [m for m in model.modules() if isinstance(m, ResBlock)]

    def export(self, model: nn.Module, path: Path) -> None:
        model.save_pretrained(path)

    def data_summary(self) -> str:
        return self.stats.summary()


def first_images(cfg: DataConfig, n: int) -> torch.Tensor:
    """The first ``n`` images of a split in file order (fewer if it is smaller): ``(n, H, W, 3)`` uint8."""
    chunks, have = [], 0
    for batch in make_loader(cfg, min(n, 256), workers=0):
        chunks.append(batch["images"])
        have += len(batch["images"])
        if have >= n:
            break
    return torch.cat(chunks)[:n]


@torch.no_grad()
def standardise_logits(encoder: nn.Module, x: torch.Tensor, target_std: float = 1.0) -> None:
    """Data-dependent initialisation (Salimans & Kingma, 2016) of the encoder's last 1×1 conv: rescale and shift
    each code's logit to zero mean and standard deviation ``target_std`` over the positions of the images ``x``
    (mapped pixels)."""
    conv = encoder.blocks.output.conv
    logits = encoder(x)  # (N, K, g, g)
    mean, std = logits.mean((0, 2, 3)), logits.std((0, 2, 3)).clamp_min(1e-6)  # (K,) each
    conv.w.mul_((target_std / std).view(-1, 1, 1, 1))
    conv.b.sub_(mean).mul_(target_std / std)


def save_comparison_grid(originals: np.ndarray, reconstructions: np.ndarray, path: Path, columns: int = 8,
                         pad: int = 2) -> None:
    """A PNG with rows of ``originals`` each above the matching row of ``reconstructions`` (``(N, H, W, 3)`` uint8)."""
    n, h, w, _ = originals.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    canvas = np.full((2 * rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        x = pad + c * (w + pad)
        for j, img in enumerate((originals[i], reconstructions[i])):
            y = pad + (2 * r + j) * (h + pad)
            canvas[y:y + h, x:x + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    tmp.replace(path)
