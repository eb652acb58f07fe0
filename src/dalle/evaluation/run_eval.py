"""Evaluate a run directory end to end (paper, "Sampling and evaluation"): sample, rerank, measure, report.

A run directory is what ``dalle pipeline`` writes: ``tokenizer/``, ``dvae/``, ``cache/{train,val[,heldout]}/``,
``prior/`` and ``reranker/``. :func:`evaluate_run` draws ``candidates`` samples for each caption of three sets and
keeps the reranker's best, as the paper does with N = 512:

* **validation captions** — the distribution metrics against real validation images (:mod:`.sample_metrics`):
  Fréchet distance, Inception-style score, contrastive score, and their curves against blur and sample size;
* **held-out captions** (the "heldout" split: compositions never seen in training, paper §3.3) and **training
  captions** — sample grids and, on shapes, compositional accuracy judged by :mod:`.shapes_checker`. A dataset
  without a held-out split shows its validation captions instead, and says how many also occur in training;
* the **dVAE**'s reconstruction PSNR and codebook usage on the validation images, the **prior**'s loss on the
  validation (and held-out) token cache, and every stage's training curves.

Outputs in ``RUN/eval/``: PNG plots and grids, ``report.html`` (:mod:`.report`) and, last, ``metrics.json``, which
``dalle pipeline`` takes as the sign that evaluation is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dalle import clip_options, sample_options
from dalle.checkpoint import write_text_atomic
from dalle.config import check, option, to_dict
from dalle.data.token_cache import TokenCache, cache_batches
from dalle.errors import UserError
from dalle.evaluation import plots, report
from dalle.evaluation import sample_metrics as sm
from dalle.evaluation.eval_sets import (
    CaptionSet,
    Samples,
    cache_captions,
    caption_kind,
    draw,
    kind_counts,
    load_real,
    normal_caption,
    split_data,
    training_captions,
)
from dalle.evaluation.metrics import reconstruction_metrics
from dalle.evaluation.shapes_checker import ShapesChecker, summarize

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

FEATURES = ("efficientnet-lite0", "reranker", "inception")
SET_NAMES = {"val": "validation captions", "train": "training captions", "heldout": "held-out captions"}
METRICS = "metrics.json"

# What evaluation reads from a run, and the command that makes each (shown when one is missing).
STAGE_OUTPUTS = (
    ("tokenizer/tokenizer.json", "text tokenizer", "dalle tokenizer train --out {run}/tokenizer"),
    ("dvae/model/config.json", "dVAE model", "dalle vae train --out {run}/dvae"),
    ("cache/train/meta.json", "training token cache", "dalle vae encode --data-split train --out {run}/cache/train"),
    ("cache/val/meta.json", "validation token cache", "dalle vae encode --data-split val --out {run}/cache/val"),
    ("prior/model/config.json", "prior", "dalle train --out {run}/prior"),
    ("reranker/model/config.json", "reranker", "dalle reranker train --out {run}/reranker"),
)


@dataclasses.dataclass
class EvalConfig:
    run: Path | None = option(None, "run directory written by `dalle pipeline` (required)")
    out: Path | None = option(None, "folder for metrics.json, the PNGs and report.html (default: RUN/eval)")
    captions: int = option(32, "captions per set (validation, training, held-out) to draw samples for")
    candidates: int = option(8, "samples drawn per caption and reranked by the contrastive model (paper: 512)")
    real_images: int = option(128, "real validation images: the reference of the Fréchet distance")
    features: str = option("efficientnet-lite0", "network whose features the Fréchet distance compares: "
                           "efficientnet-lite0 (ImageNet-trained, built in), reranker (our contrastive model's image "
                           "encoder) or inception (Inception-v3, needs --inception-weights)", choices=FEATURES)
    inception_weights: Path | None = option(None, "pt_inception-2015-12-05-*.pth for --features inception (never "
                                            "downloaded)")
    inception_score: bool = option(True, "compute the Inception-style score: the feature network's ImageNet "
                                   "classes when it has them, else EfficientNet-Lite0's")
    score_splits: int = option(1, "splits of the Inception-style score (the usual 10 need thousands of images)")
    blur_radii: tuple[float, ...] = option((0.0, 1.0, 2.0), "Gaussian blur radii (sigma, in pixels of the "
                                           "generated images) of the blur curve; the paper blurred 256-px images")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int | None = option(None, "sample among the k most likely codes (default: all)")
    top_p: float | None = option(None, "sample from the smallest set of codes holding this probability mass")
    seed: int = option(0, "seed of the sampling")
    precision: str = sample_options.sampling_precision()
    batch_size: int = option(64, "images per batch of the feature network and the dVAE")
    sample_batch_size: int = option(256, "(caption, sample) rows the prior draws and the dVAE decodes at once; at "
                                    "CPU sizes a step is mostly fixed overhead, so larger is faster (lower it for "
                                    "large models)")
    prior_records: int = option(512, "validation (and held-out) records on which the prior's loss is measured")
    reranker: Path | None = option(None, "the contrastive model that reranks the samples and gives the contrastive "
                                   "score: RUN/reranker/model by default, or a CLIP checkpoint (OpenAI's "
                                   "ViT-B-32.pt / RN50.pt, an open_clip .bin / .safetensors or directory)")
    clip_vocab: Path | None = clip_options.clip_vocab("--reranker")
    clip_activation: str | None = clip_options.clip_activation()
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")

    def __post_init__(self) -> None:
        check(self.run is not None, self, "run", "is required (--run RUN, a directory written by `dalle pipeline`)")
        self.run = Path(self.run)
        self.out = Path(self.out) if self.out is not None else self.run / "eval"
        self.reranker = Path(self.reranker) if self.reranker is not None else None
        self.clip_vocab = Path(self.clip_vocab) if self.clip_vocab is not None else None
        check(self.captions >= 2, self, "captions", "must be at least 2 (a covariance needs two images)")
        check(self.candidates >= 1, self, "candidates", "must be at least 1")
        check(self.real_images >= 2, self, "real_images", "must be at least 2")
        check(self.features in FEATURES, self, "features", f"must be one of {', '.join(FEATURES)}")
        check(self.features != "inception" or self.inception_weights is not None, self, "inception_weights",
              "is required with --features inception (the weights are never downloaded)")
        check(1 <= self.score_splits <= self.captions, self, "score_splits", "must lie in [1, captions]")
        self.blur_radii = tuple(float(r) for r in self.blur_radii)
        check(len(self.blur_radii) > 0 and min(self.blur_radii) >= 0, self, "blur_radii",
              "must hold at least one radius, all >= 0")
        check(self.temperature > 0, self, "temperature", "must be positive")
        check(self.top_k is None or self.top_k >= 1, self, "top_k", "must be at least 1")
        check(self.top_p is None or 0 < self.top_p <= 1, self, "top_p", "must lie in (0, 1]")
        check(self.batch_size >= 1, self, "batch_size", "must be at least 1")
        check(self.sample_batch_size >= 1, self, "sample_batch_size", "must be at least 1")
        check(self.prior_records >= 1, self, "prior_records", "must be at least 1")
        check(self.threads is None or self.threads >= 1, self, "threads", "must be at least 1")
        check(self.precision in sample_options.PRECISIONS, self, "precision",
              f"must be one of {', '.join(sample_options.PRECISIONS)}")


# ----------------------------------------------------------------------------------------------------- the run

def check_run(run: Path, own_reranker: bool = True) -> None:
    """Raise a :class:`UserError` naming the command that makes the first missing stage output."""
    if not run.is_dir():
        raise UserError(f"no run directory {run}: make one with `dalle pipeline --out {run}`")
    for rel, what, command in STAGE_OUTPUTS:
        if not (run / rel).is_file() and (own_reranker or what != "reranker"):
            raise UserError(f"{run} has no {what} ({run / rel}); make it with `{command.format(run=run)}` or run "
                            f"`dalle pipeline --out {run}`")


# ----------------------------------------------------------------------------------------------------- models

@torch.no_grad()
def prior_loss(prior: torch.nn.Module, tokenizer: Any, cache: TokenCache, n: int, batch_size: int) -> dict[str, float]:
    """The prior's loss on the first ``n`` records of a token cache, as its training evaluates it (no BPE dropout)."""
    device = next(prior.parameters()).device
    n = min(n, len(cache))
    sums = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
    for batch in cache_batches(cache, batch_size, shuffle=False, drop_last=False):
        keep = min(len(batch["captions"]), n - int(batch["indices"][0]))
        if keep <= 0:
            break
        ids, pad_mask = tokenizer.encode_batch(batch["captions"][:keep])  # (B, text_len) each
        out = prior.loss(ids.to(device), pad_mask.to(device), batch["codes"][:keep].to(device))
        for key, value in zip(sums, out, strict=True):
            sums[key] += float(value) * keep  # each term is a mean over the batch's tokens
    values = {k: v / n for k, v in sums.items()}
    return {"records": n, **values, "image_bits_per_token": values["image_loss"] / math.log(2)}


# Training curves in the report: (stage, log file, columns wanted, title).
LOGS = (("dvae", "metrics.csv", ("loss", "nll", "kl", "perplexity"), "dVAE training"),
        ("dvae", "eval.csv", ("psnr", "perplexity", "codes_used"), "dVAE validation"),
        ("prior", "metrics.csv", ("loss", "text_loss", "image_loss"), "prior training"),
        ("prior", "eval.csv", ("loss", "text_loss", "image_loss"), "prior validation"),
        ("reranker", "metrics.csv", ("loss", "acc", "scale"), "reranker training"),
        ("reranker", "eval.csv", ("i2t_top1", "t2i_top1"), "reranker validation retrieval"))


def training_figures(run: Path, out: Path) -> list[report.Figure]:
    figures = []
    for stage, name, wanted, title in LOGS:
        path = run / stage / name
        if not path.is_file():
            continue
        _, columns = plots.read_log(path)
        present = [c for c in wanted if c in columns]
        if present:
            file = f"log_{stage}_{path.stem}.png"
            plots.plot_log(out / file, path, present)
            figures.append(report.Figure(title, file, f"from {path}"))
    return figures


# ----------------------------------------------------------------------------------------------------- the whole run

@contextmanager
def _phase(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Log the start of a phase (the pipeline's user sees where the time goes) and record its duration."""
    log.info("eval: %s ...", name)
    start = time.monotonic()
    yield
    seconds[name] = round(time.monotonic() - start, 2)


def evaluate_run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.run``; write the PNGs, ``report.html`` and (last) ``metrics.json`` to ``cfg.out``."""
    check_run(cfg.run, own_reranker=cfg.reranker is None)
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _evaluate(cfg)
    finally:  # `dalle pipeline` runs this in its own process: later work keeps its thread count
        torch.set_num_threads(threads)


def _evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from dalle.generation import Generator
    from dalle.models.reranker import load_reranker
    from dalle.training.loop import resolve_device

    run, out = cfg.run, cfg.out
    device = resolve_device(cfg.device)
    reranker = load_reranker(cfg.reranker or run / "reranker" / "model", device, cfg.clip_vocab,
                             cfg.clip_activation)
    (out / METRICS).unlink(missing_ok=True)  # the done-marker of an earlier evaluation must not outlive a failed one
    seconds: dict[str, float] = {}
    with _phase(seconds, "real images"):
        real, real_captions = load_real(split_data(run, "val"), cfg.real_images)
        captions = real_captions[:cfg.captions]
        sets = [CaptionSet("val", "validation captions", captions, [None] * len(captions))]
        heldout = None
        if (run / "cache" / "heldout" / "meta.json").is_file():
            heldout = cache_captions(run, "heldout", cfg.captions, "held-out captions (compositions never seen in "
                                                                   "training)")
        # The training captions hold the held-out set's mix of caption kinds, so that the two accuracies compare.
        train = cache_captions(run, "train", cfg.captions, "training captions",
                               match=kind_counts(heldout) if heldout else None)
        sets += [train] if heldout is None else [train, heldout]
        floor, _ = load_real(split_data(run, "train"), len(captions))  # as many as generated validation images
    with _phase(seconds, "generation"):
        generator = Generator.from_run(run, device=device, batch_size=cfg.sample_batch_size, reranker=reranker,
                                       precision=cfg.precision)
        samples = draw(generator, sets, cfg)
    metrics: dict[str, Any] = {
        "run": str(run), "dataset": split_data(run, "val").source, "device": str(device),
        "sampling_precision": generator.precision,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": to_dict(cfg),
        "counts": {"captions": {name: len(s.captions.captions) for name, s in samples.items()},
                   "candidates": cfg.candidates, "real_images": len(real), "generated_val": len(captions),
                   "floor_images": len(floor), "resolution": real.shape[1]}}
    with _phase(seconds, "distribution metrics"):
        metrics.update(distribution_metrics(cfg, samples["val"], real, real_captions, floor, reranker, device))
    with _phase(seconds, "compositional accuracy"):
        verdicts = compositional(metrics["dataset"], samples, metrics)
    with _phase(seconds, "dVAE and prior"):
        recons = model_metrics(cfg, real, metrics, device)
        compositional_ceiling(metrics, real, recons, real_captions)
    unseen = samples.get("heldout") or samples["val"]
    seen = training_captions(run)
    metrics["unseen_captions"] = {"set": unseen.captions.name, "captions": len(unseen.captions.captions),
                                  "in_training": sum(normal_caption(c) in seen for c in unseen.captions.captions)}
    with _phase(seconds, "figures and report"):
        write_outputs(cfg, metrics, samples, verdicts, real, recons)
    metrics["seconds"] = seconds
    write_text_atomic(out / METRICS, json.dumps(_finite(metrics), indent=2, ensure_ascii=False) + "\n")
    (out / METRICS).chmod(0o644)  # written through a private temporary file; readable like the PNGs beside it
    return metrics


def distribution_metrics(cfg: EvalConfig, val: Samples, real: np.ndarray, real_captions: list[str],
                         floor: np.ndarray, reranker: Any, device: torch.device) -> dict[str, Any]:
    """The distribution metrics of the validation samples against the real images, and their two curves."""
    reader = sm.FeatureReader.build(cfg.features, cfg.inception_weights, reranker, cfg.inception_score, device,
                                    cfg.batch_size)
    real_score = float(reranker.score(torch.from_numpy(real), real_captions).double().mean())
    ref = sm.reference(reader, real, real_score, cfg.score_splits)
    size = sm.sample_size_curve(reader, val.candidates, val.scores, ref, cfg.score_splits)
    floor_fd = sm.frechet_to(reader.read(floor)[0], ref.stats)
    picks = val.candidates[np.arange(len(val.candidates)), val.picks]  # (C, H, W, 3): the n = N points
    blur = sm.blur_curve(reader, real, picks, cfg.blur_radii, cfg.score_splits,
                         unblurred=(size["fd"][-1], size["is"][-1] if size["is"] else None))
    scores = {"reranked": size["is"][-1], "unreranked": size["is"][0], "real": ref.score} if size["is"] else None
    return {
        "distribution": {
            "fd_label": reader.feature_label, "is_label": reader.score_label,
            "cs_label": f"contrastive score ({'our reranker' if reranker.name == 'Reranker' else reranker.name}, "
                        "scaled cosine similarity)",
            "fd": {"reranked": size["fd"][-1], "unreranked": size["fd"][0], "real_floor": floor_fd},
            "is": scores,
            "contrastive": {"reranked": size["contrastive"][-1], "unreranked": size["contrastive"][0],
                            "real": ref.contrastive}},
        "curves": {"blur": blur, "sample_size": size},
    }


def compositional(source: str, samples: dict[str, Samples], metrics: dict[str, Any]) -> dict[str, sm.Verdicts]:
    """Shapes only: the checker's verdicts on the training and held-out samples, into ``metrics``."""
    if source != "shapes":
        metrics["compositional"] = {"checker": None, "reason": f"Not measured: only the shapes dataset has a pixel "
                                    f"checker, and this run uses {source!r}."}
        return {}
    checker = ShapesChecker()
    verdicts, entries, curve = {}, {}, {}
    sizes = metrics["curves"]["sample_size"]["n"]
    for name in ("heldout", "train"):
        if name not in samples:
            continue
        s = samples[name]
        stated = [a if a is not None else c for a, c in zip(s.captions.attributes, s.captions.captions)]
        verdicts[name] = v = sm.check_samples(checker, s.candidates, s.reranked, stated)
        entries[name] = {"title": s.captions.title, **sm.accuracy_summary(v),
                         "by_kind": sm.accuracy_by_kind(v, [caption_kind(a) for a in s.captions.attributes])}
        curve[name] = [v.accuracy_at(s.scores[:, :n].argmax(1).tolist()) for n in sizes]
    metrics["compositional"] = {"checker": "shapes", "sets": entries}
    if "heldout" in verdicts and "train" in verdicts:
        metrics["compositional"]["heldout_vs_train"] = sm.accuracy_ratio(
            [r.all_correct for r in verdicts["heldout"].reranked], [r.all_correct for r in verdicts["train"].reranked])
    metrics["curves"]["sample_size"]["accuracy"] = curve
    return verdicts


def compositional_ceiling(metrics: dict[str, Any], real: np.ndarray, recons: np.ndarray,
                          captions: list[str]) -> None:
    """Shapes only: the checker on the real validation images and on their dVAE reconstructions, into
    ``metrics["compositional"]["ceiling"]``. A sample is decoded from codes, so the reconstructions' accuracy bounds
    what any prior can reach with this dVAE; the real images' accuracy is the checker's own."""
    if metrics["compositional"].get("checker") != "shapes":
        return
    checker = ShapesChecker()
    metrics["compositional"]["ceiling"] = {
        "images": len(real),
        "real": summarize([checker.check(image, c) for image, c in zip(real, captions)]),
        "reconstructions": summarize([checker.check(image, c) for image, c in zip(recons, captions)])}


def model_metrics(cfg: EvalConfig, real: np.ndarray, metrics: dict[str, Any], device: torch.device) -> np.ndarray:
    """dVAE reconstruction quality on the real validation images and the prior's loss, into ``metrics``; returns
    the reconstructions."""
    from dalle.generation import sampling_dtype
    from dalle.models.dvae import DVAE
    from dalle.models.transformer import PriorTransformer
    from dalle.tokenizers.text import TextTokenizer

    run = cfg.run
    dvae = DVAE.from_pretrained(run / "dvae" / "model", device=device).eval()
    metrics["dvae"], recons = reconstruction_metrics(dvae, real, cfg.batch_size)
    prior = PriorTransformer.from_pretrained(run / "prior" / "model", device=device).eval()
    tokenizer = TextTokenizer.load(run / "tokenizer")
    # Under bf16 autocast where the prior samples in bf16: 512 records in 6.0 s instead of 10.2 s on one CPU thread,
    # the same loss to 1e-5 (make demo's prior), as its training measured it.
    bf16 = sampling_dtype(cfg.precision, device) == torch.bfloat16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        metrics["prior"] = {split: prior_loss(prior, tokenizer, TokenCache(run / "cache" / split), cfg.prior_records,
                                              cfg.batch_size)
                            for split in ("val", "heldout") if (run / "cache" / split / "meta.json").is_file()}
    return recons


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------- outputs

def write_outputs(cfg: EvalConfig, metrics: dict[str, Any], samples: dict[str, Samples],
                  verdicts: dict[str, sm.Verdicts], real: np.ndarray, recons: np.ndarray) -> Path:
    """Plots, sample grids and the HTML report in ``cfg.out``; sets ``metrics["headline"]`` and ``["notes"]``."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    metrics["headline"], metrics["notes"] = headline(metrics), notes(metrics, cfg)
    curves = curve_figures(out, metrics)
    sections = []
    unseen = "heldout" if "heldout" in samples else "val"
    for name in (unseen, "train"):
        s = samples[name]
        for kind, images in (("reranked", s.reranked), ("unreranked", s.unreranked)):
            report.save_png(out / f"samples_{name}_{kind}.png", report.image_grid(images))
        rows = [report.SampleRow(caption, s.unreranked[i], s.reranked[i], s.candidates[i], s.picks[i])
                for i, caption in enumerate(s.captions.captions)]
        if name in verdicts:
            for row, first, best in zip(rows, verdicts[name].unreranked, verdicts[name].reranked):
                row.verdict_unreranked, row.verdict_reranked = sm.verdict_dict(first), sm.verdict_dict(best)
        sections.append(report.SampleSection(
            f"Samples for {s.captions.title}", section_note(name, metrics), rows,
            [("reranked grid", f"samples_{name}_reranked.png"), ("first-draw grid", f"samples_{name}_unreranked.png")]))
    n = min(16, len(real))
    pairs = np.stack([real[:n], recons[:n]], 1).reshape(2 * n, *real.shape[1:])  # original, reconstruction, ...
    report.save_png(out / "dvae_reconstructions.png", report.image_grid(pairs, columns=8))
    models = [report.Figure("dVAE reconstructions", "dvae_reconstructions.png",
                            "validation images, each followed by its reconstruction (encode to codes, decode)")]
    return report.write_report(out, metrics, sections, curves, models, training_figures(cfg.run, out))


def curve_figures(out: Path, metrics: dict[str, Any]) -> list[report.Figure]:
    d, curves = metrics["distribution"], metrics["curves"]
    blur, size = curves["blur"], curves["sample_size"]
    panels = [plots.Panel(d["fd_label"], {"reranked samples vs real": list(zip(blur["radius"], blur["fd"]))})]
    if blur["is"]:
        panels.append(plots.Panel(d["is_label"], {"reranked samples": list(zip(blur["radius"], blur["is"]))}))
    plots.plot_panels(out / "curve_blur.png", panels, "Gaussian blur radius (pixels)")
    panels = [plots.Panel(d["fd_label"], {"validation captions": list(zip(size["n"], size["fd"]))})]
    if size["is"]:
        panels.append(plots.Panel(d["is_label"], {"validation captions": list(zip(size["n"], size["is"]))}))
    panels.append(plots.Panel(d["cs_label"], {"validation captions": list(zip(size["n"], size["contrastive"]))}))
    if size.get("accuracy"):
        panels.append(plots.Panel("compositional accuracy (all stated attributes)",
                                  {SET_NAMES[name]: list(zip(size["n"], acc))
                                   for name, acc in size["accuracy"].items()},
                                  ylim=(-0.02, 1.02)))
    plots.plot_panels(out / "curve_sample_size.png", panels, "reranking sample size n (best of the first n)",
                      log_x=True)
    return [report.Figure("Metrics against blur radius", "curve_blur.png",
                          "both real and generated images blurred by a Gaussian of this standard deviation"),
            report.Figure("Metrics against reranking sample size", "curve_sample_size.png",
                          "each caption's best of its first n samples by the reranker; n = 1 is no reranking")]


def headline(m: dict[str, Any]) -> list[str]:
    """A few numbers for the pipeline to print."""
    d = m["distribution"]
    lines = [f"{d['fd_label']}: {d['fd']['reranked']:.2f} reranked, {d['fd']['unreranked']:.2f} first draw "
             f"(real-image floor {d['fd']['real_floor']:.2f})"]
    if d["is"]:
        lines.append(f"{d['is_label']}: {d['is']['reranked']:.2f} reranked, {d['is']['unreranked']:.2f} first draw "
                     f"(real images {d['is']['real']:.2f})")
    cs = d["contrastive"]
    lines.append(f"{d['cs_label']}: {cs['reranked']:.2f} reranked, {cs['unreranked']:.2f} first draw (real pairs "
                 f"{cs['real']:.2f})")
    for entry in (m["compositional"].get("sets") or {}).values():
        kinds = ", ".join(f"{kind} {k['reranked']:.1%}" for kind, k in (entry.get("by_kind") or {}).items())
        lines.append(f"compositional accuracy on {entry['title']}: {entry['reranked']['all']:.1%} reranked, "
                     f"{entry['unreranked']['all']:.1%} first draw, {entry['any_candidate']:.1%} with a right "
                     "candidate" + (f" (reranked, by caption kind: {kinds})" if kinds else ""))
    if line := report.ratio_line(m["compositional"].get("heldout_vs_train")):
        lines.append(line)
    if ceiling := m["compositional"].get("ceiling"):
        lines.append(f"the checker accepts {ceiling['real']['all']:.1%} of real validation images and "
                     f"{ceiling['reconstructions']['all']:.1%} of their dVAE reconstructions (the ceiling for samples)")
    v = m["dvae"]
    lines.append(f"dVAE reconstruction PSNR {v['psnr_db']:.2f} dB, {v['codes_used']} of {v['codebook_size']} codes "
                 f"used; prior validation loss {m['prior']['val']['loss']:.4f}")
    return lines


def section_note(name: str, m: dict[str, Any]) -> str:
    if name == "train":
        return "Captions of training records; the model has seen each of them with its image."
    u = m["unseen_captions"]
    if name == "heldout":
        return (f"Captions of the held-out split: each names a composition kept out of training "
                f"({u['in_training']} of {u['captions']} occur verbatim among the training captions).")
    return (f"This dataset has no held-out split; these are validation captions, of records not used in training "
            f"({u['in_training']} of {u['captions']} occur verbatim among the training captions).")


def notes(m: dict[str, Any], cfg: EvalConfig) -> list[str]:
    n = m["counts"]
    return [
        f"{m['distribution']['fd_label']} compares {n['generated_val']} generated with {n['real_images']} real "
        "validation images. With so few images the distance is biased upwards; compare it only with runs of the same "
        f"counts, and with the floor: the distance of {n['floor_images']} real training images to the same "
        "reference, which a perfect generator would score. It is not FID: that needs Inception-v3 features of 50,000 "
        "images at the resolution of published work.",
        "The contrastive score of the reranked samples is measured by the reranker that chose them, so it is high "
        "by construction; the Fréchet distance and the compositional accuracy are independent of the reranker.",
        "The Inception-style score reads ImageNet classes, which say little about synthetic images; it is reported "
        "because the paper does, with the classifier named.",
        f"Blur radii are in pixels of the {n['resolution']}-pixel images (the paper blurred 256-pixel images); "
        f"{n['candidates']} samples per caption were drawn (the paper reranks 512), temperature {cfg.temperature}.",
    ]
