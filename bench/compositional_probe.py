"""Where a run's compositional accuracy is lost: the prior, the reranker, or the kind of caption.

For the training and held-out captions of a shapes run (the training ones with the held-out set's mix of one- and
two-object captions, as `dalle eval` draws them), draws N candidates per caption and prints, per caption kind:

* the prior's own rate: the fraction of all candidates the shapes checker accepts;
* for n = 1, 2, 4, ..., N: the reranker's best of the first n, and the fraction of captions with any accepted
  candidate among them (what a perfect reranker would reach);
* each attribute's rate over all candidates.

Usage: PYTHONPATH= .venv/bin/python bench/compositional_probe.py RUN [--captions 96] [--candidates 16]
[--reranker DIR]. With --reranker, a second reranker rescores the same candidates (the first scores come from the
run's own). Prints markdown; about a minute per 1,500 candidates on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dalle.evaluation import sample_metrics as sm
from dalle.evaluation.blur import doubling_sizes
from dalle.evaluation.eval_sets import cache_captions, caption_kind, draw, kind_counts
from dalle.evaluation.run_eval import EvalConfig
from dalle.evaluation.shapes_checker import ATTRIBUTES, ShapesChecker
from dalle.generation import Generator
from dalle.models.reranker import load_reranker


def report(name: str, ok: np.ndarray, scores: np.ndarray, kinds: list[str | None], scorer: str) -> list[str]:
    """Rows of the table for one caption set: ``ok (C, N)`` the checker's verdicts, ``scores (C, N)`` the reranker's."""
    rows = []
    for kind in ["all", *sorted({k for k in kinds if k is not None})]:
        sel = np.array([kind == "all" or k == kind for k in kinds])
        cells = [f"{ok[sel].mean():.1%}"]
        for n in doubling_sizes(ok.shape[1]):
            pick = scores[sel, :n].argmax(1)
            cells.append(f"{ok[sel][np.arange(sel.sum()), pick].mean():.1%} / {ok[sel, :n].any(1).mean():.1%}")
        rows.append(f"| {name} | {scorer} | {kind} ({sel.sum()}) | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--captions", type=int, default=96)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reranker", type=Path, default=None, help="a second reranker to rescore the candidates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device("cpu")
    own = load_reranker(args.run / "reranker" / "model", device)
    cfg = EvalConfig(run=args.run, captions=args.captions, candidates=args.candidates, temperature=args.temperature,
                     seed=args.seed)
    heldout = cache_captions(args.run, "heldout", args.captions, "held-out captions")
    train = cache_captions(args.run, "train", args.captions, "training captions", match=kind_counts(heldout))
    start = time.perf_counter()
    samples = draw(Generator.from_run(args.run, device=device, batch_size=256, reranker=own), [train, heldout], cfg)
    print(f"{args.run}: {args.captions} captions per set, {args.candidates} candidates each, temperature "
          f"{args.temperature}; drawn in {time.perf_counter() - start:.0f} s\n")
    sizes = doubling_sizes(args.candidates)
    print("| captions | reranker | kind (captions) | every candidate | "
          + " | ".join(f"n={n}: reranked / any right" for n in sizes) + " |")
    print("| --- | --- | --- | ---: | " + " | ".join("---:" for _ in sizes) + " |")
    checker, attributes = ShapesChecker(), {}
    for name, s in samples.items():
        stated = [a if a is not None else c for a, c in zip(s.captions.attributes, s.captions.captions)]
        verdicts = sm.check_samples(checker, s.candidates, s.reranked, stated)
        ok = np.array([[r.all_correct for r in row] for row in verdicts.candidates])
        kinds = [caption_kind(a) for a in s.captions.attributes]
        print("\n".join(report(name, ok, s.scores.numpy(), kinds, "the run's")))
        if args.reranker is not None:
            other = load_reranker(args.reranker, device)
            with torch.no_grad():
                scores = np.stack([other.score(torch.from_numpy(row), [caption] * len(row)).float().numpy()
                                   for row, caption in zip(s.candidates, s.captions.captions)])
            print("\n".join(report(name, ok, scores, kinds, str(args.reranker))))
        attributes[name] = sm.summarize([r for row in verdicts.candidates for r in row])
    print("\nEach attribute over every candidate:\n")
    print("| captions | " + " | ".join(ATTRIBUTES) + " | all |")
    print("| --- | " + " | ".join("---:" for _ in ATTRIBUTES) + " | ---: |")
    for name, summary in attributes.items():
        print(f"| {name} | " + " | ".join(f"{summary[a]:.1%}" if a in summary else "-" for a in (*ATTRIBUTES, "all"))
              + " |")


if __name__ == "__main__":
    main()
