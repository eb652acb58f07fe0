"""``dalle vae train`` (stage 1 with the paper's recipe) and ``dalle vae encode`` (the token cache for stage 2).

Registered into the ``dalle vae`` group by :mod:`dalle.commands.vae` through :func:`register`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from dalle.config import add_options, check, from_args, option
from dalle.data.config import DataConfig
from dalle.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EncodeConfig:
    model: Path | None = option(None, "dVAE model directory (RUN/model written by `dalle vae train`)")
    out: Path | None = option(None, "token cache directory to write (resumed if an earlier encode was interrupted)")
    batch_size: int = option(64, "images per encoder batch")
    chunk_size: int = option(4096, "records per codes-NNNNN.npy file (the unit of resuming)")
    workers: int = option(0, "data-loading worker processes")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    overwrite: bool = option(False, "encode again even if --out holds a finished cache")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check(self.model is not None, self, "model", "is required (--model DIR)")
        check(self.out is not None, self, "out", "is required (--out DIR)")
        self.model, self.out = Path(self.model), Path(self.out)
        check(self.batch_size >= 1, self, "batch_size", "must be at least 1")
        check(self.chunk_size >= 1, self, "chunk_size", "must be at least 1")
        check(self.workers >= 0, self, "workers", "must be >= 0")
        check(self.threads is None or self.threads >= 1, self, "threads", "must be at least 1")


def register(vae_sub: argparse._SubParsersAction) -> None:
    from dalle.training.dvae_task import DVAETrainConfig, DVAETrainLoopConfig

    train = vae_sub.add_parser(
        "train", help="train the dVAE with the paper's recipe (logit-Laplace or, on the tiny presets, Gaussian "
        "likelihood, KL to uniform with beta -> 6.6, or 0.2 with the Gaussian, Gumbel tau -> 1/16, EMA)",
        description="Train the discrete VAE (paper section 2.1). Writes RUN/metrics.csv, RUN/eval.csv, reconstruction "
        "grids in RUN/samples/, checkpoints in RUN/checkpoints/ and the EMA model in RUN/model. Ctrl-C or SIGTERM "
        "saves a checkpoint; --resume continues exactly.")
    add_options(train, DVAETrainConfig, title="dVAE recipe")
    add_options(train, DVAETrainLoopConfig, title="training loop")
    add_options(train, DataConfig, prefix="data_", title="data")
    train.set_defaults(func=run_train)

    encode = vae_sub.add_parser(
        "encode", help="encode a dataset split into a token cache of argmax image codes for the prior",
        description="Run the dVAE encoder (argmax codes, no Gumbel noise; paper section 2.2) over a dataset split and "
        "write codes-NNNNN.npy + captions-NNNNN.jsonl chunks and meta.json. Interrupted encodes resume.")
    add_options(encode, EncodeConfig, title="encode")
    add_options(encode, DataConfig, prefix="data_", title="data")
    encode.set_defaults(func=run_encode)


def run_train(args: argparse.Namespace) -> int:
    from dalle.commands._training import RunOptions, finish
    from dalle.config import from_dict
    from dalle.models.dvae import PRESETS, DVAEConfig
    from dalle.training.dvae_task import DVAETask, DVAETrainConfig, DVAETrainLoopConfig
    from dalle.training.loop import Trainer

    run = RunOptions(args, DVAETrainLoopConfig)
    dvae = run.task(DVAETrainConfig, "dvae")
    model = None
    if run.saved is not None:
        data = run.task(DataConfig, "data", prefix="data_")
        # The architecture the checkpoints were written with, not today's preset (presets may change between
        # versions; a config saved before a field existed gets that field's default, e.g. the logit-Laplace decoder).
        model = from_dict(DVAEConfig, run.saved["task"]["model"])
    else:
        # The preset fixes the image size unless --data-resolution is given (the model is fully convolutional).
        preset_size = {} if hasattr(args, "data_resolution") else {"resolution": PRESETS[dvae.preset].resolution}
        data = from_args(DataConfig, args, "data_", **preset_size)
    result = Trainer(DVAETask(dvae, data, model), run.train).run()
    return finish(result, lambda e: f"val PSNR {e['psnr']:.2f} dB, MSE {e['mse']:.5f}, true ELB "
                  f"{e['true_elb']:.1f} nats, codebook perplexity {e['perplexity']:.1f}, codes used {e['codes_used']}")


def run_encode(args: argparse.Namespace) -> int:
    from dalle.data.token_cache import encode_dataset
    from dalle.models.dvae import DVAE
    from dalle.training.loop import resolve_device

    cfg = from_args(EncodeConfig, args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if not (cfg.model / "config.json").is_file():
        raise UserError(f"{cfg.model} is not a model directory (no config.json); pass RUN/model of `dalle vae train`")
    model = DVAE.from_pretrained(cfg.model, device=device).to(memory_format=torch.channels_last)
    given = hasattr(args, "data_resolution")
    data = from_args(DataConfig, args, "data_", **({} if given else {"resolution": model.config.resolution}))
    result = encode_dataset(model, cfg.model, data, cfg.out, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size,
                            workers=cfg.workers, device=device, overwrite=cfg.overwrite, progress=cfg.progress)
    if result.skip_summary:
        print(result.skip_summary)
    print(f"{result.path}: {result.count} records ({result.encoded} encoded now), "
          f"{model.config.grid_size}x{model.config.grid_size} codes of {model.config.codebook_size}")
    return 0
