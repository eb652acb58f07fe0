"""``dalle vae``: the stage-1 discrete VAE (paper §2.1) — import OpenAI's weights, look at reconstructions.

    dalle vae import-openai encoder.pkl decoder.pkl --out runs/dvae-openai
    dalle vae reconstruct photo.jpg cat.png --model runs/dvae-openai --out recon/

``train`` and ``encode`` (the token cache) live in :mod:`dalle.commands.vae_train` and join this group.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle.cli import add_group
from dalle.config import add_options, check, from_args, option, to_dict
from dalle.data.images import BadRecord, open_image
from dalle.data.transforms import ImageTransform, to_float, to_uint8
from dalle.errors import UserError
from dalle.models.convert import load_openai_file, openai_to_ours
from dalle.models.dvae import DVAE, count_parameters, load_state_dict_checked


@dataclass
class ReconstructOptions:
    batch_size: int = option(16, "images encoded and decoded at once")
    device: str = option("cpu", "torch device to run the dVAE on, e.g. cpu or cuda")

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, self, "batch_size", "must be at least 1")


def register(sub: argparse._SubParsersAction) -> None:
    vae_sub = add_group(sub, "vae", "stage 1: the discrete VAE that turns images into a grid of codes and back")

    imp = vae_sub.add_parser(
        "import-openai", help="convert OpenAI's released dVAE (encoder.pkl, decoder.pkl) to a model directory",
        description="Read OpenAI's dVAE files without running code from them (pickled dall_e modules, state-dict "
                    ".pt files or .safetensors), infer the configuration from the tensor shapes and write "
                    "config.json + model.safetensors to --out.")
    imp.add_argument("encoder", type=Path, help="OpenAI's encoder.pkl, or an encoder state dict (.pt / .safetensors)")
    imp.add_argument("decoder", type=Path, help="OpenAI's decoder.pkl, or a decoder state dict (.pt / .safetensors)")
    imp.add_argument("--out", type=Path, required=True, help="model directory to write")
    imp.add_argument("--resolution", type=int, default=256,
                     help="input side in pixels the model will be used at (default: 256, as released)")
    imp.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    imp.set_defaults(func=_import_openai)

    rec = vae_sub.add_parser(
        "reconstruct", help="encode and decode images; save original | reconstruction side by side",
        description="Pre-process each image as training does (shorter side resized to the model's resolution, "
                    "centre crop), encode it to codes, decode them, write OUT/NAME.png with the original on the "
                    "left and the reconstruction on the right, and print the PSNR per image.")
    rec.add_argument("images", nargs="+", type=Path, help="image files")
    rec.add_argument("--model", type=Path, required=True, help="dVAE model directory (config.json + model.safetensors)")
    rec.add_argument("--out", type=Path, required=True, help="directory to write the side-by-side PNGs to")
    add_options(rec, ReconstructOptions, title="reconstruction")
    rec.set_defaults(func=_reconstruct)

    from dalle.commands import vae_train  # `train` and `encode`, next to the training code they drive

    vae_train.register(vae_sub)


# --- import-openai ---------------------------------------------------------------------------------------------


def _import_openai(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    encoder_sd = load_openai_file(args.encoder)
    decoder_sd = load_openai_file(args.decoder)
    config, state = openai_to_ours(encoder_sd, decoder_sd, resolution=args.resolution)
    with torch.device("meta"):
        model = DVAE(config)
    load_state_dict_checked(model, state, f"{args.encoder} + {args.decoder}")
    model.save_pretrained(out)
    print("inferred config: " + json.dumps(to_dict(config)))
    print(f"{config.resolution} px -> {config.grid_size}x{config.grid_size} codes from a codebook of "
          f"{config.codebook_size}")
    print(f"parameters: encoder {count_parameters(model.encoder):,}, decoder {count_parameters(model.decoder):,}")
    print(f"saved {out}")
    return 0


# --- reconstruct -----------------------------------------------------------------------------------------------


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (what is saved, so what one sees)."""
    mse = float(np.mean((original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _output_names(paths: list[Path]) -> list[str]:
    """``stem.png`` per input, with ``-2``, ``-3``, ... added when two inputs share a stem."""
    names: list[str] = []
    for p in paths:
        name, n = f"{p.stem}.png", 1
        while name in names:
            n += 1
            name = f"{p.stem}-{n}.png"
        names.append(name)
    return names


def _load_images(paths: list[Path], transform: ImageTransform) -> list[tuple[Path, str, np.ndarray]]:
    """``(path, output name, (H, W, 3) uint8)`` for every readable image; the others are reported and skipped."""
    loaded = []
    for path, name in zip(paths, _output_names(paths)):
        try:
            loaded.append((path, name, transform(open_image(path))))
        except BadRecord as e:
            print(f"skipped {path}: {e}", file=sys.stderr)
    return loaded


def _reconstruct(args: argparse.Namespace) -> int:
    opts = from_args(ReconstructOptions, args)
    try:
        device = torch.device(opts.device)
    except RuntimeError as e:
        raise UserError(f"bad --device {opts.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available")
    # channels_last: oneDNN and cuDNN convolutions run 1.5-3x faster in NHWC than NCHW.
    model = DVAE.from_pretrained(args.model, device=device).eval().to(memory_format=torch.channels_last)
    if model.config.in_channels != 3:
        raise UserError(f"{args.model} takes {model.config.in_channels}-channel images; reconstruct handles RGB only")
    res, dtype = model.config.resolution, next(model.parameters()).dtype
    images = _load_images(list(args.images), ImageTransform(resolution=res, crop="center"))
    if not images:
        raise UserError("none of the given images could be read")
    args.out.mkdir(parents=True, exist_ok=True)
    scores = []
    for start in range(0, len(images), opts.batch_size):
        chunk = images[start:start + opts.batch_size]
        batch = to_float(np.stack([img for _, _, img in chunk])).to(device, dtype)  # (B, 3, H, W)
        recon = to_uint8(model.decode(model.encode(batch)))  # (B, H, W, 3)
        for (path, name, original), rec in zip(chunk, recon):
            Image.fromarray(np.concatenate([original, rec], axis=1)).save(args.out / name)
            scores.append(psnr(original, rec))
            print(f"{path}: PSNR {scores[-1]:.2f} dB -> {args.out / name}")
    print(f"{len(scores)} of {len(args.images)} images reconstructed at {res} px; "
          f"mean PSNR {sum(scores) / len(scores):.2f} dB")
    return 0
