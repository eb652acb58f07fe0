"""The contrastive reranker: a small CLIP-style image–text model trained here (paper, "Sampling and evaluation").

The paper draws N samples per caption and keeps those a pretrained contrastive model scores highest. No CLIP weights
can be fetched offline, so we train our own with CLIP's recipe (Radford et al. 2021) at CPU scale:

* **image encoder** — a plain-torch ResNet: a patchify stem (a ``patch × patch`` conv with that stride, as in
  ConvNeXt: the cheapest way down from full resolution on a CPU), then ``image_stages`` stages of ``image_depth``
  residual blocks (GroupNorm, so nothing depends on the batch), a stride-2 conv doubling the width between stages.
  The final ``grid × grid`` feature map is flattened, not average-pooled, before the projection: captions name
  positions ("in the top left", "above"), so where a feature is must survive pooling;
* **text encoder** — a pre-LN transformer over the BPE ids of :class:`~dalle.tokenizers.text.TextTokenizer`, with
  causal or full attention. Padded positions (``pad_mask`` True) are never attended to and never pooled, so the ids
  stored there do not matter. Pooling is CLIP's end-of-text pooling (``"eot"``: the last real token, which sees the
  whole caption under causal attention) or a masked mean;
* both embeddings are L2-normalised; ``score = exp(logit_scale) · cos`` with the learned temperature initialised at
  ln(1/0.07) and clamped at ln 100, as in CLIP.

:class:`Reranker` is the usable whole: model + tokenizer + preprocessing (resizing to the model's resolution), with
:meth:`Reranker.score` and :meth:`Reranker.rerank`. A model directory holds ``config.json`` (``kind: reranker``),
``model.safetensors`` and the tokenizer's two files, so it loads standalone. :class:`Scorer` is what reranking and
evaluation use; :func:`load_reranker` gives one from our model directory or from a user's OpenAI CLIP / open_clip
checkpoint (:mod:`dalle.models.clip`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle.checkpoint import CONFIG, load_model_dir, save_model_dir
from dalle.config import check, from_dict, option, to_dict
from dalle.data.transforms import to_float
from dalle.errors import UserError
from dalle.models.dvae import load_state_dict_checked
from dalle.tokenizers.text import CONFIG_FILE, TOKENIZER_FILE, TextTokenizer

KIND = "reranker"
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP: temperature 0.07 at the start
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP: the scale is clamped at 100 to keep training stable
ATTENTIONS = ("causal", "full")
POOLINGS = ("eot", "mean")


@dataclass
class RerankerConfig:
    resolution: int = option(64, "input side in pixels (other sizes are resized by Reranker)")
    image_patch: int = option(4, "side and stride of the image stem's conv (patchify)")
    image_width: int = option(16, "channels of the first image stage; each later stage doubles them")
    image_stages: int = option(3, "image stages; each after the first halves the side (the final grid is "
                               "resolution / (image_patch * 2 ** (image_stages - 1)))")
    image_depth: int = option(1, "residual blocks per image stage")
    vocab_size: int = option(16_384, "text vocabulary size (set from the tokenizer)")
    text_len: int = option(64, "text positions the text encoder reads; longer captions are cut")
    text_dim: int = option(128, "width of the text transformer")
    text_n_layers: int = option(2, "text transformer blocks")
    text_n_heads: int = option(4, "attention heads per text block")
    text_attention: str = option("causal", "text attention: causal (CLIP) or full", choices=ATTENTIONS)
    text_pooling: str = option("eot", "text pooling: eot (the last real token, CLIP) or mean (masked mean)",
                               choices=POOLINGS)
    embed_dim: int = option(128, "dimension of the joint embedding space")

    def __post_init__(self) -> None:
        for name in ("image_patch", "image_width", "image_stages", "image_depth", "text_len", "text_dim",
                     "text_n_layers", "text_n_heads", "embed_dim"):
            check(getattr(self, name) >= 1, self, name, "must be at least 1")
        check(self.image_width % 4 == 0, self, "image_width", "must be a multiple of 4 (GroupNorm groups)")
        check(self.vocab_size >= 2, self, "vocab_size", "must be at least 2")
        factor = self.downsample_factor
        check(self.resolution >= factor and self.resolution % factor == 0, self, "resolution",
              f"must be a positive multiple of image_patch * 2 ** (image_stages - 1) = {factor}")
        check(self.text_dim % self.text_n_heads == 0, self, "text_dim", "must be divisible by text_n_heads")
        check(self.text_attention in ATTENTIONS, self, "text_attention", f"must be one of {', '.join(ATTENTIONS)}")
        check(self.text_pooling in POOLINGS, self, "text_pooling", f"must be one of {', '.join(POOLINGS)}")

    @property
    def downsample_factor(self) -> int:
        return self.image_patch * 2 ** (self.image_stages - 1)

    @property
    def grid_size(self) -> int:
        """Side of the image encoder's final feature map."""
        return self.resolution // self.downsample_factor

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each image stage."""
        return tuple(self.image_width * 2**i for i in range(self.image_stages))


PRESETS: dict[str, RerankerConfig] = {
    # CPU: 64 px → 16×16 patches → 4×4 grid, widths 16/32/64, ~0.7M parameters; retrieves shapes captions after a
    # few minutes on 2 cores (twice the width learned no better per step in our runs and cost 1.6x the time).
    "tiny": RerankerConfig(),
    # Larger: 2×2 patches, 4 stages of 2 blocks (widths 32 to 256), a 4-layer 256-wide text transformer; wants a GPU.
    "base": RerankerConfig(image_patch=2, image_width=32, image_stages=4, image_depth=2, text_dim=256,
                           text_n_layers=4, text_n_heads=8, embed_dim=256),
}


def preset(name: str, **overrides: object) -> RerankerConfig:
    if name not in PRESETS:
        raise UserError(f"unknown reranker preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# --- image encoder -------------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm_1, self.conv_1 = _norm(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm_2, self.conv_2 = _norm(channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_1(F.gelu(self.norm_1(x)))
        return x + self.conv_2(F.gelu(self.norm_2(h)))


class ImageEncoder(nn.Module):
    """``(B, 3, R, R)`` pixels in [0, 1] → ``(B, embed_dim)`` (not normalised)."""

    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        p = config.image_patch
        self.stem = nn.Conv2d(3, config.image_width, p, stride=p)
        stages, width = [], config.image_width
        for out in config.widths:
            blocks = [] if out == width else [nn.Sequential(_norm(width), nn.GELU(),
                                                            nn.Conv2d(width, out, 3, stride=2, padding=1))]
            blocks += [ResBlock(out) for _ in range(config.image_depth)]
            stages.append(nn.Sequential(*blocks))
            width = out
        self.stages = nn.Sequential(*stages)
        self.norm = _norm(width)
        self.proj = nn.Linear(width * config.grid_size**2, config.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (c.resolution, c.resolution):
            raise ValueError(f"expected images of shape (B, 3, {c.resolution}, {c.resolution}), got "
                             f"{tuple(images.shape)}; Reranker resizes other sizes")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got {images.dtype}")
        h = self.stages(self.stem(images * 2 - 1))  # (B, C, g, g)
        h = F.gelu(self.norm(h)).flatten(1)  # (B, C·g·g): positions kept, see the module doc
        return self.proj(h)  # (B, embed_dim)


# --- text encoder --------------------------------------------------------------------------------------------------


class TextBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, nh, L, hs)
        x = x + self.out(h.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """``ids (B, L)`` + ``pad_mask (B, L)`` (True = padding), L ≤ text_len → ``(B, embed_dim)`` (not normalised)."""

    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_dim)
        self.position_embedding = nn.Parameter(torch.randn(config.text_len, config.text_dim) * 0.01)
        self.blocks = nn.ModuleList(TextBlock(config.text_dim, config.text_n_heads)
                                    for _ in range(config.text_n_layers))
        self.ln_final = nn.LayerNorm(config.text_dim)
        self.proj = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def _check(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> None:
        c = self.config
        if ids.ndim != 2 or pad_mask.shape != ids.shape or pad_mask.dtype != torch.bool:
            raise ValueError(f"expected ids (B, L) and a bool pad_mask of the same shape, got {tuple(ids.shape)} "
                             f"and {tuple(pad_mask.shape)} {pad_mask.dtype}")
        if ids.shape[1] > c.text_len:
            raise ValueError(f"captions of {ids.shape[1]} positions exceed text_len {c.text_len}; cut them first")
        real = ids[~pad_mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= c.vocab_size):
            raise ValueError(f"token ids must be in [0, {c.vocab_size}), got {int(real.min())}..{int(real.max())}")

    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        self._check(ids, pad_mask)
        # Trailing all-padding columns change nothing (never attended, never pooled): drop them, since captions are
        # usually far shorter than text_len.
        used = int((~pad_mask).any(0).nonzero().max()) + 1 if (~pad_mask).any() else 1
        ids, pad_mask = ids[:, :used], pad_mask[:, :used]
        b, n = ids.shape
        x = self.token_embedding(ids.masked_fill(pad_mask, 0)) + self.position_embedding[:n]  # (B, L, D)
        allowed = ~pad_mask[:, None, None, :]  # (B, 1, 1, L): queries never look at padding
        if self.config.text_attention == "causal":
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()  # (B, 1, L, L)
        # Each position may attend to itself, so a padded query never has an empty row (NaN); real queries never
        # see padded keys either way.
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=ids.device)
        for block in self.blocks:
            x = block(x, allowed)
        x = self.ln_final(x)  # (B, L, D)
        return self.proj(self._pool(x, pad_mask))  # (B, embed_dim)

    def _pool(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        real = (~pad_mask).to(x.dtype)  # (B, L)
        if self.config.text_pooling == "mean":
            return (x * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        positions = torch.arange(x.shape[1], device=x.device)  # (L,)
        last = torch.where(pad_mask, -1, positions).amax(1).clamp(min=0)  # (B,) index of the last real token
        return x[torch.arange(x.shape[0], device=x.device), last]  # (B, D)


# --- the contrastive model -----------------------------------------------------------------------------------------


class ContrastiveModel(nn.Module):
    """Image and text encoders into one normalised embedding space, plus the learned temperature."""

    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        self.image = ImageEncoder(config)
        self.text = TextEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, R, R)`` floats in [0, 1] → ``(B, embed_dim)`` unit vectors."""
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """``ids (B, L)``, ``pad_mask (B, L)`` → ``(B, embed_dim)`` unit vectors."""
        return F.normalize(self.text(ids, pad_mask), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 (CLIP)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, images: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, scale): what the contrastive loss takes."""
        return self.encode_image(images), self.encode_text(ids, pad_mask), self.scale()

    def score(self, images: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` scaled cosine similarity of each image with its own caption."""
        image_emb, text_emb, scale = self(images, ids, pad_mask)
        return scale * (image_emb * text_emb).sum(-1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- model + tokenizer + preprocessing -----------------------------------------------------------------------------


class Scorer:
    """Scores (image, caption) pairs with a contrastive model: ``scale · cos(image embedding, caption embedding)``.

    Subclasses give the model's ``resolution``, ``device``, ``scale``, caption ``normalize``-ation, the image
    ``preprocess``-ing and the two encoders of already prepared inputs; the batching, scoring and reranking are here.
    :class:`Reranker` (ours) and :class:`dalle.models.clip.ClipReranker` (a user's CLIP checkpoint) are the two.
    """

    name = "reranker"
    model: nn.Module
    resolution: int
    embed_dim: int
    device: torch.device
    scale: float

    def normalize(self, caption: str) -> str:
        """The caption as the model reads it: captions equal after this are the same text to the model."""
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` floats in [0, 1] or ``(B, H, W, 3)`` uint8 → the image encoder's input on the device."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images → ``(B, E)`` unit embeddings."""
        raise NotImplementedError

    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions → ``(B, E)`` unit embeddings."""
        raise NotImplementedError

    def resize(self, images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
        """Images as floats in [0, 1], ``(B, 3, size, size)`` on the model's device and dtype."""
        x = to_float(images) if images.dtype == torch.uint8 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) float or (B, H, W, 3) uint8 images, got {tuple(images.shape)}")
        param = next(self.model.parameters())
        x = x.to(param.device, param.dtype)
        if tuple(x.shape[2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False).clamp(0, 1)
        return x

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``(N, D)`` unit image embeddings, computed ``batch_size`` at a time."""
        chunks = [self.encode_images(self.preprocess(images[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
        return torch.cat(chunks).float()

    @torch.no_grad()
    def embed_captions(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """``(N, D)`` unit caption embeddings."""
        chunks = [self.encode_captions(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
        return torch.cat(chunks).float()

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """``(B,)`` scores of image i with caption i (scaled cosine; higher = better match)."""
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        image_emb, text_emb = self.embed_images(images), self.embed_captions(captions)
        return self.scale * (image_emb * text_emb).sum(-1)

    @torch.no_grad()
    def rerank(self, images: torch.Tensor, caption: str, keep: int | None = None) -> torch.Tensor:
        """Indices of the ``keep`` (default: all) candidate images that best match ``caption``, best first."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be one str, got {type(caption).__name__}")
        keep = len(images) if keep is None else keep
        if not 1 <= keep <= len(images):
            raise ValueError(f"keep must be in [1, {len(images)}], got {keep}")
        sims = self.embed_images(images) @ self.embed_captions([caption])[0]  # (N,)
        return sims.topk(keep).indices.cpu()


class Reranker(Scorer):
    """Our contrastive model with its BPE tokenizer: what `dalle reranker train` writes and sampling uses."""

    name = "Reranker"

    def __init__(self, model: ContrastiveModel, tokenizer: TextTokenizer):
        if tokenizer.vocab_size != model.config.vocab_size:
            raise UserError(f"the text tokenizer has {tokenizer.vocab_size} tokens but the reranker was built for "
                            f"{model.config.vocab_size}: they do not belong together")
        self.model, self.tokenizer = model, tokenizer

    @property
    def config(self) -> RerankerConfig:
        return self.model.config

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def scale(self) -> float:
        """The learned exp(logit_scale) that multiplies cosine similarities into scores."""
        with torch.no_grad():
            return float(self.model.scale())

    def normalize(self, caption: str) -> str:
        return self.tokenizer.normalize(caption)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → ``ids, pad_mask (B, L)`` on the model's device, cut to the model's ``text_len``."""
        ids, pad_mask = self.tokenizer.encode_batch(list(captions))  # (B, tokenizer text_len)
        n = self.config.text_len
        return ids[:, :n].to(self.device), pad_mask[:, :n].to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.resize(images, self.resolution)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(*self.tokenize(captions))

    # --- files -----------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """``config.json`` (``kind: reranker``), ``model.safetensors`` and the tokenizer files, in one directory."""
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save(tmp)
            files = {name: (Path(tmp) / name).read_text() for name in (TOKENIZER_FILE, CONFIG_FILE)}
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return save_model_dir(path, {"kind": KIND, **to_dict(self.config)}, state, extra_files=files)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Reranker:
        path = Path(path)
        if not (path / CONFIG).is_file() or _kind(path / CONFIG) != KIND:
            raise UserError(f"{path} is not a reranker model directory: {describe_checkpoint(path)}. " + SUPPORTED
                            + " (CLIP checkpoints load with load_reranker)")
        raw, state = load_model_dir(path, device)
        raw.pop("kind")
        config = from_dict(RerankerConfig, raw)
        with torch.device("meta"):
            model = ContrastiveModel(config)
        load_state_dict_checked(model, state, str(path))
        return cls(model.eval(), TextTokenizer.load(path))


def _kind(config_file: Path) -> object:
    try:
        return json.loads(config_file.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


# --- other people's checkpoints ------------------------------------------------------------------------------------

SUPPORTED = ("A reranker is a model directory written by `dalle reranker train` (config.json with kind 'reranker', "
             "model.safetensors and the tokenizer files), or a CLIP checkpoint: one of OpenAI's released files "
             "(ViT-B-32.pt, RN50.pt, ...), an open_clip state dict (.bin / .pt / .safetensors) or an open_clip model "
             "directory, with a vision-transformer or modified-ResNet image tower.")


def load_reranker(path: str | os.PathLike, device: str | torch.device = "cpu",
                  clip_vocab: str | os.PathLike | None = None, clip_activation: str | None = None) -> Scorer:
    """Our reranker from its model directory, or a user's CLIP checkpoint (see :mod:`dalle.models.clip`)."""
    path = Path(path)
    if (path / CONFIG).is_file() and _kind(path / CONFIG) == KIND:
        return Reranker.from_pretrained(path, device)
    from dalle.models.clip import ClipReranker, is_clip_checkpoint

    if is_clip_checkpoint(path):
        return ClipReranker.from_checkpoint(path, device, clip_vocab, clip_activation)
    raise UserError(f"{path} is not a reranker: {describe_checkpoint(path)}. " + SUPPORTED)


# What a checkpoint holds, as :func:`inspect_checkpoint` finds it. The CLIP kinds are the ones ``dalle.models.clip``
# loads; the rest exist to name what was given in an error message.
CLIP_KINDS = frozenset({"clip-torchscript", "clip-vit", "clip-resnet", "open-clip-dir"})


def inspect_checkpoint(path: str | os.PathLike) -> tuple[str, str]:
    """(kind, a one-line description for error messages) of what ``path`` holds, a directory or a weights file.

    Reads names, configs and archive listings, never tensors or pickled code. Kinds: the members of
    :data:`CLIP_KINDS`, ``"ours"`` (a directory whose config has a ``kind``), and otherwise ones no loader accepts.
    """
    path = Path(path)
    if not path.exists():
        return "missing", "it does not exist"
    if path.is_dir():
        return _inspect_dir(path)
    if is_torchscript_archive(path):
        return "clip-torchscript", ("it is a TorchScript archive, the format of OpenAI's released CLIP models "
                                    "(e.g. ViT-B-32.pt)")
    keys = _weight_keys(path)
    if keys is None:
        return "unknown", "it is not a directory, a safetensors file or a torch state dict"
    return _inspect_keys(keys)


def describe_checkpoint(path: str | os.PathLike) -> str:
    """A one-line guess at what ``path`` holds (a directory or a weights file), for error messages."""
    return inspect_checkpoint(path)[1]


def _inspect_dir(path: Path) -> tuple[str, str]:
    if (path / "open_clip_config.json").is_file():
        return "open-clip-dir", "it is an open_clip model directory (open_clip_config.json)"
    if (path / CONFIG).is_file():
        try:
            meta = json.loads((path / CONFIG).read_text())
        except (OSError, ValueError):
            return "unknown", f"its {CONFIG} is not valid JSON"
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("model_type") == "clip" or "CLIPModel" in meta.get("architectures", []):
            return "hf-clip", "it is a Hugging Face transformers CLIP directory"
        kind = meta.get("kind")
        if kind:
            return "ours", f"its {CONFIG} describes a {kind!r} model"
        return "unknown", f"its {CONFIG} has no 'kind'"
    weights = weight_files(path)
    if weights:
        kind, text = inspect_checkpoint(weights[0])
        # The CLIP loader takes a directory's weights file as the file itself.
        return (kind if kind in CLIP_KINDS else "unknown"), f"it has no {CONFIG}; {weights[0].name}: {text}"
    return "unknown", f"it holds no {CONFIG} and no weights file"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(directory: Path) -> list[Path]:
    """The weights files of a directory, the one to load first: safetensors before pickles, then by name."""
    return sorted((p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES),
                  key=lambda p: (p.suffix != ".safetensors", p.name))


def _weight_keys(path: Path) -> list[str] | None:
    """Tensor names of a safetensors file or a torch state dict (read without running pickled code), else None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError):
        pass
    state = read_state_dict(path)
    return [str(k) for k in state] if state is not None else None


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a zip written by ``torch.jit.save`` (it holds code and constants beside the data)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def read_state_dict(path: Path) -> dict | None:
    """A state dict saved with ``torch.save``, read with ``weights_only=True`` (so no pickled code runs) and taken out
    of a training checkpoint's ``{"state_dict": ...}`` or ``{"model": ...}``; None if the file is not one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure means "not a plain state dict"
        return None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    return obj if isinstance(obj, dict) else None


def _inspect_keys(keys: list[str]) -> tuple[str, str]:
    names = {k.removeprefix("module.") for k in keys}
    if "visual.conv1.weight" in names and any(k.startswith("transformer.resblocks.") for k in names):
        layers = len({k.split(".")[3] for k in names if k.startswith("visual.transformer.resblocks.")})
        return "clip-vit", f"it is an OpenAI CLIP / open_clip ViT state dict ({layers} vision layers)"
    if "visual.layer1.0.conv1.weight" in names:
        return "clip-resnet", "it is an OpenAI CLIP / open_clip ModifiedResNet state dict"
    if any(k.startswith("visual.trunk.") for k in names):
        return "open-clip-timm", "it is an open_clip state dict with a timm image tower"
    if any(k.startswith("vision_model.") for k in names) and any(k.startswith("text_model.") for k in names):
        return "hf-clip", "it is a Hugging Face transformers CLIP state dict"
    sample = ", ".join(sorted(names)[:3])
    return "unknown", f"its {len(names)} tensors ({sample}, ...) match no known image-text model"
