"""``dalle reranker``: train and evaluate the contrastive model that reranks samples (paper, "Sampling and evaluation").

    dalle tokenizer train --data-source shapes --out runs/text-tokenizer
    dalle reranker train --tokenizer runs/text-tokenizer --out runs/reranker
    dalle reranker eval --model runs/reranker/model --data-split heldout
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from dalle import clip_options
from dalle.cli import add_group
from dalle.config import add_options, check, from_args, option
from dalle.data.config import DataConfig

# Lines of the metrics table: (key, label); the rest of the evaluation dict is printed as context.
TABLE = (("i2t_top1", "image→text top-1"), ("i2t_top5", "image→text top-5"), ("t2i_top1", "text→image top-1"),
         ("t2i_top5", "text→image top-5"))


@dataclasses.dataclass
class EvalConfig:
    model: Path | None = option(None, "reranker model directory (RUN/model written by `dalle reranker train`) or a "
                                "CLIP checkpoint (OpenAI's ViT-B-32.pt / RN50.pt, an open_clip .bin / .safetensors "
                                "or directory)")
    clip_vocab: Path | None = clip_options.clip_vocab("--model")
    clip_activation: str | None = clip_options.clip_activation()
    pairs: int = option(512, "(image, caption) pairs of the split to retrieve among")
    batch_size: int = option(256, "images or captions embedded at once")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    json: bool = option(False, "print the metrics as one JSON object")

    def __post_init__(self) -> None:
        check(self.model is not None, self, "model", "is required (--model DIR)")
        self.model = Path(self.model)
        check(self.pairs >= 2, self, "pairs", "must be at least 2")
        check(self.batch_size >= 1, self, "batch_size", "must be at least 1")
        check(self.threads is None or self.threads >= 1, self, "threads", "must be at least 1")


def register(sub: argparse._SubParsersAction) -> None:
    from dalle.training.reranker_task import RerankerTrainConfig, RerankerTrainLoopConfig

    group = add_group(sub, "reranker", "the CLIP-style contrastive model that scores (image, caption) pairs and "
                                       "reranks samples")
    train = group.add_parser(
        "train", help="train the contrastive reranker (symmetric InfoNCE, learned temperature, EMA)",
        description="Train the image and text encoders of the reranker on (image, caption) pairs with CLIP's "
        "symmetric contrastive loss. Needs a text tokenizer (`dalle tokenizer train`). Writes RUN/metrics.csv, "
        "RUN/eval.csv (retrieval on validation pairs), checkpoints in RUN/checkpoints/ and the EMA model, with the "
        "tokenizer, in RUN/model. Ctrl-C or SIGTERM saves a checkpoint; --resume continues exactly.")
    add_options(train, RerankerTrainConfig, title="reranker")
    add_options(train, RerankerTrainLoopConfig, title="training loop")
    add_options(train, DataConfig, prefix="data_", title="data")
    train.set_defaults(func=run_train)

    ev = group.add_parser(
        "eval", help="retrieval accuracy and mean scores of a trained reranker on a dataset split",
        description="Embed the first --pairs (image, caption) pairs of a split and report image→text and "
        "text→image retrieval top-1/top-5 among them (a retrieval is right when its caption text equals the "
        "query's), the chance level, and the mean score of matched and mismatched pairs.")
    add_options(ev, EvalConfig, title="evaluation")
    add_options(ev, DataConfig, prefix="data_", title="data (default split: val; resolution: the model's)")
    ev.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from dalle.commands._training import RunOptions, finish
    from dalle.training.loop import Trainer
    from dalle.training.reranker_task import RerankerTask, RerankerTrainConfig, RerankerTrainLoopConfig

    run = RunOptions(args, RerankerTrainLoopConfig)
    task = RerankerTask(run.task(RerankerTrainConfig, "reranker"), run.task(DataConfig, "data", prefix="data_"))
    return finish(Trainer(task, run.train).run(), format_eval)


def run_eval(args: argparse.Namespace) -> int:
    from dalle.models.reranker import load_reranker
    from dalle.training.loop import resolve_device
    from dalle.training.reranker_task import evaluate_retrieval, load_pairs

    cfg = from_args(EvalConfig, args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    reranker = load_reranker(cfg.model, resolve_device(cfg.device), cfg.clip_vocab, cfg.clip_activation)
    defaults = {k: v for k, v in (("split", "val"), ("resolution", reranker.resolution))
                if not hasattr(args, f"data_{k}")}
    data = from_args(DataConfig, args, "data_", **defaults)
    images, captions = load_pairs(data, cfg.pairs)
    metrics = evaluate_retrieval(reranker, images, captions, cfg.batch_size)
    if cfg.json:
        print(json.dumps({"model": str(cfg.model), "source": data.source, "split": data.split, **metrics}))
        return 0
    print(f"{cfg.model} on {data.source} split {data.split!r}: {int(metrics['pairs'])} pairs, "
          f"{int(metrics['distinct_captions'])} distinct captions")
    for key, label in TABLE:
        print(f"  {label:<17} {100 * metrics[key]:6.2f} %   (chance {100 * metrics['chance_' + key[-4:]]:.2f} %)")
    print(f"  mean score: matched {metrics['score_matched']:.2f}, mismatched {metrics['score_mismatched']:.2f}")
    return 0


def format_eval(m: dict[str, float]) -> str:
    """One line: retrieval both ways against chance, and the score gap."""
    return (f"val retrieval image→text top-1 {100 * m['i2t_top1']:.1f}% / top-5 {100 * m['i2t_top5']:.1f}%, "
            f"text→image top-1 {100 * m['t2i_top1']:.1f}% / top-5 {100 * m['t2i_top5']:.1f}% (chance "
            f"{100 * m['chance_top1']:.1f}% / {100 * m['chance_top5']:.1f}% over {int(m['pairs'])} pairs); mean "
            f"score matched {m['score_matched']:.2f} vs mismatched {m['score_mismatched']:.2f}")
