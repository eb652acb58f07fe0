"""Where a run's compositional accuracy is lost: the prior, the reranker, or the kind of caption.

For the training and held-out captions of a shapes run (the training ones with the held-out set's mix of one- and
two-object captions, as `dalle eval` draws them), draws N candidates per caption and prints, per caption kind:

* the prior's own rate: the fraction of all candidates the shapes checker accepts;
* for n = 1, 2, 4, ..., N: the reranker's best of the first n, and the fraction of captions with any accepted
  candidate among them (what a perfect reranker would reach);
* each attribute's rate over all candidates;
* for one-object captions, per stated shape and per stated colour: the rate over all candidates and the shapes the
  candidates' object came out as (for a held-out pair such as "red triangle", compare the training captions' other
  triangles and other red objects).

Usage: PYTHONPATH= .venv/bin/python bench/compositional_probe.py RUN [--captions 96] [--candidates 16]
[--reranker DIR]. With --reranker, a second reranker rescores the same candidates (the first scores come from the
run's own). Prints markdown; about a minute per 1,500 candidates on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
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


def by_object(name: str, attributes: list[dict | None], verdicts: sm.Verdicts) -> list[str]:
    """Rows for the one-object captions of a set, grouped by stated shape, then by stated colour."""
    groups: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, Counter()])  # right, candidates, drawn shapes
    for attrs, results in zip(attributes, verdicts.candidates, strict=True):
        if attrs is None or len(attrs["objects"]) != 1:
            continue
        stated = attrs["objects"][0]
        for key in (("shape", stated["shape"]), ("colour", stated["color"])):
            group = groups[key]
            group[0] += sum(r.all_correct for r in results)
            group[1] += len(results)
            group[2].update(r.found[0].shape if r.found[0] is not None else "none found" for r in results)
    rows = []
    for (by, value), (right, total, drawn) in sorted(groups.items()):
        common = ", ".join(f"{shape} {count / total:.0%}" for shape, count in drawn.most_common(3))
        rows.append(f"| {name} | {by} {value} | {total} | {right / total:.1%} | {common} |")
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
    checker, attributes, objects = ShapesChecker(), {}, []
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
        objects += by_object(name, s.captions.attributes, verdicts)
    print("\nEach attribute over every candidate:\n")
    print("| captions | " + " | ".join(ATTRIBUTES) + " | all |")
    print("| --- | " + " | ".join("---:" for _ in ATTRIBUTES) + " | ---: |")
    for name, summary in attributes.items():
        print(f"| {name} | " + " | ".join(f"{summary[a]:.1%}" if a in summary else "-" for a in (*ATTRIBUTES, "all"))
              + " |")
    print("\nOne-object captions by what they state, over every candidate:\n")
    print("| captions | stated | candidates | all right | shapes drawn (most common) |")
    print("| --- | --- | ---: | ---: | --- |")
    print("\n".join(objects))


if __name__ == "__main__":
    main()
