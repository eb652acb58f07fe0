import json
import shutil

import numpy as np
import pytest
import torch

from conftest import shapes_tokenizer, tiny_clip
from dalle.cli import main
from dalle.data.config import DataConfig
from dalle.data.token_cache import TokenCache, cache_batches, encode_dataset
from dalle.data.transforms import to_float
from dalle.errors import UserError
from dalle.evaluation import report
from dalle.evaluation import sample_metrics as sm
from dalle.evaluation.features import as_images
from dalle.evaluation.metrics import FeatureStats, frechet_distance_stats, psnr, reconstruction_metrics
from dalle.evaluation.run_eval import (
    EvalConfig,
    compositional,
    compositional_ceiling,
    evaluate_run,
    load_real,
    prior_loss,
)
from dalle.evaluation.shapes_checker import ShapesChecker
from dalle.models.dvae import DVAE
from dalle.models.dvae import preset as dvae_preset
from dalle.models.reranker import ContrastiveModel, RerankerConfig
from dalle.models.reranker import Reranker as RerankerModel
from dalle.models.transformer import PriorTransformer
from dalle.models.transformer import preset as prior_preset
from dalle.tokenizers.text import TextTokenizer
from dalle.training.logging import CSVLog
from dalle.training.reranker_task import load_pairs


class MeanColour:
    """A feature network small enough to check by hand: mean RGB as features, 10 x mean RGB as 3 class logits."""

    name, dim, num_classes = "MeanColour", 3, 3

    def __init__(self):
        self.images_read = 0

    def features_and_logits(self, images):
        x = as_images(images)
        self.images_read += len(x)
        mean = x.mean((2, 3))  # (B, 3)
        return mean, 10 * mean

    def features(self, images):
        return self.features_and_logits(images)[0]

    def logits(self, images):
        return self.features_and_logits(images)[1]


def constant_images(colours, side=8):
    """``(..., side, side, 3)`` uint8 images, each filled with one RGB colour of ``colours`` ``(..., 3)``."""
    colours = np.asarray(colours, np.uint8)
    return np.broadcast_to(colours[..., None, None, :], (*colours.shape[:-1], side, side, 3)).copy()


def stats_of(features):
    s = FeatureStats(features.shape[1])
    s.update(features)
    return s


# ----------------------------------------------------------------------------------------------------- the curves

def test_sample_size_curve_reads_each_distinct_pick_once_and_matches_direct_metrics():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (5, 4, 3))  # 5 captions x 4 candidates
    candidates = constant_images(colours)
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(5, 1)  # the later the draw, the better: best of n is n - 1
    scores[0] = torch.tensor([3.0, 0.0, 1.0, 2.0])  # caption 0: the first draw is best at every n
    net = MeanColour()
    reader = sm.FeatureReader(net, net, batch_size=3)
    real = constant_images(rng.integers(0, 256, (7, 3)))
    ref = sm.reference(reader, real, contrastive=0.0, splits=1)
    curve = sm.sample_size_curve(reader, candidates, scores, ref, splits=1)
    assert curve["n"] == [1, 2, 4]
    # Picks per n: draw 0, then 1 and 3 except for caption 0, which keeps draw 0: 5 + 4 + 4 images read.
    assert net.images_read == 7 + 13
    for k, n in enumerate(curve["n"]):
        picks = [0] + [n - 1] * 4
        chosen = candidates[np.arange(5), picks]
        assert curve["fd"][k] == pytest.approx(frechet_distance_stats(stats_of(net.features(chosen)), ref.stats))
        assert curve["contrastive"][k] == pytest.approx(float(scores[np.arange(5), picks].mean()))
        assert curve["is"][k] == pytest.approx(sm.score_of(net.logits(chosen).double().softmax(-1), 1))


def test_blur_curve_of_flat_images_is_flat_and_reuses_unblurred_values():
    rng = np.random.default_rng(1)
    real, fake = constant_images(rng.integers(0, 256, (6, 3))), constant_images(rng.integers(0, 256, (4, 3)))
    net = MeanColour()
    reader = sm.FeatureReader(net, net)
    curve = sm.blur_curve(reader, real, fake, [0.0, 1.0, 3.0], splits=1, unblurred=(-1.0, -2.0))
    assert curve["fd"][0] == -1.0 and curve["is"][0] == -2.0  # given, not recomputed
    assert net.images_read == 2 * (6 + 4)
    # A flat image blurs to itself (reflected borders), so every radius gives the unblurred distance.
    direct = frechet_distance_stats(stats_of(net.features(fake)), stats_of(net.features(real)))
    assert curve["fd"][1:] == pytest.approx([direct, direct], rel=1e-4)


def test_a_reader_without_classifier_reports_no_score():
    net = MeanColour()
    reader = sm.FeatureReader(net, None)
    feats, probs = reader.read(constant_images([[10, 20, 30], [40, 50, 60]]))
    assert feats.shape == (2, 3) and probs is None and reader.score_label is None
    curve = sm.blur_curve(reader, constant_images([[0, 0, 0], [9, 9, 9]]), constant_images([[1, 1, 1]] * 2),
                          [0.0], splits=1)
    assert curve["is"] is None


def test_efficientnet_reader_names_its_network():
    reader = sm.FeatureReader.build("efficientnet-lite0", None, None, score=True, device=torch.device("cpu"))
    images, _ = load_pairs(DataConfig(split="val", size=2, resolution=32), 2)
    feats, probs = reader.read(images.numpy())
    assert feats.shape == (2, 1280) and probs.shape == (2, 1000)
    assert torch.allclose(probs.sum(1), torch.ones(2, dtype=torch.float64))
    assert reader.feature_label == "Fréchet distance (EfficientNet-Lite0 features)"
    assert reader.score_label == "Inception-style score (EfficientNet-Lite0 ImageNet classes)"


def test_checker_verdicts_give_accuracy_per_sample_size():
    data = DataConfig(split="heldout", size=3, resolution=32)
    images, captions = load_pairs(data, 3)
    images = images.numpy()
    blank = np.full_like(images[0], 255)
    # Caption i: draw 0 is blank, draw 1 its true image; the reranked pick is the true image.
    candidates = np.stack([np.stack([blank, img]) for img in images])  # (3, 2, H, W, 3)
    verdicts = sm.check_samples(ShapesChecker(), candidates, images, captions)
    assert verdicts.accuracy_at([0, 0, 0]) == 0 and verdicts.accuracy_at([1, 1, 1]) == 1
    assert verdicts.accuracy_at([1, 0, 0]) == pytest.approx(1 / 3)
    summary = sm.accuracy_summary(verdicts)
    assert summary["reranked"]["all"] == 1 and summary["unreranked"]["all"] == 0 and summary["unreranked"]["color"] == 0
    # Half of all candidates are right, and every caption has a right one.
    assert summary["every_candidate"]["all"] == 0.5 and summary["any_candidate"] == 1
    assert verdicts.any_correct([0, 1]) == 1
    wrong_only = sm.check_samples(ShapesChecker(), candidates[:, :1], images, captions)
    assert wrong_only.any_correct() == 0 and sm.accuracy_by_kind(wrong_only, [None] * 3) == {}


def test_accuracy_ratio_and_its_bootstrap_interval():
    half = [True, False] * 20
    r = sm.accuracy_ratio(half, half)
    assert r["ratio"] == 1 and r["interval"][0] < 1 < r["interval"][1] and r["captions"] == [40, 40]
    assert sm.accuracy_ratio(half, half) == r  # seeded: the same interval every time
    wide, narrow = sm.accuracy_ratio([True, False] * 10, [True] * 15 + [False] * 5), sm.accuracy_ratio(
        [True, False] * 200, [True] * 300 + [False] * 100)
    assert wide["ratio"] == narrow["ratio"] == pytest.approx(2 / 3)
    for r in (wide, narrow):
        assert r["interval"][0] < r["ratio"] < r["interval"][1]
    # ten times the captions: an interval about three times narrower
    width = [r["interval"][1] - r["interval"][0] for r in (wide, narrow)]
    assert 2 < width[0] / width[1] < 5
    nothing = sm.accuracy_ratio(half, [False] * 10)
    assert nothing["ratio"] is None and nothing["interval"] is None and report.ratio_line(nothing) is None
    # a denominator with a single right caption: most resamples are fine, some have none; the top is unbounded
    rare = sm.accuracy_ratio(half, [True] + [False] * 9)
    assert rare["ratio"] == 5 and rare["interval"][1] is None and "to unbounded" in report.ratio_line(rare)
    assert report.ratio_line(narrow) == ("held-out / training captions' accuracy after reranking: 67% (95% bootstrap "
                                         f"interval over the captions drawn: {narrow['interval'][0]:.0%} to "
                                         f"{narrow['interval'][1]:.0%})")
    with pytest.raises(ValueError):
        sm.accuracy_ratio([], half)


# ----------------------------------------------------------------------------------------------------- a tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as `dalle pipeline` leaves it, with untrained models: tokenizer, a tiny-32 dVAE (8x8 codes),
    token caches of 12 train, 12 val and 6 held-out shapes records, a 'test'-sized prior, a small reranker and logs."""
    run = tmp_path_factory.mktemp("eval") / "run"
    tok = shapes_tokenizer(text_len=16)
    tok.save(run / "tokenizer")
    torch.manual_seed(0)
    DVAE(dvae_preset("tiny-32")).save_pretrained(run / "dvae" / "model")
    dvae = DVAE.from_pretrained(run / "dvae" / "model")
    for split, size in (("train", 12), ("val", 12), ("heldout", 6)):
        encode_dataset(dvae, run / "dvae" / "model", DataConfig(resolution=32, size=size, split=split),
                       run / "cache" / split, batch_size=16, progress=False)
    prior = PriorTransformer(prior_preset("test", text_vocab_size=tok.vocab_size, text_len=16, grid_size=8,
                                          codebook_size=512))
    prior.save_pretrained(run / "prior" / "model")
    tok.save(run / "prior" / "model")  # as `dalle train` exports it
    config = RerankerConfig(resolution=32, vocab_size=tok.vocab_size, text_len=16, image_width=8, text_dim=32,
                            text_n_layers=1, text_n_heads=2, embed_dim=16)
    RerankerModel(ContrastiveModel(config).eval(), tok).save_pretrained(run / "reranker" / "model")
    for stage, columns in (("dvae", ("loss", "nll", "kl")), ("prior", ("loss", "text_loss", "image_loss")),
                           ("reranker", ("loss", "acc"))):
        log = CSVLog(run / stage / "metrics.csv")
        for step in (1, 2, 3):
            log.append(step, {c: 1.0 / step for c in columns})
    return run


FAST = ["--features", "reranker", "--no-inception-score", "--captions", "3", "--candidates", "4", "--real-images",
        "6", "--blur-radii", "0", "1", "--prior-records", "8", "--device", "cpu"]


def test_eval_writes_metrics_plots_and_a_report_whose_links_resolve(tiny_run, capsys):
    assert main(["eval", "--run", str(tiny_run), *FAST]) == 0
    printed = capsys.readouterr().out
    out = tiny_run / "eval"
    m = json.loads((out / "metrics.json").read_text())
    d = m["distribution"]
    assert d["fd_label"] == "Fréchet distance (our reranker's image encoder features)" and d["is"] is None
    assert d["fd_label"] in printed and f"report: {out / 'report.html'}" in printed and "FID" not in printed
    assert m["counts"]["captions"] == {"val": 3, "train": 3, "heldout": 3} and m["counts"]["real_images"] == 6
    size, blur = m["curves"]["sample_size"], m["curves"]["blur"]
    assert size["n"] == [1, 2, 4] and blur["radius"] == [0.0, 1.0]
    assert (d["fd"]["unreranked"], d["fd"]["reranked"]) == (size["fd"][0], size["fd"][-1]) == (size["fd"][0],
                                                                                            blur["fd"][0])
    # The best of the first n by the reranker's score can only score higher as n grows.
    assert size["contrastive"] == sorted(size["contrastive"])
    assert all(v >= 0 for v in size["fd"] + blur["fd"] + [d["fd"]["real_floor"]])
    comp = m["compositional"]["sets"]
    assert set(comp) == {"heldout", "train"} and set(size["accuracy"]) == {"heldout", "train"}
    assert all(0 <= comp[s][k]["all"] <= comp[s][k]["color"] <= 1 for s in comp for k in ("reranked", "unreranked"))
    assert size["accuracy"]["heldout"][-1] == comp["heldout"]["reranked"]["all"]
    for s in comp:  # a perfect reranker would do at least as well as ours and as the first draw
        assert comp[s]["any_candidate"] >= max(comp[s]["reranked"]["all"], comp[s]["unreranked"]["all"])
        assert 0 <= comp[s]["every_candidate"]["all"] <= comp[s]["any_candidate"]
    # The training captions hold the held-out set's mix of caption kinds, and the kinds' rates add up to the whole.
    counts = {s: {kind: k["captions"] for kind, k in comp[s]["by_kind"].items()} for s in comp}
    assert counts["train"] == counts["heldout"] and sum(counts["train"].values()) == 3
    for s in comp:
        assert sum(k["captions"] * k["reranked"] for k in comp[s]["by_kind"].values()) == pytest.approx(
            3 * comp[s]["reranked"]["all"])
    ratio = m["compositional"]["heldout_vs_train"]
    assert ratio["captions"] == [3, 3]
    if ratio["ratio"] is not None:
        assert ratio["ratio"] == comp["heldout"]["reranked"]["all"] / comp["train"]["reranked"]["all"]
        assert report.ratio_line(ratio) in printed
    ceiling = m["compositional"]["ceiling"]
    assert ceiling["images"] == 6 and ceiling["real"]["all"] >= 5 / 6  # the checker reads real images
    assert 0 <= ceiling["reconstructions"]["all"] <= 1 and "dVAE reconstructions (the ceiling" in printed
    assert m["unseen_captions"] == {"set": "heldout", "captions": 3, "in_training": 0}
    assert 1 <= m["dvae"]["codes_used"] <= m["dvae"]["codebook_size"] == 512 and m["dvae"]["images"] == 6
    assert m["prior"]["val"]["records"] == 8 and m["prior"]["heldout"]["records"] == 6
    assert m["prior"]["val"]["loss"] > 0 and m["headline"] and m["seconds"]["generation"] >= 0
    for name in ("report.html", "curve_blur.png", "curve_sample_size.png", "samples_heldout_reranked.png",
                 "samples_train_unreranked.png", "dvae_reconstructions.png", "log_prior_metrics.png"):
        assert (out / name).is_file(), name
    assert report.unresolved_links(out / "report.html") == []
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "Samples for held-out captions" in text and "Samples for training captions" in text
    assert "By caption kind" in text and "reranked, by caption kind: " in printed


def test_caption_sets_can_hold_a_given_mix_of_caption_kinds(tiny_run):
    from dalle.data.token_cache import TokenCache
    from dalle.evaluation.eval_sets import cache_captions, caption_kind, kind_counts

    assert caption_kind({"objects": [{}]}) == "1 object" and caption_kind({"objects": [{}, {}]}) == "2 objects"
    assert caption_kind(None) is None and caption_kind({"name": "grinning face"}) is None
    cache = TokenCache(tiny_run / "cache" / "train")
    kinds = [caption_kind(cache.row(i)["attributes"]) for i in range(len(cache))]
    have = {kind: kinds.count(kind) for kind in set(kinds)}
    assert set(have) == {"1 object", "2 objects"}, have
    # Spread evenly without a mix (as before); with one, exactly the counts asked for where the split has them.
    plain = cache_captions(tiny_run, "train", 4, "t")
    assert plain.captions == [cache.row(i)["caption"] for i in (0, 4, 7, 11)]
    for ones in range(0, min(4, have["1 object"]) + 1):
        if 4 - ones > have["2 objects"]:
            continue
        mixed = cache_captions(tiny_run, "train", 4, "t", match={"1 object": ones, "2 objects": 4 - ones})
        assert kind_counts(mixed) == {k: v for k, v in {"1 object": ones, "2 objects": 4 - ones}.items() if v}
        assert len(set(mixed.captions)) == 4 or len(set(map(str, mixed.attributes))) == 4
    # A kind the split lacks is filled up with the others, so the set keeps its size.
    short = cache_captions(tiny_run, "train", 5, "t", match={"2 objects": 5, "3 objects": 0})
    assert len(short.captions) == 5 and kind_counts(short)["2 objects"] == min(5, have["2 objects"])


def test_reranked_image_is_the_best_scored_candidate(tiny_run):
    """What the metrics assume of the generator: the reranked image is the candidate with the highest score, and the
    scores are the reranker's."""
    from dalle.generation import Generator
    from dalle.models.sampling import SampleConfig

    captions = ["a small red circle at the top", "a large blue square below a small green cross"]
    results = Generator.from_run(tiny_run, device="cpu").generate(captions, n=3, keep=1, sample=SampleConfig(seed=1))
    reranker = RerankerModel.from_pretrained(tiny_run / "reranker" / "model")
    for caption, r in zip(captions, results):
        candidates, scores = np.asarray(r.candidates), torch.as_tensor(np.asarray(r.candidate_scores)).float()
        assert candidates.shape == (3, 32, 32, 3) and candidates.dtype == np.uint8
        assert np.array_equal(np.asarray(r.images)[0], candidates[int(scores.argmax())])
        expected = reranker.score(torch.from_numpy(candidates), [caption] * 3)
        assert torch.allclose(scores, expected.float(), atol=1e-4)


def test_eval_without_a_heldout_split_shows_validation_captions(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("heldout", "eval"))
    cfg = EvalConfig(run=run, features="reranker", inception_score=False, captions=2, candidates=2, real_images=4,
                     blur_radii=(0.0,), prior_records=4, device="cpu", precision="bf16")
    m = evaluate_run(cfg)
    assert m["counts"]["captions"] == {"val": 2, "train": 2} and set(m["prior"]) == {"val"}
    # bf16 sampling, and the prior's loss under bf16 autocast: within bf16 rounding of the fp32 loss.
    fp32 = prior_loss(PriorTransformer.from_pretrained(run / "prior" / "model").eval(),
                      TextTokenizer.load(run / "tokenizer"), TokenCache(run / "cache" / "val"), 4, cfg.batch_size)
    assert m["sampling_precision"] == "bf16" and m["prior"]["val"]["loss"] == pytest.approx(fp32["loss"], rel=0.02)
    assert m["unseen_captions"]["set"] == "val" and set(m["compositional"]["sets"]) == {"train"}
    assert "has no held-out split" in (run / "eval" / "report.html").read_text(encoding="utf-8")


def test_ceiling_is_the_checker_on_real_images_and_on_their_reconstructions():
    real, captions = load_real(DataConfig(source="shapes", split="val", resolution=32, size=8), 8)
    metrics = {"compositional": {"checker": "shapes", "sets": {}}}
    compositional_ceiling(metrics, real, np.full_like(real, 255), captions)  # a dVAE that paints everything white
    ceiling = metrics["compositional"]["ceiling"]
    assert ceiling["images"] == 8 and ceiling["real"]["all"] >= 0.75 and ceiling["reconstructions"]["all"] == 0.0
    metrics = {"compositional": {"checker": "shapes", "sets": {}}}
    compositional_ceiling(metrics, real, real.copy(), captions)  # a lossless dVAE reaches the checker's own rate
    assert metrics["compositional"]["ceiling"]["reconstructions"] == metrics["compositional"]["ceiling"]["real"]
    metrics = {"compositional": {"checker": None, "reason": "no checker"}}
    compositional_ceiling(metrics, real, real, captions)
    assert "ceiling" not in metrics["compositional"]


def test_compositional_accuracy_only_where_a_checker_exists():
    metrics = {"curves": {"sample_size": {"n": [1]}}}
    assert compositional("emoji", {}, metrics) == {}
    assert metrics["compositional"]["checker"] is None and "'emoji'" in metrics["compositional"]["reason"]
    assert "accuracy" not in metrics["curves"]["sample_size"]


def test_reconstruction_metrics_match_a_direct_computation(tiny_run):
    dvae = DVAE.from_pretrained(tiny_run / "dvae" / "model")
    images, _ = load_pairs(DataConfig(split="val", size=5, resolution=32), 5)
    values, recons = reconstruction_metrics(dvae, images.numpy(), batch_size=2)
    x = to_float(images)
    codes = dvae.encode(x)
    assert recons.shape == (5, 32, 32, 3) and recons.dtype == np.uint8
    assert values["psnr_db"] == pytest.approx(float(psnr(x, dvae.decode(codes)).mean()), rel=1e-5)
    assert values["codes_used"] == len(codes.unique()) and values["images"] == 5


def test_prior_loss_does_not_depend_on_the_batch_size(tiny_run):
    prior = PriorTransformer.from_pretrained(tiny_run / "prior" / "model").eval()
    tok = TextTokenizer.load(tiny_run / "tokenizer")
    cache = TokenCache(tiny_run / "cache" / "val")
    whole = prior_loss(prior, tok, cache, n=10, batch_size=10)
    assert whole == pytest.approx(prior_loss(prior, tok, cache, n=10, batch_size=4), rel=1e-5)
    batch = next(iter(cache_batches(cache, 10, shuffle=False)))
    with torch.no_grad():
        direct = prior.loss(*tok.encode_batch(batch["captions"]), batch["codes"])
    assert whole["records"] == 10 and whole["loss"] == pytest.approx(float(direct.total), rel=1e-5)


# ----------------------------------------------------------------------------------------------------- bad input

def test_missing_run_or_stage_outputs_name_the_command_that_makes_them(tiny_run, tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "dalle pipeline --out" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("prior", "eval"))
    assert main(["eval", "--run", str(run), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"dalle train --out {run}/prior" in err and "Traceback" not in err
    shutil.rmtree(run / "cache" / "val")
    with pytest.raises(UserError, match="dalle vae encode --data-split val"):
        evaluate_run(EvalConfig(run=run))


def test_bad_eval_options_are_clean_errors(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path), "--features", "inception"]) == 2
    assert "inception_weights" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "EvalConfig.run" in capsys.readouterr().err
    with pytest.raises(UserError, match="captions"):
        EvalConfig(run=tmp_path, captions=1)


def test_eval_with_a_clip_checkpoint_as_the_reranker(tiny_run, tmp_path):
    ckpt, vocab, _ = tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    assert main(["eval", "--run", str(tiny_run), "--out", str(out), "--reranker", str(ckpt), "--clip-vocab",
                 str(vocab), *FAST]) == 0
    d = json.loads((out / "metrics.json").read_text())["distribution"]
    # Both the reranking and the features of the Fréchet distance are the CLIP's.
    assert d["cs_label"].startswith("contrastive score (CLIP clip.bin") and "CLIP clip.bin" in d["fd_label"]
    assert d["contrastive"]["reranked"] >= d["contrastive"]["unreranked"]
