"""Stage 1: the discrete VAE that turns a 256×256 image into a 32×32 grid of codes from a codebook of 8192 (paper §2.1).

The architecture is the one OpenAI released (``DALL-E`` package; paper §2.1 and appendix A.1):

* **encoder** — 7×7 input conv → ``n_groups`` groups of ``n_blk_per_group`` resblocks with widths
  ``n_hid·(1, 2, 4, 8)``, a 2×2 max-pool between groups → ReLU + 1×1 conv to ``codebook_size`` logits;
* **decoder** — 1×1 conv from the (one-hot or relaxed) codes to ``n_init`` channels → the groups in reverse with
  nearest ×2 up-sampling between them → ReLU + 1×1 conv to the statistics of the likelihood: with the paper's
  ``logit-laplace``, 6 channels, μ and ln b for each colour channel; with ``gaussian`` (``DVAEConfig.likelihood``, our
  addition for small runs on flat-background images), 3 channels, the mean pixel on a [-1, 1] scale.

Module and parameter names (``blocks.group_1.block_2.res_path.conv_3.w``) are OpenAI's, so their state dicts load
1:1 (see :mod:`dalle.models.convert`). The model holds architecture only: precision, memory format, activation
checkpointing and compilation are applied from outside, and nothing here casts a tensor to another dtype. Every
layer works in either memory format; ``model.to(memory_format=torch.channels_last)`` (with NHWC inputs) makes the
convolutions about 1.5-3x faster on CPU (tiny-64, batch 64, one thread).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dalle.checkpoint import load_model_dir, save_model_dir
from dalle.config import check, from_dict, option, to_dict
from dalle.data.transforms import map_pixels, signed_to_unit, unmap_pixels
from dalle.errors import UserError

KIND = "dvae"
WIDTH_MULTIPLIERS = (1, 2, 4, 8)  # group widths as multiples of n_hid, in encoder order
LIKELIHOODS = ("logit-laplace", "gaussian")
ENCODER_KERNELS = (3, 3, 3, 1)    # res_path conv sizes; the decoder mirrors them
DECODER_KERNELS = (1, 3, 3, 3)


@dataclass
class DVAEConfig:
    resolution: int = option(256, "input side in pixels")
    n_hid: int = option(256, "encoder base width; the groups use n_hid * (1, 2, 4, 8)")
    n_blk_per_group: int = option(2, "resblocks per group")
    n_groups: int = option(4, "groups of resblocks; images are down-sampled 2 ** (n_groups - 1) times per side")
    codebook_size: int = option(8192, "number of codes K in the visual codebook")
    n_init: int = option(128, "width of the decoder's first 1x1 conv from the K code channels")
    in_channels: int = option(3, "image channels")
    likelihood: str = option("logit-laplace", "what the decoder's output parameterises: logit-laplace = the paper's "
                             "(μ and ln b per channel, OpenAI's decoder); gaussian = the mean pixel of a Gaussian of "
                             "fixed σ (learns colours far faster on flat backgrounds, see bench/RESULTS.md)",
                             choices=LIKELIHOODS)

    def __post_init__(self) -> None:
        check(1 <= self.n_groups <= len(WIDTH_MULTIPLIERS), self, "n_groups",
              f"must be between 1 and {len(WIDTH_MULTIPLIERS)}")
        check(self.n_hid >= 4 and self.n_hid % 4 == 0, self, "n_hid",
              "must be a positive multiple of 4 (resblocks narrow to a quarter of their width)")
        check(self.n_blk_per_group >= 1, self, "n_blk_per_group", "must be at least 1")
        check(self.codebook_size >= 2, self, "codebook_size", "must be at least 2")
        check(self.n_init >= 1, self, "n_init", "must be at least 1")
        check(self.in_channels >= 1, self, "in_channels", "must be at least 1")
        check(self.likelihood in LIKELIHOODS, self, "likelihood", f"must be one of {', '.join(LIKELIHOODS)}")
        factor = self.downsample_factor
        check(self.resolution >= factor and self.resolution % factor == 0, self, "resolution",
              f"must be a positive multiple of the down-sampling factor {factor} (2 ** (n_groups - 1))")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.n_groups - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid: 32 for the paper's 256-pixel images."""
        return self.resolution // self.downsample_factor

    @property
    def widths(self) -> tuple[int, ...]:
        """Encoder group widths (the decoder uses them reversed)."""
        return tuple(self.n_hid * m for m in WIDTH_MULTIPLIERS[: self.n_groups])

    @property
    def stats_channels(self) -> int:
        """Channels of the decoder's output: μ and ln b per image channel (logit-Laplace), or the mean (Gaussian)."""
        return 2 * self.in_channels if self.likelihood == "logit-laplace" else self.in_channels

    @property
    def n_layers(self) -> int:
        """Resblocks per network, which sets post_gain = 1 / n_layers ** 2."""
        return self.n_groups * self.n_blk_per_group


PRESETS: dict[str, DVAEConfig] = {
    # Paper §2.1: 256×256 → 32×32 codes, K = 8192; encoder 53.8M and decoder 43.8M parameters.
    "paper": DVAEConfig(),
    # CPU-sized models with the same structure: 64 px with 3 max-pools, and 32 px with 2 (both give an 8×8 grid). Their
    # decoders are Gaussian: in runs of a few thousand updates on flat-background images the logit-Laplace's learned
    # per-pixel scale sharpened the background and lost the objects' colours (bench/RESULTS.md, "The cause: the
    # logit-Laplace's learned scale").
    "tiny-64": DVAEConfig(resolution=64, n_hid=32, n_blk_per_group=1, n_groups=4, codebook_size=512, n_init=32,
                          likelihood="gaussian"),
    "tiny-32": DVAEConfig(resolution=32, n_hid=32, n_blk_per_group=1, n_groups=3, codebook_size=512, n_init=32,
                          likelihood="gaussian"),
    # 64 px with 2 max-pools: a 16×16 grid, so a small shapes object spans about three cells rather than one and a
    # half (about six at the paper's 256 px / 32×32); it keeps twice tiny-64's share of shapes at equal updates
    # (bench/RESULTS.md, "The code grid, and bf16 on CPU").
    "tiny-64-16": DVAEConfig(resolution=64, n_hid=32, n_blk_per_group=1, n_groups=3, codebook_size=512, n_init=32,
                             likelihood="gaussian"),
    # 48 px with 2 max-pools: a 12×12 grid of 4-px cells. `make demo`'s: in the same 3,000 updates as tiny-64 and 30%
    # less time it keeps about twice its share of shapes, and the prior's 144 image tokens still train within the
    # demo's budget (bench/RESULTS.md, "`make demo` at 48 px").
    "tiny-48": DVAEConfig(resolution=48, n_hid=32, n_blk_per_group=1, n_groups=3, codebook_size=512, n_init=32,
                          likelihood="gaussian"),
}


def preset(name: str) -> DVAEConfig:
    """A fresh copy of a named configuration."""
    if name not in PRESETS:
        raise UserError(f"unknown dVAE preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


class Conv2d(nn.Module):
    """A same-padded convolution with parameters named ``w`` and ``b``, as in OpenAI's checkpoints."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int):
        super().__init__()
        self.n_in, self.n_out, self.kernel_size = n_in, n_out, kernel_size
        self.w = nn.Parameter(torch.empty(n_out, n_in, kernel_size, kernel_size))
        self.b = nn.Parameter(torch.empty(n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Fan-in scaled normal and zero bias: OpenAI's initialisation.
        nn.init.normal_(self.w, std=1 / math.sqrt(self.n_in * self.kernel_size**2))
        nn.init.zeros_(self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kernel_size - 1) // 2)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kernel_size={self.kernel_size}"


class ResBlock(nn.Module):
    """``id_path(x) + post_gain · res_path(x)``; res_path is four convs, each after a ReLU, through width n_out / 4.

    post_gain = 1 / n_layers² scales every residual branch down so the whole network starts close to the identity
    (paper appendix A.1), which lets the deep stack train without normalisation layers.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, ...]):
        super().__init__()
        n_mid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_mid, n_mid, n_mid, n_out)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, k in enumerate(kernels, 1):
            layers[f"relu_{i}"] = nn.ReLU()
            layers[f"conv_{i}"] = Conv2d(widths[i - 1], widths[i], k)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _check_input(x: torch.Tensor, what: str, channels: int, size: int, dtype: torch.dtype) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: expected a 4-d (B, C, H, W) tensor, got {got}")
    if x.shape[1] != channels:
        raise ValueError(f"{what}: expected {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"{what}: expected spatial size {size}x{size}, got {x.shape[2]}x{x.shape[3]}")
    if x.dtype != dtype:
        raise ValueError(f"{what}: expected dtype {dtype} (the model's), got {x.dtype}; "
                         "cast the input or run under torch.autocast")


class Encoder(nn.Module):
    """``(B, C, H, W)`` pixels already mapped by :func:`map_pixels` → ``(B, K, g, g)`` logits over the codebook."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        widths = config.widths
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=Conv2d(config.in_channels, widths[0], 7))
        n_in = widths[0]
        for g, width in enumerate(widths, 1):
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(1, config.n_blk_per_group + 1):
                group[f"block_{i}"] = ResBlock(n_in, width, config.n_layers, ENCODER_KERNELS)
                n_in = width
            if g < len(widths):
                group["pool"] = nn.MaxPool2d(kernel_size=2)
            blocks[f"group_{g}"] = nn.Sequential(group)
        # Paper: the encoder ends with a 1×1 conv to the K logits.
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(n_in, config.codebook_size, 1)))
        self.blocks = nn.Sequential(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        _check_input(x, "Encoder", c.in_channels, c.resolution, self.blocks.input.w.dtype)
        return self.blocks(x)  # (B, K, g, g)


class Decoder(nn.Module):
    """``(B, K, g, g)`` one-hot or relaxed codes → ``(B, S, H, W)`` statistics (``S = config.stats_channels``):
    logit-Laplace ``[:, :C]`` = μ, ``[:, C:]`` = ln b; Gaussian: the mean on a [-1, 1] scale."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        widths = config.widths[::-1]
        # Paper: a 1×1 conv from the K code channels to 128 starts the decoder.
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=Conv2d(config.codebook_size, config.n_init, 1))
        n_in = config.n_init
        for g, width in enumerate(widths, 1):
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(1, config.n_blk_per_group + 1):
                group[f"block_{i}"] = ResBlock(n_in, width, config.n_layers, DECODER_KERNELS)
                n_in = width
            if g < len(widths):
                group["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
            blocks[f"group_{g}"] = nn.Sequential(group)
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(n_in, config.stats_channels, 1)))
        self.blocks = nn.Sequential(blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        _check_input(z, "Decoder", c.codebook_size, c.grid_size, self.blocks.input.w.dtype)
        return self.blocks(z)  # (B, S, H, W)

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Same as ``forward(one_hot(codes))`` without building the ``(B, K, g, g)`` one-hot tensor.

        A 1×1 conv of a one-hot vector picks one column of its weight, so the input conv is an embedding lookup;
        at the paper's size this saves 32 MB and 1 GMAC per image.
        """
        c = self.config
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (c.grid_size, c.grid_size):
            raise ValueError(f"Decoder: expected (B, {c.grid_size}, {c.grid_size}) codes, got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"Decoder: expected integer codes, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= c.codebook_size):
            raise ValueError(f"Decoder: codes must lie in [0, {c.codebook_size}), "
                             f"got values in [{int(codes.min())}, {int(codes.max())}]")
        conv = self.blocks.input
        table = conv.w[:, :, 0, 0].t()  # (K, n_init)
        h = F.embedding(codes.long(), table) + conv.b  # (B, g, g, n_init)
        # Left in NHWC (channels_last) memory: the convolutions that follow are faster in it on CPU and GPU.
        h = h.permute(0, 3, 1, 2)  # (B, n_init, g, g)
        for name, module in self.blocks.named_children():
            if name != "input":
                h = module(h)
        return h  # (B, S, H, W)


class DVAE(nn.Module):
    """The image tokenizer: :meth:`encode` images to codes and :meth:`decode` codes to images."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def init_weights(self) -> None:
        """(Re-)initialise every parameter, e.g. after building on the meta device and ``to_empty``."""
        for module in self.modules():
            if isinstance(module, Conv2d):
                module.reset_parameters()

    # Codes are discrete, so neither direction has a useful gradient: both run without autograd.
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` floats in [0, 1] → ``(B, g, g)`` int64 codes, the argmax of the logits (paper §2.2)."""
        logits = self.encoder(map_pixels(images))  # (B, K, g, g)
        return logits.argmax(dim=1)  # (B, g, g)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, g, g)`` integer codes → ``(B, C, H, W)`` images in [0, 1]."""
        return self.stats_to_image(self.decoder.forward_codes(codes))

    def stats_to_image(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder statistics → images in [0, 1]: ``unmap(sigmoid(μ))`` of the logit-Laplace (paper appendix A.3), or
        the Gaussian's mean moved from [-1, 1] to [0, 1]; both clamped."""
        mu = stats[:, : self.config.in_channels]  # (B, C, H, W)
        if self.config.likelihood == "gaussian":
            return signed_to_unit(mu).clamp(0, 1)
        return unmap_pixels(torch.sigmoid(mu))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (``{"kind": "dvae", ...}``) and ``model.safetensors`` to the directory ``path``."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        save_model_dir(path, {"kind": KIND, **to_dict(self.config)}, state)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> DVAE:
        raw, state = load_model_dir(path, device)
        kind = raw.pop("kind", None)
        if kind != KIND:
            raise UserError(f"{path} holds a {kind!r} model, not a {KIND!r} model")
        config = from_dict(DVAEConfig, raw)
        with torch.device("meta"):
            model = cls(config)
        load_state_dict_checked(model, state, str(path))
        return model


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, assign=True)`` with a :class:`UserError` naming the first mismatched keys."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"weights in {source} do not fit the model: {'; '.join(problems[:3])}{more}")
    model.load_state_dict(state, assign=True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
