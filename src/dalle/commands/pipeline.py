"""``dalle pipeline``: every stage in the paper's order from one config, skipping stages whose outputs exist.

Each stage is the same command a user would type (``dalle tokenizer train``, ``dalle vae train``, ``dalle vae encode``,
...), run in-process with arguments derived from one :class:`PipelineConfig`, so the pipeline adds ordering and
resumption, never a second implementation. A stage counts as done when its final output exists (a tokenizer.json,
a model directory, a finished cache, the evaluation's metrics.json); an interrupted stage is resumed from its own
checkpoints on the next run (the evaluation, a minute or two, starts again). The run ends by printing where the
report is and its headline numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dalle.config import add_options, check, from_args, given_as_argv, option
from dalle.data.config import DataConfig
from dalle.errors import UserError
from dalle.evaluation.run_eval import FEATURES
from dalle.training.precision import native_bf16

# Built-in datasets with a held-out split of compositions never seen in training (see their modules).
HAS_HELDOUT = {"shapes", "emoji", "openmoji"}
PIPELINE_AMP = ("auto", "bf16", "none")
# Data options the pipeline sets itself (each stage's split, one seed, the dVAE's resolution, ...); every other
# `--data-*` option of the stages (`--data-image-root`, `--data-max-aspect-ratio`, ...) is handed on to each stage as
# given.
PIPELINE_DATA = ("source", "split", "seed", "resolution", "size", "val_fraction")
# --time-budget: the training stages' shares of it, handed on as their --time-limit. The rest is left to the stages
# without updates to plan (tokenizer, token cache, evaluation): 15-21% of `make demo` on 2 cores since its evaluation
# reranks 32 candidates. On a bf16 CPU `make demo`'s dVAE (4,000 updates at 48 px) needs 33-38% of its 750 s or is
# cut short by its share, its prior (2,600 updates of 12×12 codes) 38-40%, its reranker (1,000 updates) 7-8%: the
# reranker's 8% buys more than the 3 points it takes from the dVAE and the prior (its validation top-1 retrieval
# 50% -> 71-73% with 1,000 updates instead of 400, and held-out captions 3-7 points more often right after
# reranking the same candidates). In fp32 the prior is what falls short first, and held-out captions suffer most
# from it (bench/RESULTS.md, "`make demo` at 48 px", "Held-out against training captions on equal terms" and "A
# faster machine's spare minutes").
BUDGET_SHARES = {"dvae": 0.36, "prior": 0.39, "reranker": 0.08}


@dataclasses.dataclass
class PipelineConfig:
    out: Path = option(Path("runs/pipeline"), "run directory: every stage writes a sub-folder here")
    dataset: str = option("shapes", "built-in dataset name or a path (any source `dalle data stats` accepts)")
    resolution: int | None = option(None, "image side in pixels (default: the dVAE preset's: 64 for tiny-64, 48 for "
                                    "tiny-48)")
    dvae_preset: str = option("tiny-64", "dVAE preset (see `dalle vae train --help`): tiny-64 (64 px, 8×8 codes), "
                              "tiny-48 (48 px, 12×12, `make demo`'s), tiny-64-16 (64 px, 16×16), paper (256 px, 32×32)")
    dvae_steps: int = option(3000, "dVAE training steps (the default suits a 2-core CPU demo; use tens of "
                             "thousands for quality)")
    # 16, not `dalle vae train`'s 32: the short CPU runs gain from updates, not from images per update (tiny-64,
    # 1,440 updates of 16 kept 25.5% of shapes validation images whole, 720 of 32 in the same time 11%).
    dvae_batch_size: int = option(16, "dVAE training batch size")
    # 1,000, not 400: on shapes the reranker's validation top-1 retrieval rose from 50% to 71-73% and its pick among the
    # same 32 candidates was right 3-7 points more often (bench/RESULTS.md, "A faster machine's spare minutes"); about
    # a minute on 2 cores.
    reranker_steps: int = option(1000, "contrastive reranker training steps")
    reranker_batch_size: int = option(64, "contrastive reranker batch size (the in-batch negatives)")
    # Batches of 8 as the dVAE's of 16: on the demo's 8×8 codes, 770 updates of 8 reached a validation loss of 0.243
    # against 0.256 for 385 of 16 (the same tokens, 10% more time; AVX2 CPU, fp32).
    # 1,600: the tiny prior is far from done at 1,200 updates of 8 (`make demo`: every attribute of held-out and
    # training captions improved with 1,600 and again with 2,400; bench/RESULTS.md).
    prior_steps: int = option(1600, "transformer prior training steps")
    prior_batch_size: int = option(8, "transformer prior batch size")
    prior_dim: int | None = option(None, "width of the prior (default: the tiny preset's 256; the paper's: 1,920 to "
                                   "3,968)")
    prior_layers: int | None = option(None, "transformer layers of the prior (default: the tiny preset's 4; the "
                                      "paper's: 64)")
    prior_heads: int | None = option(None, "attention heads of the prior (default: the tiny preset's 8, or with "
                                     "--prior-dim one 32-wide head per 32 channels, so that heads span the width)")
    prior_lr: float | None = option(None, "peak learning rate of the prior (default: `dalle train`'s)")
    vocab_size: int = option(4096, "BPE vocabulary size of the text tokenizer (paper: 16,384)")
    text_len: int = option(32, "text tokens per caption (paper: 256)")
    size: int | None = option(None, "records per split for procedural data (shapes); default: the dataset's own")
    val_fraction: float | None = option(None, "share of a user dataset's records (chosen by a hash of each key) held "
                                        "out for validation; default: the data's 0.02. A dataset of a few hundred "
                                        "images needs more, e.g. 0.1")
    time_budget: float | None = option(None, "seconds for the whole run: the dVAE, the prior and the reranker get "
                                       f"{BUDGET_SHARES['dvae']:.0%}, {BUDGET_SHARES['prior']:.0%} and "
                                       f"{BUDGET_SHARES['reranker']:.0%} of it as their --time-limit and take as "
                                       "many of their steps as fit at this machine's speed (the rest is left to the "
                                       "token cache and the evaluation); default: all the steps, however long they "
                                       "take")
    workers: int = option(0, "data-loading worker processes for the training stages")
    # Evaluation sizes for the demo's budget: 3 sets x 48 captions x 8 samples took 70 s (24 captions: 45 s) with one
    # thread on 2 quiet cores (bf16 demo, 2026-11-25). 48 make one caption 2.1 points of compositional accuracy
    # instead of 4.2: with 24, two runs of identical settings read 4.2% and 16.7% on held-out captions.
    # 96, not 48: an accuracy over 48 captions moves by ±7 points from the captions drawn alone (one object or two,
    # which colours), too much to compare held-out with training captions; 96 cost `make demo` 33 s more.
    eval_captions: int = option(96, "captions per evaluation set (validation, training, held-out)")
    # 32, not 16 or 8: on 384 captions of two make demo runs, the training captions' reranked rate stops rising at
    # 16 candidates while the held-out captions' keeps rising (21.4% -> 23.4% and 25.3% -> 28.4% from 16 to 32), so
    # held-out captions pass at 85% and 88% of the training captions' rate, against 77-78% with 16 and 75% pooled
    # with 8 (the paper reranks 512). bf16 decoding and the shared-caption sampler keep it to about 150 s in make demo.
    eval_candidates: int = option(32, "samples drawn per caption and reranked")
    eval_real_images: int = option(64, "real validation images: the Fréchet distance's reference")
    eval_features: str = option("efficientnet-lite0", "feature network of the Fréchet distance",
                                choices=FEATURES)
    inception_weights: Path | None = option(None, "pt_inception-2015-12-05-*.pth for --eval-features inception")
    # One thread: on 2 shared cores (load ~5) the same evaluation took 78 s with 1 thread and 250 s with 2 (the
    # sampler's many tiny per-step ops and the convolutions both stall on oversubscribed intra-op threads).
    eval_threads: int | None = option(1, "CPU threads of the evaluation stage (more pay off only on idle cores)")
    amp: str = option("auto", "autocast of the training stages, and the prior's arithmetic while the evaluation "
                      "samples: auto = bf16 where this machine computes it in hardware (a CUDA GPU, or a CPU with "
                      "AVX512-BF16 or AMX: about 2x faster dVAE steps), else fp32", choices=PIPELINE_AMP)
    seed: int = option(0, "seed of every stage")
    data_options: tuple[str, ...] = option((), "the stages' other --data-* options, as given", cli=False)

    def __post_init__(self) -> None:
        from dalle.models.dvae import preset

        self.out = Path(self.out)
        if self.resolution is None:
            self.resolution = preset(self.dvae_preset).resolution  # an unknown preset is a UserError naming them
        check(self.resolution >= 1, self, "resolution", "must be at least 1")
        check(self.dvae_steps >= 1, self, "dvae_steps", "must be at least 1")
        check(self.prior_steps >= 1, self, "prior_steps", "must be at least 1")
        check(self.prior_batch_size >= 1, self, "prior_batch_size", "must be at least 1")
        for name in ("prior_dim", "prior_layers", "prior_heads"):
            check(getattr(self, name) is None or getattr(self, name) >= 1, self, name, "must be at least 1")
        check(self.prior_lr is None or self.prior_lr > 0, self, "prior_lr", "must be positive")
        check(self.reranker_steps >= 1, self, "reranker_steps", "must be at least 1")
        check(self.dvae_batch_size >= 1, self, "dvae_batch_size", "must be at least 1")
        check(self.text_len >= 1, self, "text_len", "must be at least 1")
        check(self.workers >= 0, self, "workers", "must be >= 0")
        check(self.time_budget is None or self.time_budget > 0, self, "time_budget", "must be positive")
        check(self.eval_captions >= 2, self, "eval_captions", "must be at least 2")
        check(self.eval_candidates >= 1, self, "eval_candidates", "must be at least 1")
        check(self.eval_real_images >= 2, self, "eval_real_images", "must be at least 2")
        check(self.eval_threads is None or self.eval_threads >= 1, self, "eval_threads", "must be at least 1")
        check(self.amp in PIPELINE_AMP, self, "amp", f"must be one of {', '.join(PIPELINE_AMP)}")
        check(self.val_fraction is None or 0 < self.val_fraction < 1, self, "val_fraction", "must lie in (0, 1)")
        check(self.eval_features != "inception" or self.inception_weights is not None, self, "inception_weights",
              "is required with --eval-features inception")

    def amp_args(self) -> list[str]:
        """``--amp`` for the training commands, with auto resolved on this machine."""
        if self.amp != "auto":
            return ["--amp", self.amp]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return ["--amp", "bf16" if native_bf16(device) else "none"]

    def data_args(self, split: str = "train") -> list[str]:
        args = ["--data-source", self.dataset, "--data-split", split, "--data-seed", str(self.seed),
                "--data-resolution", str(self.resolution)]
        if self.size is not None:
            args += ["--data-size", str(self.size)]
        if self.val_fraction is not None:
            args += ["--data-val-fraction", str(self.val_fraction)]
        return args + list(self.data_options)

    def prior_args(self) -> list[str]:
        """The prior's architecture and learning rate where given (`dalle train` keeps its defaults otherwise)."""
        from dalle.models.transformer import PRESETS

        heads, head_dim = self.prior_heads, PRESETS["tiny"].head_dim  # `dalle train`'s default preset
        if heads is None and self.prior_dim is not None and self.prior_dim % head_dim == 0:
            heads = self.prior_dim // head_dim  # the paper's shape: width = heads × head width
        given = {"--dim": self.prior_dim, "--n-layers": self.prior_layers, "--n-heads": heads, "--lr": self.prior_lr}
        return [arg for flag, value in given.items() if value is not None for arg in (flag, str(value))]

    @property
    def prior_eval_every(self) -> int:
        """The prior's validation and sample grid four times in its run (every 250 updates at least): each costs
        about 6 s on 2 cores, 7 of them 40 s of `make demo`'s 1,600 updates at `dalle train`'s every 250."""
        return max(250, -(-self.prior_steps // 4))

    def time_limit(self, stage: str) -> list[str]:
        """``--time-limit`` for a training stage: its share of --time-budget (nothing without one)."""
        if self.time_budget is None:
            return []
        return ["--time-limit", f"{BUDGET_SHARES[stage] * self.time_budget:.0f}"]

    def eval_args(self) -> list[str]:
        args = ["--run", str(self.out), "--captions", str(self.eval_captions), "--candidates",
                str(self.eval_candidates), "--real-images", str(self.eval_real_images), "--features",
                self.eval_features, "--seed", str(self.seed),
                "--precision", "bf16" if self.amp_args()[1] == "bf16" else "fp32"]
        if self.eval_threads is not None:
            args += ["--threads", str(self.eval_threads)]
        return args + (["--inception-weights", str(self.inception_weights)] if self.inception_weights else [])

    @property
    def splits(self) -> list[str]:
        return ["train", "val"] + (["heldout"] if self.dataset in HAS_HELDOUT else [])


@dataclasses.dataclass
class Stage:
    name: str
    done: Callable[[PipelineConfig], bool]
    argv: Callable[[PipelineConfig], list[list[str]]]  # one or more `dalle ...` invocations


def _tokenizer_dir(c: PipelineConfig) -> Path:
    return c.out / "tokenizer"


def _dvae_model(c: PipelineConfig) -> Path:
    return c.out / "dvae" / "model"


def _cache(c: PipelineConfig, split: str) -> Path:
    return c.out / "cache" / split


def _cache_done(path: Path) -> bool:
    meta = path / "meta.json"
    if not meta.is_file():
        return False
    try:
        return bool(json.loads(meta.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


STAGES = [
    Stage("text tokenizer",
          lambda c: (_tokenizer_dir(c) / "tokenizer.json").is_file(),
          lambda c: [["tokenizer", "train", "--out", str(_tokenizer_dir(c)), "--vocab-size", str(c.vocab_size),
                      "--text-len", str(c.text_len), *c.data_args()]]),
    Stage("dVAE",
          lambda c: (_dvae_model(c) / "config.json").is_file(),
          lambda c: [["vae", "train", "--out", str(c.out / "dvae"), "--preset", c.dvae_preset, "--steps",
                      str(c.dvae_steps), "--batch-size", str(c.dvae_batch_size), "--workers", str(c.workers),
                      "--seed", str(c.seed), *c.amp_args(), *c.time_limit("dvae"),
                      *(["--resume"] if (c.out / "dvae" / "checkpoints").is_dir() else []), *c.data_args()]]),
    Stage("token cache",
          lambda c: all(_cache_done(_cache(c, s)) for s in c.splits),
          lambda c: [["vae", "encode", "--model", str(_dvae_model(c)), "--out", str(_cache(c, s)),
                      *c.data_args(s)] for s in c.splits]),
    Stage("prior",
          lambda c: (c.out / "prior" / "model" / "config.json").is_file(),
          lambda c: [["train", "--cache", str(_cache(c, "train")), "--val-cache", str(_cache(c, "val")),
                      "--tokenizer", str(_tokenizer_dir(c)), "--dvae", str(_dvae_model(c)),
                      "--out", str(c.out / "prior"),
                      "--steps", str(c.prior_steps), "--batch-size", str(c.prior_batch_size), "--seed", str(c.seed),
                      "--eval-every", str(c.prior_eval_every), *c.prior_args(), *c.amp_args(), *c.time_limit("prior"),
                      *(["--resume"] if (c.out / "prior" / "checkpoints").is_dir() else [])]]),
    Stage("reranker",
          lambda c: (c.out / "reranker" / "model" / "config.json").is_file(),
          lambda c: [["reranker", "train", "--tokenizer", str(_tokenizer_dir(c)), "--out", str(c.out / "reranker"),
                      "--steps", str(c.reranker_steps), "--batch-size", str(c.reranker_batch_size),
                      "--workers", str(c.workers), "--seed", str(c.seed), *c.amp_args(), *c.time_limit("reranker"),
                      *(["--resume"] if (c.out / "reranker" / "checkpoints").is_dir() else []), *c.data_args()]]),
    # Generation and evaluation are one command: the samples are only drawn to be measured. Its done-marker,
    # metrics.json, is written last, so an interrupted evaluation runs again from the start (1-2 minutes).
    Stage("generation + evaluation report",
          lambda c: _metrics(c).is_file(),
          lambda c: [["eval", *c.eval_args()]]),
]


def _metrics(c: PipelineConfig) -> Path:
    return c.out / "eval" / "metrics.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run every stage in order (tokenizer → dVAE → token cache → prior → "
                       "reranker → generation and evaluation report), skipping stages whose outputs exist",
                       description=__doc__)
    add_options(p, PipelineConfig, title="pipeline")
    add_options(p, DataConfig, prefix="data_", exclude=PIPELINE_DATA,
                title="data: handed on to every stage (e.g. --data-image-root for COCO images kept elsewhere)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dalle.cli import main

    cfg = from_args(PipelineConfig, args, data_options=tuple(given_as_argv(args, DataConfig, "data_", PIPELINE_DATA)))
    cfg.out.mkdir(parents=True, exist_ok=True)
    record = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # as pipeline.json holds it
    _note_changed_options(cfg, record)
    (cfg.out / "pipeline.json").write_text(json.dumps(record, indent=2) + "\n")
    if not all(stage.done(cfg) for stage in STAGES):
        _check_val_split(cfg)
    began = time.monotonic()
    for i, stage in enumerate(STAGES, 1):
        header = f"[{i}/{len(STAGES)}] {stage.name}"
        if stage.done(cfg):
            print(f"{header}: done already, skipping ({cfg.out})")
            continue
        print(f"{header}: running", flush=True)
        start = time.monotonic()
        for argv in stage.argv(cfg):
            print("  $ dalle " + " ".join(argv), flush=True)
            code = main(argv)
            if code != 0:
                raise UserError(f"stage '{stage.name}' stopped with exit code {code}; run the same command again to "
                                "resume it")
        print(f"{header}: finished in {time.monotonic() - start:.0f} s", flush=True)
    took = f" in {time.monotonic() - began:.0f} s" + (f" (budget {cfg.time_budget:.0f} s)" if cfg.time_budget else "")
    print(f"\nAll stages are done{took}; outputs are in {cfg.out}/.")
    _print_summary(cfg)
    return 0


def _note_changed_options(cfg: PipelineConfig, now: dict) -> None:
    """Say which options differ from the run directory's previous invocation: a finished stage is skipped, so a new
    value (a larger --prior-dim, another dataset) would otherwise be silently ignored by it."""
    try:
        before = json.loads((cfg.out / "pipeline.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    changed = [f"{'--' + name.replace('_', '-') if name != 'data_options' else 'the --data-* options'} "
               f"({json.dumps(before[name])} → {json.dumps(value)})"
               for name, value in now.items() if name != "out" and name in before and before[name] != value]
    finished = [stage.name for stage in STAGES if stage.done(cfg)]
    if changed and finished:
        print(f"note: changed since the last run in {cfg.out}: {', '.join(changed)}. Finished stages "
              f"({', '.join(finished)}) keep what they were run with; delete a stage's folder to run it again with "
              "the new values.", flush=True)


def _check_val_split(cfg: PipelineConfig) -> None:
    """Every stage validates on the val split, so an empty one would stop the first training stage at its first
    evaluation: say so before any training. Reading stops at the first validation record, so on a large dataset this
    costs a few dozen records."""
    from dalle.data.registry import open_source

    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser, DataConfig, prefix="data_")  # the options every stage parses data_args with
    data = from_args(DataConfig, parser.parse_args(cfg.data_args("val")), "data_")
    if next(iter(open_source(data).records()), None) is None:
        raise UserError(f"the validation split of {cfg.dataset} is empty: validation holds the records whose key "
                        f"hashes into a {data.val_fraction:g} share, and none did. Pass a larger --val-fraction "
                        "(e.g. 0.1 for a few hundred images)")


def _print_summary(cfg: PipelineConfig) -> None:
    """Where the report is, and the headline numbers of metrics.json."""
    try:
        metrics = json.loads(_metrics(cfg).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {_metrics(cfg)} ({err}); delete {cfg.out / 'eval'} and run the pipeline "
                        "again to redo the evaluation") from None
    print(f"report: {cfg.out / 'eval' / 'report.html'}")
    for line in metrics.get("headline", []):
        print(f"  {line}")
    print(f"draw your own: dalle generate \"a caption\" --run {cfg.out}   or in a browser: dalle serve --run {cfg.out}")
