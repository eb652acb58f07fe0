"""The dVAE's evidence lower bound (paper section 2.1 and appendix A): logit-Laplace likelihood, KL to a uniform
prior over the codebook, Gumbel-softmax relaxation.

Conventions: every term is summed over its own elements (pixels × channels for the likelihood, grid positions for the
KL) and returned per image, in nats, so that the ELB means what the paper means by it. ``bits_per_dim`` divides by the
number of pixel values and ln 2. The likelihood is the continuous density of the *mapped* pixels x ∈ [ε, 1 − ε], so
its NLL (and bits/dim) can go below zero once the decoder is sharp; compare runs by it, not with discrete-data bpd.
The Gaussian alternative (fixed σ, on the [0, 1] pixel scale) is a density of other units: compare ELBs only between
runs of one likelihood.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dalle.data.transforms import LOGIT_LAPLACE_EPS, signed_to_unit, unmap_pixels


def logit_laplace_nll(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """−ln p(x | μ, b) per image, summed over channels and pixels.

    ``x``: ``(B, C, H, W)`` pixels already mapped to [ε, 1 − ε]; ``stats``: ``(B, 2C, H, W)`` decoder output, the
    first C channels μ and the last C channels ln b. The logit-Laplace density (paper, section A.3) is
    p(x) = exp(−|logit(x) − μ| / b) / (2b · x(1 − x)), so −ln p = ln(2b) + ln x + ln(1 − x) + |logit(x) − μ| / b.
    """
    c = x.shape[1]
    if stats.shape[1] != 2 * c or stats.shape[2:] != x.shape[2:]:
        raise ValueError(f"decoder stats {tuple(stats.shape)} do not match images {tuple(x.shape)}")
    x = x.float().clamp(LOGIT_LAPLACE_EPS / 2, 1 - LOGIT_LAPLACE_EPS / 2)  # guard the logs against rounding only
    mu, log_b = stats[:, :c].float(), stats[:, c:].float()  # (B, C, H, W) each
    nll = (math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x)
           + (torch.logit(x) - mu).abs() * torch.exp(-log_b))  # (B, C, H, W)
    return nll.flatten(1).sum(1)  # (B,)


def gaussian_nll(x: torch.Tensor, stats: torch.Tensor, sigma: float) -> torch.Tensor:
    """−ln N(pixel | mean, σ²) per image, summed over channels and pixels, on the [0, 1] pixel scale.

    ``x``: ``(B, C, H, W)`` pixels mapped to [ε, 1 − ε] (as for the logit-Laplace; the mapping is undone here);
    ``stats``: ``(B, C, H, W)`` the decoder's mean on a [-1, 1] scale; ``sigma``: the fixed standard deviation.
    """
    if stats.shape != x.shape:
        raise ValueError(f"decoder stats {tuple(stats.shape)} do not match images {tuple(x.shape)}")
    pixels = unmap_pixels(x.float())  # (B, C, H, W) in [0, 1]
    mean = signed_to_unit(stats.float())
    nll = (pixels - mean).pow(2) / (2 * sigma**2) + math.log(sigma * math.sqrt(2 * math.pi))  # (B, C, H, W)
    return nll.flatten(1).sum(1)  # (B,)


def likelihood_nll(likelihood: str, sigma: float = 0.1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-image NLL ``f(x, stats)`` of a decoder whose output parameterises ``likelihood`` (``DVAEConfig``)."""
    if likelihood == "logit-laplace":
        return logit_laplace_nll
    if likelihood == "gaussian":
        return functools.partial(gaussian_nll, sigma=sigma)
    raise ValueError(f"unknown likelihood {likelihood!r}")


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q(z | x) ‖ uniform over K codes) per image, summed over the grid: Σ_positions (Σ_k q ln q + ln K).

    ``logits``: ``(B, K, g, g)`` encoder output; q = softmax over K (the paper's prior on codes is uniform at stage 1).
    """
    log_q = F.log_softmax(logits.float(), dim=1)  # (B, K, g, g)
    kl = (log_q.exp() * log_q).sum(1) + math.log(logits.shape[1])  # (B, g, g)
    return kl.flatten(1).sum(1)  # (B,)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A relaxed one-hot sample over dim 1 (paper section 2.1: Gumbel-softmax with temperature τ).

    Computed in float32 whatever the autocast dtype: at τ = 1/16 the softmax input is 16× the logits.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    exponential = -torch.log(u.clamp_min(1e-20))  # Exp(1) samples, > 0
    gumbel = -torch.log(exponential.clamp_min(1e-20))  # (B, K, g, g)
    return F.softmax((logits.float() + gumbel) / tau, dim=1)


def hard_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot of the argmax code at each position (no noise): what the prior is trained on (paper section 2.2)."""
    codes = logits.argmax(1)  # (B, g, g)
    return F.one_hot(codes, logits.shape[1]).permute(0, 3, 1, 2).to(torch.float32)  # (B, K, g, g)


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-image nats → bits per pixel value."""
    return nats / (dims * math.log(2.0))


@dataclasses.dataclass
class ELBTerms:
    """Per-image terms of the bound, each ``(B,)`` in nats; ``elb = −(nll + kl)``, the objective ``nll + β·kl``."""

    nll: torch.Tensor
    kl: torch.Tensor

    @property
    def elb(self) -> torch.Tensor:
        return -(self.nll + self.kl)

    def objective(self, beta: float) -> torch.Tensor:
        """Mean over the batch of NLL + β·KL: the paper's training loss (ELB with the KL weighted by β)."""
        return (self.nll + beta * self.kl).mean()


def dvae_terms(encoder: torch.nn.Module, decoder: torch.nn.Module, x: torch.Tensor, tau: float | None,
               generator: torch.Generator | None = None,
               nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = logit_laplace_nll,
               ) -> tuple[ELBTerms, torch.Tensor, torch.Tensor]:
    """Run the dVAE on mapped pixels ``x`` and return (terms, encoder logits, decoder stats).

    ``tau`` = a temperature: the decoder sees a Gumbel-softmax sample (the *relaxed* bound, what training optimises);
    ``tau`` = None: it sees the one-hot argmax codes (the *true* bound of the codes the prior will model).
    ``nll``: the decoder's likelihood (:func:`likelihood_nll`), the paper's logit-Laplace by default.
    """
    logits = encoder(x)  # (B, K, g, g)
    z = hard_one_hot(logits) if tau is None else gumbel_softmax(logits, tau, generator)  # (B, K, g, g)
    stats = decoder(z)  # (B, 2C, H, W)
    return ELBTerms(nll(x, stats), kl_to_uniform(logits)), logits, stats


def code_usage(codes: torch.Tensor, codebook_size: int) -> tuple[float, int]:
    """(perplexity of the code histogram, number of distinct codes) over all positions of ``codes``.

    Perplexity exp(H) equals the number of codes in use when they are used equally often; a collapsed codebook shows
    as a perplexity far below the number of distinct codes.
    """
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), int((counts > 0).sum())


def psnr(reference: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: 10·log10(1 / MSE)."""
    mse = (reference.float() - images.float()).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
