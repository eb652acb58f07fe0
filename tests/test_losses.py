import math

import numpy as np
import pytest
import torch

from dalle.data.transforms import map_pixels
from dalle.models.dvae import DVAE, DVAEConfig
from dalle.training import losses


def _direct_nll(x: float, mu: float, log_b: float) -> float:
    """−ln of the logit-Laplace density 1 / (2b·x(1−x)) · exp(−|logit(x) − μ| / b), written out."""
    b = math.exp(log_b)
    density = math.exp(-abs(math.log(x / (1 - x)) - mu) / b) / (2 * b * x * (1 - x))
    return -math.log(density)


def test_logit_laplace_nll_matches_the_density_formula():
    g = torch.Generator().manual_seed(1)
    x = 0.1 + 0.8 * torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    stats = torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64)
    got = losses.logit_laplace_nll(x, stats)
    for i in range(2):
        want = sum(_direct_nll(float(x[i, c, h, w]), float(stats[i, c, h, w]), float(stats[i, 3 + c, h, w]))
                   for c in range(3) for h in range(4) for w in range(4))
        assert got[i].item() == pytest.approx(want, rel=1e-6)


def test_logit_laplace_density_integrates_to_one():
    # p(x) over (0, 1): a proper density, so the NLL is a real likelihood and not only a reconstruction score.
    x = torch.linspace(1e-6, 1 - 1e-6, 100_001, dtype=torch.float64)
    for mu, log_b in ((0.0, 0.0), (1.5, -1.0), (-2.0, 0.5)):
        stats = torch.tensor([mu, log_b], dtype=torch.float64).view(1, 2, 1, 1).expand(len(x), 2, 1, 1)
        # the formula over the whole unit interval (the loss itself only sees mapped pixels in [ε, 1 − ε])
        b = math.exp(log_b)
        logit = torch.log(x / (1 - x))
        nll = math.log(2 * b) + torch.log(x) + torch.log1p(-x) + (logit - mu).abs() / b
        assert torch.trapezoid(torch.exp(-nll), x).item() == pytest.approx(1.0, abs=2e-3)
        inside = x[(x > 0.1) & (x < 0.9)].view(-1, 1, 1, 1)
        ours = losses.logit_laplace_nll(inside, stats[: len(inside)])
        direct = (math.log(2 * b) + torch.log(inside) + torch.log1p(-inside)
                  + (torch.log(inside / (1 - inside)) - mu).abs() / b).flatten()
        assert torch.allclose(ours.double(), direct, rtol=1e-4, atol=1e-4)  # the loss runs in float32


def test_logit_laplace_nll_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="do not match"):
        losses.logit_laplace_nll(torch.full((1, 3, 4, 4), 0.5), torch.zeros(1, 3, 4, 4))


def test_gaussian_nll_matches_torch_distributions_on_unmapped_pixels():
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    stats = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)  # the mean on a [-1, 1] scale
    got = losses.gaussian_nll(map_pixels(pixels), stats, sigma=0.1)
    want = -torch.distributions.Normal(stats * 0.5 + 0.5, 0.1).log_prob(pixels).flatten(1).sum(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="do not match"):
        losses.gaussian_nll(map_pixels(pixels), torch.zeros(2, 6, 4, 4), sigma=0.1)


def test_likelihood_nll_picks_the_decoders_likelihood():
    x = map_pixels(torch.rand(1, 3, 4, 4))
    assert losses.likelihood_nll("logit-laplace") is losses.logit_laplace_nll
    stats = torch.zeros(1, 3, 4, 4)
    assert torch.equal(losses.likelihood_nll("gaussian", 0.2)(x, stats), losses.gaussian_nll(x, stats, 0.2))
    with pytest.raises(ValueError, match="unknown likelihood"):
        losses.likelihood_nll("poisson")


def test_kl_to_uniform_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 2, 2, generator=g, dtype=torch.float64) * 3
    got = losses.kl_to_uniform(logits)
    q = torch.distributions.Categorical(logits=logits.permute(0, 2, 3, 1))
    uniform = torch.distributions.Categorical(logits=torch.zeros_like(logits.permute(0, 2, 3, 1)))
    want = torch.distributions.kl_divergence(q, uniform).flatten(1).sum(1)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # Σ q ln q + ln K per position, summed over the 2×2 grid
    log_q = torch.log_softmax(logits, 1)
    assert torch.allclose(got.double(), ((log_q.exp() * log_q).sum(1) + math.log(7)).sum((1, 2)), atol=1e-5)


def test_kl_bounds():
    assert losses.kl_to_uniform(torch.zeros(1, 16, 3, 3)).item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.full((1, 16, 3, 3), -1e4)
    peaked[:, 0] = 1e4
    assert losses.kl_to_uniform(peaked).item() == pytest.approx(9 * math.log(16), rel=1e-5)


def test_gumbel_softmax_is_a_relaxed_sample_of_q():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).view(1, 4, 1, 1).expand(20_000, 4, 1, 1)
    g = torch.Generator().manual_seed(3)
    z = losses.gumbel_softmax(logits, tau=1 / 16, generator=g)  # (N, 4, 1, 1)
    assert torch.allclose(z.sum(1), torch.ones(20_000, 1, 1))
    assert (z.max(1).values > 0.5).float().mean() > 0.95  # nearly one-hot at τ = 1/16
    freq = torch.bincount(z.argmax(1).flatten(), minlength=4).double() / 20_000
    assert torch.allclose(freq, torch.softmax(logits[0, :, 0, 0].double(), 0), atol=0.015)  # Gumbel-max trick
    again = losses.gumbel_softmax(logits, tau=1 / 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, again)


def test_hard_one_hot_and_usage():
    logits = torch.randn(2, 5, 3, 3)
    z = losses.hard_one_hot(logits)
    assert torch.equal(z.argmax(1), logits.argmax(1)) and torch.equal(z.sum(1), torch.ones(2, 3, 3))
    assert losses.code_usage(torch.tensor([0, 1, 2, 3] * 5), 8) == (pytest.approx(4.0), 4)
    assert losses.code_usage(torch.zeros(10, dtype=torch.long), 8) == (pytest.approx(1.0), 1)


def test_elb_terms_and_units():
    terms = losses.ELBTerms(nll=torch.tensor([10.0, 20.0]), kl=torch.tensor([1.0, 3.0]))
    assert torch.equal(terms.elb, torch.tensor([-11.0, -23.0]))
    assert terms.objective(beta=2.0).item() == pytest.approx((12 + 26) / 2)
    assert losses.bits_per_dim(torch.tensor(math.log(2) * 12), 12).item() == pytest.approx(1.0)
    ref = torch.zeros(1, 3, 2, 2)
    assert losses.psnr(ref, ref + 0.1).item() == pytest.approx(20.0, abs=1e-4)


def test_dvae_terms_relaxed_and_true():
    cfg = DVAEConfig(resolution=16, n_hid=8, n_blk_per_group=1, n_groups=2, codebook_size=16, n_init=8)
    model = DVAE(cfg)
    x = 0.1 + 0.8 * torch.rand(2, 3, 16, 16)
    relaxed, logits, stats = losses.dvae_terms(model.encoder, model.decoder, x, tau=1.0)
    true, logits2, stats2 = losses.dvae_terms(model.encoder, model.decoder, x, tau=None)
    assert logits.shape == (2, 16, 8, 8) and stats.shape == (2, 6, 16, 16)
    assert torch.equal(relaxed.kl, true.kl) and torch.equal(logits, logits2)
    # the true bound decodes exactly the argmax codes: the same statistics as decoding the codes directly
    assert torch.allclose(stats2, model.decoder.forward_codes(logits.argmax(1)), atol=1e-5)
    assert np.isfinite(relaxed.nll.detach().numpy()).all()


def test_dvae_terms_with_the_gaussian_decoder():
    cfg = DVAEConfig(resolution=16, n_hid=8, n_blk_per_group=1, n_groups=2, codebook_size=16, n_init=8,
                     likelihood="gaussian")
    model = DVAE(cfg)
    x = 0.1 + 0.8 * torch.rand(2, 3, 16, 16)
    nll = losses.likelihood_nll("gaussian", 0.1)
    true, logits, stats = losses.dvae_terms(model.encoder, model.decoder, x, None, nll=nll)
    assert stats.shape == (2, 3, 16, 16)
    torch.testing.assert_close(true.nll, losses.gaussian_nll(x, stats, 0.1))
