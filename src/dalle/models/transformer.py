"""Stage 2: the prior p_ψ(y, z), a decoder-only sparse transformer over caption and image tokens (paper §2.2, B.1).

One sequence of ``text_len + grid_size²`` positions (the paper: 256 + 32×32 = 1280)::

    position   0 … text_len−1                         text_len    text_len+1 … text_len+N−1
    input      caption tokens, or the learned          begin-of-   codes 0 … N−2 (raster order)
               padding token of that position          image
    predicts   caption tokens 1 … text_len−1 (or pad)  code 0      codes 1 … N−1

* **Text**: token embedding + learned position embedding. Padded positions (``pad_mask`` True) take a **separate
  learned padding embedding per position** instead of a token (§2.2: no shared pad token, no attention mask); the
  ids there are ignored. The model predicts padding too: text logits cover the BPE vocabulary plus one "pad" class
  (the position is known, so per-position pad classes would carry no more information).
* **Image**: code embedding + learned **row** + **column** embedding of the cell the code came from (Figure 10).
  The code of cell ``i`` sits at position ``text_len + 1 + i`` and the begin-of-image token at ``text_len``, so every
  image position predicts the code at its own cell index and code 0 is predicted from the whole caption. (The first
  caption token is not predicted: nothing precedes it.)
* **Blocks**: pre-LayerNorm; attention masks by layer from :mod:`dalle.models.attention` (row / column / conv,
  appendix B.1); MLP of width ``mlp_ratio·dim`` with GELU. Linear layers carry no bias; LayerNorms do.
* **Heads**: one over text classes (vocabulary + pad), applied only at text positions, and one over the codebook,
  applied only at image positions: the paper's single output layer with its logits restricted to each kind.
* **Loss** (§2.2): cross-entropy on text and on image tokens, each averaged over its own tokens in the batch, then
  weighted 1/8 text : 7/8 image.

Architecture only: precision, activation checkpointing, compilation and sharding are applied from outside to
``model.blocks``; the model can be built on the ``meta`` device and initialised with :meth:`init_weights`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dalle.checkpoint import load_model_dir, save_model_dir
from dalle.config import check, from_dict, option, to_dict
from dalle.errors import UserError
from dalle.models.attention import IMPLS, Layout, attend, layer_kinds
from dalle.models.dvae import load_state_dict_checked

KIND = "prior"
TEXT_LOSS_WEIGHT = 1 / 8  # §2.2: text cross-entropy × 1/8, image × 7/8 (the image is what matters)


@dataclass
class PriorConfig:
    dim: int = option(256, "model width d_model (the paper: 3968)")
    n_layers: int = option(4, "transformer blocks (the paper: 64)")
    n_heads: int = option(8, "attention heads (the paper: 62)")
    head_dim: int = option(32, "width of each attention head (the paper: 64)")
    text_vocab_size: int = option(1000, "BPE vocabulary size of the text tokenizer (the paper: 16384)")
    text_len: int = option(32, "text positions per caption (the paper: 256)")
    codebook_size: int = option(512, "codes in the dVAE codebook (the paper: 8192)")
    grid_size: int = option(8, "side of the dVAE code grid (the paper: 32)")
    attn_schedule: str = option("paper", "attention kind per layer: 'paper' (row, column every 4th layer from the "
                                "2nd, conv last), 'dense', or a comma-separated list of dense/row/column/conv "
                                "repeated to n_layers")
    conv_kernel: int = option(11, "kernel side of the conv attention mask (the paper: 11)")
    mlp_ratio: int = option(4, "MLP width as a multiple of dim")
    dropout: float = option(0.0, "dropout on embeddings and residual branches")
    attn_impl: str = option("auto", "attention implementation, all exact: auto (gather where it saves compute, "
                            "matmul for short sequences on CPU, else dense), dense (masked SDPA), gather (blocks of "
                            "image rows), flex (FlexAttention), matmul (the score matrix with an fp32 softmax)",
                            choices=IMPLS)
    init_std: float = option(0.02, "standard deviation of the initial weights")

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "head_dim", "mlp_ratio", "grid_size"):
            check(getattr(self, name) >= 1, self, name, "must be at least 1")
        check(self.text_vocab_size >= 2, self, "text_vocab_size", "must be at least 2")
        check(self.codebook_size >= 2, self, "codebook_size", "must be at least 2")
        check(self.text_len >= 2, self, "text_len", "must be at least 2 (the first token is never predicted)")
        check(self.conv_kernel >= 1 and self.conv_kernel % 2 == 1, self, "conv_kernel", "must be odd and positive")
        check(0.0 <= self.dropout < 1.0, self, "dropout", "must be in [0, 1)")
        check(self.attn_impl in IMPLS, self, "attn_impl", f"must be one of {', '.join(IMPLS)}")
        check(self.init_std > 0, self, "init_std", "must be positive")
        try:
            layer_kinds(self.attn_schedule, self.n_layers)
        except UserError as e:
            check(False, self, "attn_schedule", str(e))

    @property
    def image_len(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def layout(self) -> Layout:
        return Layout(self.text_len, self.grid_size, self.conv_kernel)


_PAPER = dict(n_layers=64, head_dim=64, text_vocab_size=16384, text_len=256, codebook_size=8192, grid_size=32)
PRESETS: dict[str, PriorConfig] = {
    # Smallest model with every layer kind (row, column, conv): for unit tests.
    "test": PriorConfig(dim=64, n_layers=3, n_heads=4, head_dim=16, text_vocab_size=64, text_len=8,
                        codebook_size=32, grid_size=4, conv_kernel=3),
    # The peer benchmark's DALLE-pytorch config (dim 256, depth 4, 8 heads × 32, 32 text + 8×8 image tokens).
    "tiny": PriorConfig(dim=256, n_layers=4, n_heads=8, head_dim=32, text_vocab_size=1000, text_len=32,
                        codebook_size=512, grid_size=8, conv_kernel=5),
    # The PowerSGD table's sizes (§2.5); "effective" parameters 12·n_layers·dim² = 2.8e9, 5.6e9, 12.0e9.
    "paper-2.8b": PriorConfig(dim=1920, n_heads=30, **_PAPER),
    "paper-5.6b": PriorConfig(dim=2688, n_heads=42, **_PAPER),
    "paper-12b": PriorConfig(dim=3968, n_heads=62, **_PAPER),
}


def preset(name: str, **overrides: Any) -> PriorConfig:
    """A fresh copy of a named configuration, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise UserError(f"unknown prior preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class PriorLogits(NamedTuple):
    text: torch.Tensor  # (B, text_len − 1, text_vocab_size + 1): position j predicts caption token j + 1 or "pad"
    image: torch.Tensor  # (B, grid_size², codebook_size): position i predicts the code of cell i


class PriorLoss(NamedTuple):
    total: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection and the mask of its layer ``kind``."""

    def __init__(self, config: PriorConfig, kind: str):
        super().__init__()
        self.kind, self.layout, self.impl = kind, config.layout, config.attn_impl
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        inner = config.n_heads * config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim)  # (B, L, 3, H, D)
        y = attend(qkv, self.kind, self.layout, self.impl)  # (B, L, H, D)
        return self.proj(y.reshape(b, length, -1))  # (B, L, dim)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n_heads={self.n_heads}, head_dim={self.head_dim}, impl={self.impl}"


class MLP(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.fc = nn.Linear(config.dim, config.mlp_ratio * config.dim, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: PriorConfig, kind: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config, kind)
        self.ln_2 = nn.LayerNorm(config.dim)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class PriorTransformer(nn.Module):
    """The prior over ``[caption | image codes]``; see the module docstring for the sequence layout."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        d, t, g = config.dim, config.text_len, config.grid_size
        self.text_emb = nn.Embedding(config.text_vocab_size, d)
        self.text_pad = nn.Parameter(torch.empty(t, d))  # §2.2: one learned padding token per text position
        self.text_pos = nn.Parameter(torch.empty(t, d))
        self.image_emb = nn.Embedding(config.codebook_size, d)
        self.image_boi = nn.Parameter(torch.empty(d))
        self.image_row = nn.Parameter(torch.empty(g, d))
        self.image_col = nn.Parameter(torch.empty(g, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, kind) for kind in layer_kinds(config.attn_schedule,
                                                                                  config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, config.text_vocab_size + 1, bias=False)  # last class: "pad"
        self.image_head = nn.Linear(d, config.codebook_size, bias=False)
        self.init_weights()

    @property
    def pad_class(self) -> int:
        """Text target class of a padded position."""
        return self.config.text_vocab_size

    def init_weights(self) -> None:
        """(Re-)initialise every parameter, e.g. after building on the ``meta`` device and ``to_empty``.

        Normal(0, init_std) everywhere; the projections that write into the residual stream get
        init_std / sqrt(2·n_layers) so the stream's variance does not grow with depth (GPT-2).
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.config.n_layers))
        for p in (self.text_pad, self.text_pos, self.image_boi, self.image_row, self.image_col):
            nn.init.normal_(p, std=std)

    def weight_decay_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decayed, not decayed) parameters: the paper (appendix B.2) decays weights but not gains, biases or
        embeddings, so only the Linear weights (projections, MLPs, output heads) are in the first list."""
        decay = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        chosen = {id(p) for p in decay}
        return decay, [p for p in self.parameters() if id(p) not in chosen]

    def set_attn_impl(self, impl: str) -> None:
        """Switch every layer's attention implementation (all are exact; only speed differs)."""
        if impl not in IMPLS:
            raise UserError(f"unknown attention implementation {impl!r}; choose one of: {', '.join(IMPLS)}")
        self.config.attn_impl = impl
        for block in self.blocks:
            block.attn.impl = impl

    # ------------------------------------------------------------------------------------------- embeddings

    def embed_text(self, text_ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """``(B, text_len)`` ids and pad mask → ``(B, text_len, dim)``; padded positions use their own embedding."""
        tokens = self.text_emb(text_ids.masked_fill(pad_mask, 0))  # (B, T, dim); ids under padding are ignored
        return torch.where(pad_mask.unsqueeze(-1), self.text_pad, tokens) + self.text_pos  # (B, T, dim)

    def embed_image(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, n)`` codes of cells ``0 … n−1`` (``n < grid_size²``) → ``(B, n + 1, dim)``: begin-of-image first."""
        g = self.config.grid_size
        cells = torch.arange(codes.shape[1], device=codes.device)  # (n,)
        x = self.image_emb(codes) + self.image_row[cells // g] + self.image_col[cells % g]  # (B, n, dim)
        boi = self.image_boi.expand(codes.shape[0], 1, -1)  # (B, 1, dim)
        return torch.cat([boi, x], dim=1)  # (B, n + 1, dim)

    # ------------------------------------------------------------------------------------------------ model

    def hidden_states(self, text_ids: torch.Tensor, pad_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Final (normalised) states of ``[caption | begin-of-image | codes]``: ``(B, text_len + n + 1, dim)``.

        ``codes`` is ``(B, n)`` with ``n < grid_size²`` known codes in raster order (``n = 0`` at the start of
        sampling); the state at position ``text_len + i`` predicts the code of cell ``i``.
        """
        self._check_text(text_ids, pad_mask)
        if codes.dim() != 2 or codes.shape[0] != text_ids.shape[0] or codes.shape[1] >= self.config.image_len:
            raise UserError(f"image code prefix must be (B, n) with n < {self.config.image_len}, got "
                            f"{tuple(codes.shape)}")
        x = torch.cat([self.embed_text(text_ids, pad_mask), self.embed_image(codes)], dim=1)  # (B, L, dim)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)  # (B, L, dim)

    def forward(self, text_ids: torch.Tensor, pad_mask: torch.Tensor, image_codes: torch.Tensor) -> PriorLogits:
        """Teacher-forced logits: ids and pad mask ``(B, text_len)``, codes ``(B, grid_size, grid_size)``."""
        g, t = self.config.grid_size, self.config.text_len
        if image_codes.shape[1:] != (g, g) or image_codes.is_floating_point():
            raise UserError(f"image codes must be an integer tensor (B, {g}, {g}), got {tuple(image_codes.shape)} "
                            f"{image_codes.dtype}")
        h = self.hidden_states(text_ids, pad_mask, image_codes.flatten(1)[:, :-1])  # (B, T + N, dim)
        return PriorLogits(text=self.text_head(h[:, : t - 1]), image=self.image_head(h[:, t:]))

    def loss(self, text_ids: torch.Tensor, pad_mask: torch.Tensor, image_codes: torch.Tensor,
             text_weight: float = TEXT_LOSS_WEIGHT) -> PriorLoss:
        """The training objective of §2.2 on one batch; see :func:`prior_loss`."""
        return prior_loss(self(text_ids, pad_mask, image_codes), text_ids, pad_mask, image_codes, text_weight)

    def _check_text(self, text_ids: torch.Tensor, pad_mask: torch.Tensor) -> None:
        t = self.config.text_len
        if text_ids.dim() != 2 or text_ids.shape[1] != t or text_ids.is_floating_point():
            raise UserError(f"text ids must be an integer tensor (B, {t}) (the model's text_len is {t}), got "
                            f"{tuple(text_ids.shape)} {text_ids.dtype}")
        if pad_mask.shape != text_ids.shape or pad_mask.dtype != torch.bool:
            raise UserError(f"pad_mask must be a bool tensor shaped like the text ids {tuple(text_ids.shape)}, got "
                            f"{tuple(pad_mask.shape)} {pad_mask.dtype}")

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (``{"kind": "prior", ...}``) and ``model.safetensors`` to the directory ``path``."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        save_model_dir(path, {"kind": KIND, **to_dict(self.config)}, state)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> PriorTransformer:
        raw, state = load_model_dir(path, device)
        kind = raw.pop("kind", None)
        if kind != KIND:
            raise UserError(f"{path} holds a {kind!r} model, not a {KIND!r} model")
        with torch.device("meta"):
            model = cls(from_dict(PriorConfig, raw))
        load_state_dict_checked(model, state, str(path))
        return model


def prior_loss(logits: PriorLogits, text_ids: torch.Tensor, pad_mask: torch.Tensor, image_codes: torch.Tensor,
               text_weight: float = TEXT_LOSS_WEIGHT) -> PriorLoss:
    """Cross-entropy on text and on image tokens, each averaged over its own tokens, weighted ``text_weight`` and
    ``1 − text_weight`` (§2.2: 1/8 and 7/8). Padded caption positions are targets too, of the "pad" class."""
    if not 0.0 <= text_weight <= 1.0:
        raise UserError(f"text_weight must be in [0, 1], got {text_weight}")
    pad_class = logits.text.shape[-1] - 1
    text_targets = text_ids[:, 1:].masked_fill(pad_mask[:, 1:], pad_class)  # (B, T − 1)
    text_loss = F.cross_entropy(logits.text.flatten(0, 1), text_targets.flatten())
    image_loss = F.cross_entropy(logits.image.flatten(0, 1), image_codes.flatten())
    return PriorLoss(text_weight * text_loss + (1 - text_weight) * image_loss, text_loss, image_loss)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
