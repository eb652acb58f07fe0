"""``dalle train``: stage 2, the transformer prior over caption tokens and cached image codes (paper §2.2).

    dalle tokenizer train --data-source shapes --out runs/text-tokenizer
    dalle vae encode --model runs/dvae/model --data-split train --out runs/cache/train   (and --data-split val)
    dalle train --cache runs/cache/train --val-cache runs/cache/val --tokenizer runs/text-tokenizer \\
        --dvae runs/dvae/model --out runs/prior
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from dalle.config import add_options
    from dalle.training.prior_task import PriorTrainConfig, PriorTrainLoopConfig

    train = sub.add_parser(
        "train", help="train the transformer prior on a token cache (stage 2: AdamW, BPE dropout, 1/8 text + 7/8 "
        "image loss, EMA)",
        description="Train the sparse transformer prior on the image codes and captions of a token cache (`dalle vae "
        "encode`); no dVAE runs in the loop. The text sizes come from --tokenizer, the grid and codebook from the "
        "cache. Writes RUN/metrics.csv (loss, text and image loss), RUN/eval.csv (validation losses), sample grids in "
        "RUN/samples/ when --dvae is given, checkpoints in RUN/checkpoints/ and the EMA model, with the tokenizer, in "
        "RUN/model. Ctrl-C or SIGTERM saves a checkpoint; --resume continues exactly (BPE dropout included).")
    add_options(train, PriorTrainConfig, title="prior")
    add_options(train, PriorTrainLoopConfig, title="training loop")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dalle.commands._training import RunOptions, finish
    from dalle.training.loop import Trainer
    from dalle.training.prior_task import PriorTask, PriorTrainConfig, PriorTrainLoopConfig

    run = RunOptions(args, PriorTrainLoopConfig)
    result = Trainer(PriorTask(run.task(PriorTrainConfig, "prior")), run.train).run()
    return finish(result, lambda e: f"val loss {e['loss']:.4f}, text loss {e['text_loss']:.4f}, image loss "
                  f"{e['image_loss']:.4f} nats ({e['image_bits_per_token']:.3f} bits per image token)")
