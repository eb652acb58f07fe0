"""``dalle eval``: sample, rerank and measure a run directory; write metrics.json, plots and report.html.

    dalle eval --run runs/demo                                   # EfficientNet-Lite0 features (built in)
    dalle eval --run runs/demo --features reranker               # our contrastive model's image features
    dalle eval --run runs/demo --features inception --inception-weights pt_inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import argparse

from dalle.config import add_options, from_args


def register(sub: argparse._SubParsersAction) -> None:
    from dalle.evaluation.run_eval import EvalConfig

    p = sub.add_parser(
        "eval", help="evaluate a run: Fréchet distance, Inception-style and contrastive scores, their curves "
        "against blur and reranking sample size, held-out compositional accuracy, report.html",
        description="Draw --candidates samples for validation, training and held-out captions of a run directory "
        "(`dalle pipeline`), rerank them with the run's contrastive model and measure: the Fréchet distance to real "
        "validation images in the features of --features, the Inception-style score of an ImageNet classifier, the "
        "reranker's contrastive score, each against Gaussian blur radius and against the reranking sample size "
        "(1, 2, 4, ... N), compositional accuracy on shapes (held-out and training captions, reranked and "
        "first draw), the dVAE's reconstruction PSNR and codebook usage, and the prior's validation loss. Writes "
        "RUN/eval/metrics.json, PNG plots and sample grids, and RUN/eval/report.html. Every number names the "
        "network that made it; none is called FID.")
    add_options(p, EvalConfig, title="evaluation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dalle.evaluation.run_eval import EvalConfig, evaluate_run

    cfg = from_args(EvalConfig, args)
    metrics = evaluate_run(cfg)
    for line in metrics["headline"]:
        print(line)
    print(f"report: {cfg.out / 'report.html'}")
    print(f"metrics: {cfg.out / 'metrics.json'}")
    return 0
